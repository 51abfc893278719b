"""Top-K metrics with full ranking (no sampled negatives).

Every model returns, per user, a ranked list of item indices (best first)
chosen among *all* items; with one held-out target per user:

- ``recall@K`` = fraction of users whose target is in their top K (= hit rate);
- ``ndcg@K`` = mean of ``1 / log2(rank + 2)`` over users whose target is at
  0-based ``rank < K`` (the ideal DCG of one relevant item is 1);
- ``coverage@K`` = fraction of the catalogue appearing in some user's top K;
- ``invalid_rate`` (generative models) = fraction of the returned beams
  with a finite score whose SID is not in the trie (must be 0 with
  constrained decoding).

Excluding the history (``exclude_history=True`` in every model's
``recommend`` / ``evaluate``) drops the items a user has already interacted
with from its ranking before the cut to K, as RecBole's full-sort evaluation
does. On data without repeat interactions (the 5-core Amazon splits: no test
or validation target is in its history) this only frees slots for items the
user can still take; where repeats are common it hides real hits, so it is
off by default and every result says which protocol it used.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["topk_metrics", "topk_from_scores", "drop_history"]


def topk_metrics(ranked: Sequence[np.ndarray], targets, num_items: int, ks: Sequence[int] = (5, 10)) -> dict:
    """Recall@K, NDCG@K and coverage@K of ranked lists against one target per user."""
    targets = np.asarray(targets, np.int64)
    if len(ranked) != len(targets):
        raise ValueError(f"ranked has {len(ranked)} lists but targets has {len(targets)} entries")
    if len(targets) == 0:
        raise ValueError("no users to evaluate")
    if (targets < 0).any() or (targets >= num_items).any():
        raise ValueError(f"targets must be item indices in [0, {num_items})")
    ks = sorted(int(k) for k in ks)
    if ks[0] < 1:
        raise ValueError(f"ks must be >= 1, got {ks}")
    kmax = ks[-1]
    ranks = np.full(len(targets), np.iinfo(np.int64).max)
    for u, (lst, t) in enumerate(zip(ranked, targets)):
        hit = np.flatnonzero(np.asarray(lst[:kmax]) == t)
        if hit.size:
            ranks[u] = hit[0]
    out: dict[str, float] = {}
    for k in ks:
        inside = ranks < k
        out[f"recall@{k}"] = float(inside.mean())
        out[f"ndcg@{k}"] = float(np.where(inside, 1.0 / np.log2(np.minimum(ranks, k) + 2.0), 0.0).mean())
        seen = np.unique(np.concatenate([np.asarray(lst[:k], np.int64) for lst in ranked] or [np.zeros(0, np.int64)]))
        out[f"coverage@{k}"] = float(len(seen) / num_items)
    out["users"] = int(len(targets))
    return out


def topk_from_scores(scores, k: int) -> np.ndarray:
    """``scores [U, N]`` -> the ``k`` best item indices per row, best first (ties: lower index)."""
    import torch

    s = torch.as_tensor(scores)
    k = min(int(k), s.shape[1])
    # stable descending sort on the top candidates keeps ties in index order
    idx = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return idx.cpu().numpy()


def drop_history(ranked: np.ndarray, history) -> np.ndarray:
    """``ranked`` without the items of ``history`` (order kept): the history-excluded protocol."""
    ranked = np.asarray(ranked, np.int64)
    return ranked[~np.isin(ranked, np.asarray(history, np.int64))]
