"""Top-K metrics with full ranking (no sampled negatives).

Every model returns, per user, a ranked list of item indices (best first)
chosen among *all* items; with one held-out target per user:

- ``recall@K`` = fraction of users whose target is in their top K (= hit rate);
- ``ndcg@K`` = mean of ``1 / log2(rank + 2)`` over users whose target is at
  0-based ``rank < K`` (the ideal DCG of one relevant item is 1);
- ``coverage@K`` = fraction of the catalogue appearing in some user's top K;
- ``invalid_rate`` (generative models) = fraction of the returned beams
  with a finite score whose SID is not in the trie (must be 0 with
  constrained decoding; NaN when no user has finite scores);
- ``nonfinite`` = number of users whose model scores are not finite (NaN or
  ``inf``). Models raise on them by default; a caller that asks to go on
  (the generative retriever's ``on_nonfinite="skip"``) gets them as misses in
  every metric and counted here, never as a silent recall or invalid rate
  of 0. :func:`topk_from_scores` refuses NaN / ``+inf`` scores.

Excluding the history (``exclude_history=True`` in every model's
``recommend`` / ``evaluate``) drops the items a user has already interacted
with from its ranking before the cut to K, as RecBole's full-sort evaluation
does. On data without repeat interactions (the 5-core Amazon splits: no test
or validation target is in its history) this only frees slots for items the
user can still take; where repeats are common it hides real hits, so it is
off by default and every result says which protocol it used.

Comparing two runs on the same users: :func:`target_ranks` keeps each
user's rank of its target (what every metric above is a mean over), and
:func:`paired_difference` gives the mean per-user difference of a metric
with its standard error *paired over users*. Two models that score the same
users are strongly correlated, so the paired error is well below that of
either mean, so it can tell a small change from noise where the unpaired one
cannot.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["topk_metrics", "topk_from_scores", "drop_history", "target_ranks", "paired_difference",
           "evaluate_lists", "per_user_metric"]


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
    ranks = target_ranks(ranked, targets, ks[-1])
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float(per_user_metric(ranks, k, "recall").mean())
        out[f"ndcg@{k}"] = float(per_user_metric(ranks, k, "ndcg").mean())
        seen = np.unique(np.concatenate([np.asarray(lst[:k], np.int64) for lst in ranked] or [np.zeros(0, np.int64)]))
        out[f"coverage@{k}"] = float(len(seen) / num_items)
    out["users"] = int(len(targets))
    return out


def topk_from_scores(scores, k: int) -> np.ndarray:
    """``scores [U, N]`` -> the ``k`` best item indices per row, best first (ties: lower index).

    ``-inf`` marks an item that must not be ranked first (e.g. the history); a NaN or ``+inf``
    score is a ``ValueError`` naming the rows (users) that hold one."""
    import torch

    s = torch.as_tensor(scores)
    bad = torch.isnan(s) | torch.isposinf(s)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(dim=1)).flatten().tolist()
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        raise ValueError(f"scores are not finite (NaN or +inf) in {len(rows)} row(s) (users of the batch): "
                         f"[{shown}]; a NaN weight or activation in the model is the usual cause")
    k = min(int(k), s.shape[1])
    # stable descending sort on the top candidates keeps ties in index order
    idx = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return idx.cpu().numpy()


def drop_history(ranked: np.ndarray, history) -> np.ndarray:
    """``ranked`` without the items of ``history`` (order kept): the history-excluded protocol."""
    ranked = np.asarray(ranked, np.int64)
    return ranked[~np.isin(ranked, np.asarray(history, np.int64))]


def target_ranks(ranked: Sequence[np.ndarray], targets, k: int) -> np.ndarray:
    """``[U]`` int64: each user's 0-based rank of its target among its first ``k`` items, -1 if absent.

    ``recall@K`` is the mean of ``0 <= rank < K`` and ``ndcg@K`` that of ``1 / log2(rank + 2)``
    over those users (see :func:`paired_difference`).
    """
    targets = np.asarray(targets, np.int64)
    if len(ranked) != len(targets):
        raise ValueError(f"ranked has {len(ranked)} lists but targets has {len(targets)} entries")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranks = np.full(len(targets), -1, np.int64)
    for u, (lst, t) in enumerate(zip(ranked, targets)):
        hit = np.flatnonzero(np.asarray(lst[:k]) == t)
        if hit.size:
            ranks[u] = hit[0]
    return ranks


def evaluate_lists(ranked: Sequence[np.ndarray], targets, num_items: int, ks: Sequence[int], *,
                   invalid_rate: float = 0.0, nonfinite: int = 0, return_ranks: bool = False):
    """What every model's ``evaluate`` returns for its ranked lists: :func:`topk_metrics` plus
    ``invalid_rate`` and ``nonfinite`` (users whose scores were not finite; their lists are
    empty, i.e. misses), and with ``return_ranks`` also :func:`target_ranks` at ``max(ks)``
    (``(metrics, ranks)``)."""
    if isinstance(nonfinite, bool) or not isinstance(nonfinite, (int, np.integer)) or nonfinite < 0:
        raise ValueError(f"nonfinite must be a non-negative int (a count of users), got {nonfinite!r}")
    out = topk_metrics(ranked, targets, num_items, ks)
    out["invalid_rate"] = float(invalid_rate)
    out["nonfinite"] = int(nonfinite)
    return (out, target_ranks(ranked, targets, max(ks))) if return_ranks else out


def per_user_metric(ranks, k: int, metric: str = "recall") -> np.ndarray:
    """``[U]`` float64: each user's ``metric@k`` (``"recall"`` or ``"ndcg"``) from :func:`target_ranks`
    (-1: not ranked); its mean is :func:`topk_metrics`' value."""
    ranks = np.asarray(ranks, np.int64)
    inside = (ranks >= 0) & (ranks < k)
    if metric == "recall":
        return inside.astype(np.float64)
    if metric == "ndcg":
        return np.where(inside, 1.0 / np.log2(np.where(inside, ranks, 0) + 2.0), 0.0)
    raise ValueError(f"metric must be 'recall' or 'ndcg', got {metric!r}")


def paired_difference(ranks_a, ranks_b, k: int, metric: str = "recall") -> tuple[float, float]:
    """``(mean, standard error)`` over users of ``metric@k`` of B minus that of A, paired by user.

    ``ranks_a`` / ``ranks_b``: :func:`target_ranks` of two models on the *same* users and
    targets, in the same order (-1: target not ranked). ``metric`` is ``"recall"`` or ``"ndcg"``;
    ``k`` must not exceed the ``k`` the ranks were cut at. The error is the sample standard
    deviation of the per-user differences over ``sqrt(U)``.
    """
    a, b = np.asarray(ranks_a, np.int64), np.asarray(ranks_b, np.int64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"ranks_a and ranks_b must be 1-D over the same users, got shapes {a.shape} and {b.shape}")
    if len(a) < 2:
        raise ValueError("paired_difference needs at least 2 users")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    d = per_user_metric(b, k, metric) - per_user_metric(a, k, metric)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
