"""The training loop shared by CPT, SFT and the SASRec baseline.

- AdamW (no weight decay on norms and biases), linear warm-up then cosine
  decay to ``min_lr_ratio * lr``, gradient clipping, gradient accumulation;
- bf16 autocast on CUDA (``bf16=None`` turns it on exactly there);
- loss: weighted token cross-entropy at the packed positions that carry a
  loss (``sum w * CE / sum w``) plus the model's router aux losses;
- several processes through ``torchrun``: DDP by default, FSDP2
  (``torch.distributed.fsdp.fully_shard`` per decoder layer) with
  ``fsdp=True``; rank ``r`` of ``W`` takes micro-batches ``r, r + W, ...``
  of one seeded stream, so the data order does not depend on ``W``;
- atomic checkpoints (``checkpoint.pt``: written to a temporary file, then
  ``os.replace``) with model, optimizer, scheduler, RNG states and the data
  position, and exact resume from them: training ``n`` steps in one go or
  in two runs with a checkpoint between gives the same weights;
- optional weight averaging (``ema_decay > 0``): an exponential moving
  average of the parameters, updated after every optimizer step, kept in
  the checkpoint, and loaded into the model when training ends;
- metrics as JSON lines (``metrics.jsonl``; rows after the checkpoint that
  a resumed run redoes are dropped), a tqdm progress bar on rank 0.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from plum.io import atomic_path
from plum.train.corpus import ExampleStream, PackedBatch

__all__ = ["TrainConfig", "train", "lm_loss", "CodebookLoss", "dist_env", "init_distributed", "shutdown_distributed",
           "default_device", "full_model_state", "save_checkpoint", "load_checkpoint", "ParameterEMA"]

CKPT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
LOGGED_PARTS = ("item", "distill")  # optional loss terms a loss_fn returns beside "ce", logged when present


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0          # 0 disables
    grad_accum: int = 1             # micro-batches per step and rank
    max_tokens: int = 4096          # tokens per micro-batch
    log_every: int = 10
    checkpoint_every: int = 0       # 0: only at the end
    seed: int = 0
    bf16: bool | None = None        # None: autocast to bf16 exactly on CUDA
    fsdp: bool = False              # FSDP2 instead of DDP when distributed
    ema_decay: float = 0.0          # 0: off; else the model ends with an EMA of its weights (see train)
    ema_warmup: float = 10.0        # W of the EMA's warm-up (1 + t) / (W + t) (see ParameterEMA); 1: none
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        for name in ("steps", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {self.max_tokens}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0 turns it off), got {self.ema_decay}")
        if not self.ema_warmup >= 1:
            raise ValueError(f"ema_warmup must be >= 1 (1: no warm-up), got {self.ema_warmup}")
        if self.ema_decay and self.fsdp:
            raise ValueError("ema_decay is not supported with fsdp=True (the average would need the sharded "
                             "parameters gathered); use DDP (fsdp=False) or ema_decay=0")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)


# ----------------------------------------------------------------------------- pieces

def lm_loss(model, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
    """Weighted next-token cross-entropy at ``batch.loss_index`` plus router aux losses."""
    out = model(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, logits_index=batch.loss_index)
    ce = F.cross_entropy(out.logits.float(), batch.targets, reduction="none")
    return _weighted_loss((ce * batch.weights).sum(), batch, out)


def _weighted_loss(weighted_ce_sum: torch.Tensor, batch: PackedBatch, out) -> tuple[torch.Tensor, dict]:
    """``sum(w * ce) / sum(w)`` plus the router aux losses, and the logged parts."""
    loss = weighted_ce_sum / batch.weights.sum().clamp_min(1e-12)
    return loss + out.aux_loss, {"ce": loss.detach(), "aux": out.aux_loss.detach(), "tokens": batch.num_tokens}


def check_label_smoothing(value) -> float:
    """``value`` as a float in [0, 1): a label smoothing (ValueError naming ``label_smoothing`` otherwise)."""
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {value!r}")
    return float(value)


def _is_weight(v) -> bool:
    """Whether ``v`` is a finite number >= 0 (an int or a float, not a bool): a loss weight."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0


def check_item_loss(value) -> float:
    """``value`` as a float >= 0: an item-loss weight (ValueError naming ``item_loss`` otherwise)."""
    if not _is_weight(value):
        raise ValueError(f"item_loss must be a finite number >= 0, got {value!r}")
    return float(value)


def check_distill(value) -> float:
    """``value`` as a float in [0, 1]: a distillation weight (ValueError naming ``distill`` otherwise)."""
    if not _is_weight(value) or value > 1:
        raise ValueError(f"distill must be a number in [0, 1], got {value!r}")
    return float(value)


def check_distill_temperature(value) -> float:
    """``value`` as a finite float > 0 (ValueError naming ``distill_temperature`` otherwise)."""
    if not _is_weight(value) or value == 0:
        raise ValueError(f"distill_temperature must be a finite number > 0, got {value!r}")
    return float(value)


def check_level_weights(value, num_levels: int) -> list[float] | None:
    """``value`` as ``num_levels`` finite weights >= 0, not all 0, or None (ValueError naming
    ``level_weights`` otherwise)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != num_levels:
        raise ValueError(f"level_weights must be a list of {num_levels} weights (one per SID level), got {value!r}")
    out = []
    for v in value:
        if not _is_weight(v):
            raise ValueError(f"level_weights must be finite numbers >= 0, got {value!r}")
        out.append(float(v))
    if not any(out):
        raise ValueError(f"level_weights must not all be 0, got {value!r}")
    return out


class CodebookLoss:
    """SFT loss normalised over each target's SID codebook: the distribution that
    constrained beam search decodes from.

    Every target of the batch must be a SID token; a target of level ``l`` is
    scored by cross-entropy over the logits of level ``l``'s codebook only
    (``vocab.level_slice(l)`` of the LM head), not over the whole vocabulary.
    Retrieval ranks SIDs by the sum of these per-level log-probabilities
    (``normalize="codebook"``), so the loss is the ranking's own likelihood;
    it also computes ``[M, V_l]`` logits instead of ``[M, V]`` (V_l <= 256
    against a ~5k-token vocabulary). Weighted as :func:`lm_loss`.

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
    Beauty, weight 0.25 tied with no item loss (RESULTS.md, nineteenth run).

    ``distill`` (in [0, 1], default 0: off) distils a next-item teacher into
    the codebook softmaxes: every target's one-hot label is mixed with the
    teacher's distribution over its level's codes, ``(1 - distill) *
    CE(one-hot) + distill * CE(teacher)``. ``teacher`` is a frozen item model
    called as :class:`plum.baselines.SASRec` is: ``teacher(items [S],
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
                raise TypeError(f"teacher must be a callable item model (e.g. plum.baselines.SASRec), got "
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
        teach = self._teacher_labels(batch, level) if self.distill else None
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
            loss, parts = _weighted_loss(num, batch, out)
        else:
            loss, parts = _weighted_loss((1 - self.distill) * num + self.distill * kd, batch, out)
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

    def _teacher_labels(self, batch: PackedBatch, level: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's label of every target, per level: ``[M_l, V_l]`` rows summing to 1, for the
        targets of level ``l`` in batch order (see the class docstring)."""
        items, ids, tgt = batch.items, batch.input_ids, batch.targets
        if items is None:
            raise ValueError("distill needs the batch's items (PackedBatch.items): pack examples that carry them, "
                             "as SFTDataset's and SequenceSFTDataset's do")
        t = self._tensors(tgt.device)
        bounds, sids, prefix = t["bounds"], t["sids"], t["prefix"]
        dev = tgt.device
        pos = batch.loss_index + 1  # the target tokens' packed positions [M]
        tgt_item = items[pos]
        if bool((tgt_item < 0).any()) or bool((tgt_item >= len(sids)).any()):
            raise ValueError(f"distill: every target token must belong to an item in [0, {len(sids)}) "
                             "(PackedBatch.items)")
        if not bool((sids[tgt_item, level] == tgt - bounds[level]).all()):
            raise ValueError("distill: the batch's items do not match catalogue (a target token is not its "
                             "item's SID token of its level)")
        # item starts: each item's level-0 token; its ordinal among its example's items
        is_start = (items >= 0) & (ids >= bounds[0]) & (ids < bounds[1])
        starts = is_start.nonzero().squeeze(1)  # [S], sorted
        cu = batch.cu_seqlens.to(dev).long()
        ex = torch.searchsorted(cu[1:], starts, right=True)  # example of each start
        counts = torch.bincount(ex, minlength=batch.num_examples)
        first = torch.cumsum(counts, 0) - counts  # index in `starts` of each example's first item
        own = pos - level  # the target's own item start; before its example's start when max_tokens cut it
        cut = own < cu[torch.searchsorted(cu[1:], pos, right=True)]
        at = torch.searchsorted(starts, own).clamp_max(max(len(starts) - 1, 0))
        found = torch.zeros_like(cut)
        if len(starts):
            found = (starts[at] == own) & (items[own.clamp_min(0)] == tgt_item)
        if not bool((found | cut).all()):
            raise ValueError("distill: every target's SID tokens must follow its item's level-0 token "
                             "(the history format)")
        # teacher input: every example's items but its last, packed; a target's row is its previous item's
        kept = (counts - 1).clamp_min(0)
        ordinal = torch.arange(len(starts), device=dev) - first[ex]
        keep = ordinal < kept[ex]
        has = found.clone()
        if len(starts):
            has &= ordinal[at] >= 1  # else no history in the example: the one-hot label stands in
        row = (torch.cumsum(kept, 0) - kept)[ex[at]] + ordinal[at] - 1 if len(starts) else at
        labels = [None] * len(self.slices)
        uniq, inv = torch.unique(row[has], return_inverse=True)
        has_rank = torch.cumsum(has, 0) - 1  # a target with a history: its index among those, i.e. into inv
        if len(uniq):
            lens = kept[kept > 0]
            tcu = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), torch.cumsum(lens, 0)]).to(torch.int32)
            p = self._teacher_probs(items[starts[keep]], tcu, int(lens.max()), uniq)  # [U, N]
        for l, sl in enumerate(self.slices):
            sel = level == l
            n_codes = sl.stop - sl.start
            lab = F.one_hot(tgt[sel] - sl.start, n_codes).to(p.dtype if len(uniq) else torch.float32)
            h = has[sel]
            if bool(h.any()):
                r = inv[has_rank[sel][h]]  # rows of p for this level's targets with a history
                q = p[r]
                if l:
                    q = q * (prefix[l][None, :] == prefix[l][tgt_item[sel][h]][:, None])
                d = torch.zeros(len(q), n_codes, dtype=q.dtype, device=dev).scatter_add_(
                    1, sids[:, l].expand(len(q), -1), q)
                lab[h] = d / d.sum(1, keepdim=True)
            labels[l] = lab
        return labels

    @torch.no_grad()
    def _teacher_probs(self, items, cu_seqlens, max_seqlen, index) -> torch.Tensor:
        """``softmax(teacher scores / distill_temperature)`` ``[U, N]`` at ``index``, in eval mode, float32
        (float64 when the teacher's scores are)."""
        teacher = self.teacher
        was = getattr(teacher, "training", False)
        if hasattr(teacher, "eval"):
            teacher.eval()
        try:
            with torch.autocast(items.device.type, enabled=False):
                scores = teacher(items, cu_seqlens, max_seqlen, index=index)
        finally:
            if hasattr(teacher, "train"):
                teacher.train(was)
        if scores.shape != (len(index), len(self.item_sids)):
            raise ValueError(f"the teacher returned scores of shape {tuple(scores.shape)}, expected "
                             f"[{len(index)}, {len(self.item_sids)}] (one per catalogue item)")
        scores = scores if scores.dtype == torch.float64 else scores.float()
        return torch.softmax(scores / self.distill_temperature, dim=-1)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(cfg.steps - cfg.warmup_steps, 1)
        t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith("bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


class ParameterEMA:
    """Exponential moving average of a model's parameters (weight averaging).

    After optimizer step ``t`` (1-based), every parameter's average moves as
    ``ema = d_t * ema + (1 - d_t) * p`` with ``d_t = min(decay, (1 + t) / (W + t))``,
    ``W = warmup`` (default 10, as in TensorFlow's ``ExponentialMovingAverage``):

    - the warm-up term keeps the first steps from tying the average to the
      initial weights: while it binds, the average after ``t`` steps spans
      roughly the last ``(W + t) / (W - 1)`` steps (``W = 2``: nearly the
      running mean of every step; ``W = 10``: the last ~t/9);
    - it binds until ``t = (W d - 1) / (1 - d)`` (e.g. 8,990 steps for
      ``d = 0.999``, ``W = 10``), and from then on the average spans roughly
      the last ``1 / (1 - d)`` steps; ``W = 1`` turns the warm-up off.

    :func:`train` warns when ``decay`` is never reached in its ``steps``,
    since every higher decay then gives the same average. The average
    starts as a copy of the parameters and has their dtype and device.
    Buffers are not averaged.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: float = 10.0):
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        if not warmup >= 1:
            raise ValueError(f"ema_warmup must be >= 1 (1: no warm-up), got {warmup}")
        self.decay, self.warmup = float(decay), float(warmup)
        named = [(n, p) for n, p in model.named_parameters()]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self.params]

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (self.warmup + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay_at(step))

    def state_dict(self) -> dict:
        return {n: s.detach().cpu().clone() for n, s in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.names):
            raise ValueError(f"EMA state has parameters {sorted(set(state) ^ set(self.names))[:5]} that the model "
                             "does not (or the other way round)")
        for n, s in zip(self.names, self.shadow):
            s.copy_(state[n])

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def dist_env() -> tuple[int, int]:
    """``(rank, world_size)``; 0, 1 when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _full_state(model, opt):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if dist_env()[1] > 1:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, opt, options=opts)
    return model.state_dict(), opt.state_dict()


def full_model_state(model) -> dict:
    """The whole model's state dict on the CPU (gathered from every rank under DDP/FSDP2)."""
    if dist_env()[1] > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def init_distributed() -> tuple[int, int]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist_env()


def shutdown_distributed() -> None:
    """Leave the ``torchrun`` process group at the end of a successful job (no-op in one process).

    Every rank waits at a barrier, so no collective is in flight, then calls
    ``destroy_process_group``. Call it only when every rank got there: a rank
    that raised never reaches the barrier, and the others would wait for it.
    Known torch limitation on the CPU (gloo): a gloo worker thread can still
    drop the last reference to a finished collective's tensors while the
    interpreter finalizes (it needs the GIL to free them), which aborts the
    process after the job has finished ("terminate called without an active
    exception"; mechanism in pytorch/pytorch#179291); the barrier narrows
    that window, it cannot close it.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def default_device() -> torch.device:
    """This process's CUDA device (``LOCAL_RANK``) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def save_checkpoint(out_dir: Path, model, opt, sched, *, step: int, position: int, extra: dict | None = None,
                    ema: ParameterEMA | None = None) -> None:
    """Write ``out_dir/checkpoint.pt`` atomically (every rank must call it; rank 0 writes)."""
    msd, osd = _full_state(model, opt)
    rank, world = dist_env()
    if rank == 0:
        _atomic_torch_save({"model": msd, "optimizer": osd, "scheduler": sched.state_dict(), "step": step,
                            "position": position, "rng": _rng_state(), "world_size": world,
                            "ema_decay": ema.decay if ema is not None else 0.0,
                            "ema_warmup": ema.warmup if ema is not None else None,
                            "ema": ema.state_dict() if ema is not None else None,
                            "extra": extra or {}}, out_dir / CKPT_NAME)
    if world > 1:
        dist.barrier()


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _restore(model, opt, ckpt: dict) -> None:
    if dist_env()[1] > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, opt, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])


def _trim_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(r + "\n" for r in rows))


def _wrap(model, cfg: TrainConfig):
    rank, world = dist_env()
    if world == 1:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = next(model.parameters()).device
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)


# ----------------------------------------------------------------------------- loop

def train(model, dataset, cfg: TrainConfig, out_dir: str | os.PathLike, *, resume: bool = True,
          loss_fn: Callable = lm_loss, desc: str = "train", stop_after: int | None = None) -> dict:
    """Train ``model`` on ``dataset`` (random-access examples, see :mod:`plum.train.corpus`).

    Resumes from ``out_dir/checkpoint.pt`` when it exists and ``resume``.
    ``stop_after`` ends the run early after that many steps (with a
    checkpoint), as a pre-empted job would; the schedule still spans
    ``cfg.steps``. Returns the last logged metrics.

    With ``cfg.ema_decay > 0`` a :class:`ParameterEMA` of the weights is kept
    (and checkpointed), and once step ``cfg.steps`` is reached the model's
    parameters are replaced by it, so the caller saves the averaged model. A
    run stopped earlier (``stop_after``) keeps the raw weights. Resuming a
    checkpoint written with another ``ema_decay`` is refused.
    """
    out = Path(out_dir)
    rank, world = dist_env()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if world > 1:
        dist.barrier()
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    wrapped = _wrap(model, cfg)
    opt = make_optimizer(wrapped, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ema = ParameterEMA(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay else None
    if ema is not None and (last := ema.decay_at(cfg.steps)) < ema.decay:
        warnings.warn(f"ema_decay={ema.decay} is never reached in {cfg.steps} steps: the warm-up "
                      f"(1 + t) / ({ema.warmup:g} + t) sets the decay of every step (at most {last:.5f} at the "
                      f"last), so any ema_decay >= {last:.5f} trains the same average (a smaller ema_warmup "
                      "averages over more steps)", stacklevel=2)
    step, position = 0, 0
    ckpt_path = out / CKPT_NAME
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("world_size", 1) != world:
            raise ValueError(f"{ckpt_path} was written by {ckpt.get('world_size')} processes, this run has {world}; "
                             "the data order would differ")
        if float(ckpt.get("ema_decay", 0.0)) != cfg.ema_decay:
            raise ValueError(f"{ckpt_path} was written with ema_decay={ckpt.get('ema_decay', 0.0)}, this run has "
                             f"ema_decay={cfg.ema_decay}; resume with the same value or use a new directory")
        was = float(ckpt.get("ema_warmup") or 10.0)  # checkpoints from before the option: the fixed 10
        if ema is not None and was != ema.warmup:
            raise ValueError(f"{ckpt_path} was written with ema_warmup={was:g}, this run has "
                             f"ema_warmup={ema.warmup:g}; resume with the same value or use a new directory")
        _restore(wrapped, opt, ckpt)
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        sched.load_state_dict(ckpt["scheduler"])
        step, position = int(ckpt["step"]), int(ckpt["position"])
        _set_rng_state(ckpt["rng"])
        if rank == 0:
            _trim_metrics(out / METRICS_NAME, step)
    stream = ExampleStream(dataset, max_tokens=cfg.max_tokens, seed=cfg.seed, position=position)
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc=desc, disable=not cfg.progress or rank != 0, unit="step")
    last: dict = {}
    t0, tokens_seen = time.perf_counter(), 0
    wrapped.train()
    while step < end:
        opt.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "ce": 0.0, "aux": 0.0}
        for micro in range(cfg.grad_accum):
            batches = [stream.next_batch() for _ in range(world)]  # every rank builds all, keeps its own
            batch = batches[rank].to(device)
            sync = micro == cfg.grad_accum - 1 or world == 1 or cfg.fsdp
            ctx = wrapped.no_sync() if not sync and hasattr(wrapped, "no_sync") else contextlib.nullcontext()
            with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, parts = loss_fn(wrapped, batch)
            (loss / cfg.grad_accum).backward()
            sums["loss"] += float(loss.detach()) / cfg.grad_accum
            sums["ce"] += float(parts["ce"]) / cfg.grad_accum
            sums["aux"] += float(parts["aux"]) / cfg.grad_accum
            for k in LOGGED_PARTS:  # CodebookLoss's item_loss / distill terms (logged beside "ce")
                if k in parts:
                    sums[k] = sums.get(k, 0.0) + float(parts[k]) / cfg.grad_accum
            tokens_seen += sum(b.num_tokens for b in batches)
        gnorm = (torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip) if cfg.grad_clip
                 else torch.zeros(()))
        opt.step()
        sched.step()
        step += 1
        if ema is not None:
            ema.update(step)
        bar.update(1)
        if step % cfg.log_every == 0 or step == end:
            if world > 1:
                t = torch.tensor(list(sums.values()), dtype=torch.float64)
                dist.all_reduce(t)
                sums = dict(zip(sums, (t / world).tolist()))
            dt = time.perf_counter() - t0
            last = {"step": step, **sums, "grad_norm": float(gnorm), "lr": sched.get_last_lr()[0],
                    "epoch": stream.epoch, "tokens_per_s": tokens_seen / max(dt, 1e-9)}
            bar.set_postfix(loss=f"{sums['loss']:.3f}")
            if rank == 0:
                with open(out / METRICS_NAME, "a") as f:
                    f.write(json.dumps(last) + "\n")
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == end:
            save_checkpoint(out, wrapped, opt, sched, step=step, position=stream.position, ema=ema)
    bar.close()
    if ema is not None and step >= cfg.steps:
        ema.copy_to_model()
    return last

