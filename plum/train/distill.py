"""Distillation of a next-item model into the SID codebook softmaxes (``CodebookLoss``'s ``distill``).

For a target of level ``l`` after history ``h`` (the items before it in its
example), the teacher's label is ``p(i | h) = softmax(scores / temperature)``
restricted to the items whose first ``l`` codes are the target's, summed by
their level-``l`` code and renormalised: the teacher's own answer to the
question the level-``l`` softmax is asked (level 0: its whole distribution, by
first code). A target with no item before it in its example (only when
``max_tokens`` cut the example) takes its one-hot label as the teacher's.

The teacher is a frozen item model called as :class:`plumrec.baselines.SASRec`
is: ``teacher(items [S], cu_seqlens, max_seqlen, index=[U])`` -> scores
``[U, N]`` over the catalogue's ``N`` items; it runs under ``no_grad`` in
eval mode, on every example's items but its last, packed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from plumrec.sequences import PackedBatch

__all__ = ["teacher_labels", "teacher_probs"]


def teacher_labels(batch: PackedBatch, level: torch.Tensor, slices: list[slice], tensors: dict, teacher,
               temperature: float) -> list[torch.Tensor]:
    """The teacher's label of every target, per level: ``[M_l, V_l]`` rows summing to 1, for the
    targets of level ``l`` in batch order (see the module docstring). ``slices``: each level's token
    slice; ``tensors``: :class:`~plumrec.train.codebook_loss.CodebookLoss`'s ``bounds`` (the levels'
    first tokens and the end), ``sids [N, L]`` (every item's codes) and ``prefix [L, N]`` (the key of
    each item's first ``l`` codes) on the batch's device."""
    items, ids, tgt = batch.items, batch.input_ids, batch.targets
    if items is None:
        raise ValueError("distill needs the batch's items (PackedBatch.items): pack examples that carry them, "
                         "as SFTDataset's and SequenceSFTDataset's do")
    bounds, sids, prefix = tensors["bounds"], tensors["sids"], tensors["prefix"]
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
    labels = [None] * len(slices)
    uniq, inv = torch.unique(row[has], return_inverse=True)
    has_rank = torch.cumsum(has, 0) - 1  # a target with a history: its index among those, i.e. into inv
    if len(uniq):
        lens = kept[kept > 0]
        tcu = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), torch.cumsum(lens, 0)]).to(torch.int32)
        p = teacher_probs(teacher, items[starts[keep]], tcu, int(lens.max()), uniq, len(sids), temperature)
    for l, sl in enumerate(slices):
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
def teacher_probs(teacher, items, cu_seqlens, max_seqlen, index, num_items: int, temperature: float) -> torch.Tensor:
    """``softmax(teacher scores / temperature)`` ``[U, num_items]`` at ``index``, in eval mode, float32
    (float64 when the teacher's scores are)."""
    was = getattr(teacher, "training", False)
    if hasattr(teacher, "eval"):
        teacher.eval()
    try:
        with torch.autocast(items.device.type, enabled=False):
            scores = teacher(items, cu_seqlens, max_seqlen, index=index)
    finally:
        if hasattr(teacher, "train"):
            teacher.train(was)
    if scores.shape != (len(index), num_items):
        raise ValueError(f"the teacher returned scores of shape {tuple(scores.shape)}, expected "
                         f"[{len(index)}, {num_items}] (one per catalogue item)")
    scores = scores if scores.dtype == torch.float64 else scores.float()
    return torch.softmax(scores / temperature, dim=-1)
