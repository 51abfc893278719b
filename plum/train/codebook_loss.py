"""The SFT loss over each target's SID codebook (:class:`CodebookLoss`), with optional label
smoothing, per-level weights, an item-level term and distillation of an item model
(:mod:`plumrec.train.distill`)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from plumrec.sequences import PackedBatch
from plumrec.train.distill import teacher_labels
from plumrec.train.distributed import dist_env
from plumrec.train.losses import (
    check_distill,
    check_distill_temperature,
    check_item_loss,
    check_label_smoothing,
    check_level_weights,
    weighted_loss,
)

__all__ = ["CodebookLoss"]


class CodebookLoss:
    """SFT loss normalised over each target's SID codebook: the distribution that
    constrained beam search decodes from.

    Every target of the batch must be a SID token; a target of level ``l`` is
    scored by cross-entropy over the logits of level ``l``'s codebook only
    (``vocab.level_slice(l)`` of the LM head), not over the whole vocabulary.
    Retrieval ranks SIDs by the sum of these per-level log-probabilities
    (``normalize="codebook"``), so the loss is the ranking's own likelihood;
    it also computes ``[M, V_l]`` logits instead of ``[M, V]`` (V_l <= 256
    against a ~5k-token vocabulary). Weighted as :func:`~plumrec.train.losses.lm_loss`.

    ``label_smoothing`` (in [0, 1)) mixes each target's one-hot with the
    uniform distribution over *its level's codebook* (``F.cross_entropy``'s
    ``label_smoothing`` on the ``[M, V_l]`` logits); 0 is the plain loss.

    ``level_weights`` (one weight >= 0 per SID level, default all 1) multiplies
    the cross-entropy of every level-``l`` target by ``level_weights[l]``, e.g.
    ``[2, 1, 1, 1]`` to stress the first, coarsest code. The sum is still divided
    by the batch's token weights, so weights above 1 raise the loss's scale.

    ``item_loss`` (>= 0, default 0: off) adds a training-only item-level term,
    ``item_loss * item_ce``: at the position that predicts a target's first
    SID token, a softmax over every distinct SID of ``catalogue`` (``[N, L]``
    SID token ids, e.g. ``vocab.sid_to_tokens(codes)``), each scored by the
    sum over levels of that position's level logits (a factorised full-item
    softmax, as SASRec's CE over items, with no new parameter). ``item_ce``
    is its weighted mean over the batch's targets (the first tokens'
    weights); every target's ``L`` SID tokens must be consecutive targets,
    and its SID must be in ``catalogue``. Beam search does not read it: it
    only trains the first position to rank whole items. The logged ``ce``
    stays the codebook CE; ``item`` is logged beside it. Cost: an ``[M, C]``
    score matrix per batch (``M`` targets, ``C`` distinct SIDs). On Amazon
    Beauty weight 0.25 ties with no item loss on validation Recall@10.

    ``distill`` (in [0, 1], default 0: off) distils a next-item teacher into
    the codebook softmaxes: every target's one-hot label is mixed with the
    teacher's distribution over its level's codes, ``(1 - distill) *
    CE(one-hot) + distill * CE(teacher)``. ``teacher`` is a frozen item model
    called as :class:`plumrec.baselines.SASRec` is: ``teacher(items [S],
    cu_seqlens, max_seqlen, index=[U])`` -> scores ``[U, N]`` over the ``N``
    items of ``catalogue`` (``[N, L]`` SID tokens, row ``i`` item ``i``'s);
    it reads each target's history as item ids, so the batch must carry
    ``items`` (the SFT datasets' examples do). For a target of level ``l``
    after history ``h`` (the items before it in its example), the teacher's
    label is ``p(i | h) = softmax(scores / distill_temperature)`` restricted to
    the items whose first ``l`` codes are the target's, summed by their
    level-``l`` code and renormalised: the teacher's own answer to the
    question the level-``l`` softmax is asked (level 0: its whole
    distribution, by first code). A target with no item before it in its
    example (only when ``max_tokens`` cut an example) takes its one-hot label
    as the teacher's. The teacher runs under ``no_grad`` in eval mode; the
    logged ``ce`` stays the one-hot codebook CE, ``distill`` (CE against the
    teacher) is logged beside it. Cost: one teacher forward over the batch's
    histories and ``[U, N]`` scores (``U`` target items). Beam search and
    inference do not use the teacher.

    In one process the level slices are multiplied directly; under DDP/FSDP
    (world size > 1) the full logits come out of the wrapped forward and are
    sliced, so that every parameter is used inside ``forward`` (same loss).
    """

    def __init__(self, vocab, label_smoothing: float = 0.0, level_weights=None, item_loss: float = 0.0,
                 catalogue=None, distill: float = 0.0, teacher=None, distill_temperature: float = 1.0):
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.level_weights = check_level_weights(level_weights, vocab.num_levels)
        self.slices = [vocab.level_slice(l) for l in range(vocab.num_levels)]
        self.bounds = torch.tensor([sl.start for sl in self.slices] + [self.slices[-1].stop])
        if any(a.stop != b.start for a, b in zip(self.slices, self.slices[1:])):
            raise ValueError("the SID levels must be contiguous in the vocabulary")
        self.item_loss = check_item_loss(item_loss)
        self.item_codes = self.item_keys = None
        self.distill = check_distill(distill)
        self.distill_temperature = check_distill_temperature(distill_temperature)
        self.teacher = self.item_sids = None
        self._on_device: dict = {}  # device -> dict of the tensors above, moved once (see _tensors)
        if self.item_loss:
            if catalogue is None:
                raise ValueError("item_loss > 0 needs catalogue: the [N, L] SID tokens of every item")
            codes = torch.unique(self._catalogue(catalogue), dim=0)  # sorted, so their keys are sorted too
            self.item_codes, self.item_keys = codes, self._keys(codes, self.bounds.diff())
        if self.distill:
            if teacher is None or catalogue is None:
                raise ValueError("distill > 0 needs teacher (an item model called as SASRec is) and catalogue "
                                 "(the [N, L] SID tokens of every item, row i item i's)")
            if not callable(teacher):
                raise TypeError(f"teacher must be a callable item model (e.g. plumrec.baselines.SASRec), got "
                                f"{type(teacher).__name__}")
            self.teacher, self.item_sids = teacher, self._catalogue(catalogue)
            n = getattr(getattr(teacher, "config", None), "num_items", None)
            if n is not None and n != len(self.item_sids):
                raise ValueError(f"teacher scores {n} items but catalogue has {len(self.item_sids)}")

    def _catalogue(self, catalogue) -> torch.Tensor:
        """``catalogue`` (``[N, L]`` SID tokens) as per-level codes ``[N, L]`` int64, checked."""
        cat = torch.as_tensor(np.ascontiguousarray(catalogue))
        L = len(self.slices)
        if cat.dim() != 2 or cat.shape[1] != L or cat.shape[0] == 0 or cat.is_floating_point():
            raise ValueError(f"catalogue must be a non-empty integer [N, {L}] array of SID tokens, got "
                             f"{tuple(cat.shape)} {cat.dtype}")
        starts, sizes = self.bounds[:-1], self.bounds.diff()
        codes = cat.long() - starts
        if (codes < 0).any() or (codes >= sizes).any():
            raise ValueError("catalogue[:, l] must be SID tokens of level l")
        if math.prod(int(v) for v in sizes) >= 2 ** 62:
            raise ValueError(f"catalogue: codebooks {sizes.tolist()} have too many SIDs to key in int64")
        return codes

    @staticmethod
    def _keys(codes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        key = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
        for l in range(codes.shape[1]):
            key = key * int(sizes[l]) + codes[:, l]
        return key

    def _tensors(self, device) -> dict:
        """The constant tensors on ``device``, moved (and derived) once per device, not every step:
        ``bounds``; with ``item_loss`` the distinct SIDs' sorted ``keys [C]`` and ``cat [C, L]``, their
        tokens relative to level 0's first token; with ``distill`` every item's codes ``sids [N, L]`` and
        ``prefix [L, N]``, the key of each item's first ``l`` codes (row 0: all 0)."""
        device = torch.device(device)
        if device not in self._on_device:
            bounds = self.bounds.to(device)
            t = {"bounds": bounds}
            if self.item_loss:
                t["keys"] = self.item_keys.to(device)
                t["cat"] = self.item_codes.to(device) + (bounds[:-1] - self.slices[0].start)
            if self.distill:
                sids, sizes = self.item_sids.to(device), bounds.diff()
                t["sids"] = sids
                t["prefix"] = torch.stack([self._keys(sids[:, :l], sizes[:l]) for l in range(len(self.slices))])
            self._on_device[device] = t
        return self._on_device[device]

    def __call__(self, model, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
        tgt = batch.targets
        bounds = self._tensors(tgt.device)["bounds"]
        if tgt.numel() and (int(tgt.min()) < int(bounds[0]) or int(tgt.max()) >= int(bounds[-1])):
            raise ValueError(f"CodebookLoss needs every target to be a SID token in [{int(bounds[0])}, "
                             f"{int(bounds[-1])}); got targets in [{int(tgt.min())}, {int(tgt.max())}] "
                             "(use lm_loss for text or special tokens)")
        level = torch.searchsorted(bounds, tgt, right=True) - 1
        full = dist_env()[1] > 1
        out = model(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, logits=full,
                    logits_index=batch.loss_index)
        base = getattr(model, "module", model)
        teach = (teacher_labels(batch, level, self.slices, self._tensors(batch.targets.device), self.teacher,
                               self.distill_temperature) if self.distill else None)
        w, num, kd, used = batch.weights, 0.0, 0.0, 0
        for l, sl in enumerate(self.slices):
            rows = (level == l).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            logits = out.logits[rows, sl] if full else base.lm_logits(out.hidden[rows], sl)
            logits = logits if logits.dtype == torch.float64 else logits.float()
            ce = F.cross_entropy(logits, tgt[rows] - sl.start, reduction="none", label_smoothing=self.label_smoothing)
            lw = 1.0 if self.level_weights is None else self.level_weights[l]
            num = num + (ce * lw * w[rows].to(ce.dtype)).sum()
            if teach is not None:
                kd_l = -(teach[l].to(logits.dtype) * logits.log_softmax(-1)).sum(-1)
                kd = kd + (kd_l * lw * w[rows].to(kd_l.dtype)).sum()
            used += rows.numel()
        if used == 0:  # no target: a zero loss that still depends on the parameters
            num = kd = out.hidden.sum() * 0.0
        if not self.distill:
            loss, parts = weighted_loss(num, batch, out)
        else:
            loss, parts = weighted_loss((1 - self.distill) * num + self.distill * kd, batch, out)
            denom = batch.weights.sum().clamp_min(1e-12)
            parts = {**parts, "ce": (num / denom).detach(), "distill": (kd / denom).detach()}
        if self.item_loss:
            item = self._item_ce(out, base, batch, level, full)
            loss, parts = loss + self.item_loss * item, {**parts, "item": item.detach()}
        return loss, parts

    def _item_ce(self, out, base, batch: PackedBatch, level: torch.Tensor, full: bool) -> torch.Tensor:
        """Weighted mean over targets of the item-level CE at each target's first-token position."""
        tgt, L = batch.targets, len(self.slices)
        rows = (level == 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return out.hidden.sum() * 0.0
        ar = torch.arange(L, device=rows.device)
        offs = rows[:, None] + ar
        if bool((offs[:, -1] >= tgt.numel()).any()) or not bool(
                (level[offs] == ar).all() and (batch.loss_index[offs] - batch.loss_index[rows, None] == ar).all()):
            raise ValueError(f"item_loss needs every target's {L} SID tokens to be consecutive targets "
                             "(the SFT datasets' layout)")
        t = self._tensors(tgt.device)
        bounds, keys, cat = t["bounds"], t["keys"], t["cat"]
        want = self._keys(tgt[offs] - bounds[:-1], bounds.diff())
        cls = torch.searchsorted(keys, want).clamp_max(keys.numel() - 1)
        if not bool((keys[cls] == want).all()):
            raise ValueError("item_loss: a target's SID is not in the catalogue")
        sl = slice(self.slices[0].start, self.slices[-1].stop)
        logits = out.logits[rows, sl] if full else base.lm_logits(out.hidden[rows], sl)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        scores = sum(logits[:, cat[:, l]] for l in range(L))  # [M0, C]: sum over levels of the level logits
        w = batch.weights[rows].to(scores.dtype)
        ce = F.cross_entropy(scores, cls, reduction="none")
        return (ce * w).sum() / w.sum().clamp_min(1e-12)
