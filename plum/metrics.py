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

Exposure (who gets shown, not who gets hit), from the same top-K lists of all
users: an item's exposure count is the number of lists whose first K entries
hold it, and the aggregate exposure ``d[i]`` is that count over the total (the
normalised mean of the users' exposures):

- ``coverage@K`` (above) = distinct items recommended to anyone / catalogue size;
- ``entropy@K`` = ``-sum_i d[i] ln d[i]`` (nats; between 0 and ``ln M``),
  ``entropy_norm@K`` = the same over ``ln M`` (1: every item equally exposed);
- ``gini@K`` = Gini coefficient of ``d`` over the whole catalogue (items never
  shown count as 0): 0 when every item is equally exposed, ``1 - K / M`` when
  every user gets the same K items;
- ``tail_exposure@K`` = share of the exposure that goes to tail items: the
  items outside the ``head_fraction`` (default 0.2) most popular in training
  (see :func:`tail_items`);
- ``novelty@K`` = mean over the recommended items (every list entry) of
  ``-log2 p(i)``, with ``p(i) = (count(i) + 1) / (total + M)`` the add-one
  smoothed training popularity: higher means less popular items are shown.

They are NaN when no list holds an item (e.g. every user skipped as non-finite);
coverage is then 0.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["topk_metrics", "topk_from_scores", "drop_history", "target_ranks", "paired_difference",
           "evaluate_lists", "per_user_metric", "item_popularity", "exposure_counts", "coverage",
           "exposure_entropy", "exposure_gini", "tail_items", "tail_exposure", "novelty", "exposure_metrics",
           "HEAD_FRACTION"]

HEAD_FRACTION = 0.2  # the most popular fifth of the catalogue is the head; the rest is the tail


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
        out[f"coverage@{k}"] = coverage(ranked, num_items, k)
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
                   invalid_rate: float = 0.0, nonfinite: int = 0, return_ranks: bool = False,
                   popularity=None, head_fraction: float = HEAD_FRACTION):
    """What every model's ``evaluate`` returns for its ranked lists: :func:`topk_metrics`, the
    exposure measures of :func:`exposure_metrics` (``popularity [M]``: training counts, for the
    tail exposure and novelty), ``invalid_rate`` and ``nonfinite`` (users whose scores were not
    finite; their lists are empty, i.e. misses), and with ``return_ranks`` also
    :func:`target_ranks` at ``max(ks)`` (``(metrics, ranks)``)."""
    if isinstance(nonfinite, bool) or not isinstance(nonfinite, (int, np.integer)) or nonfinite < 0:
        raise ValueError(f"nonfinite must be a non-negative int (a count of users), got {nonfinite!r}")
    out = topk_metrics(ranked, targets, num_items, ks)
    out.update(exposure_metrics(ranked, num_items, ks, popularity, head_fraction=head_fraction))
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


def _check_num_items(num_items) -> int:
    if isinstance(num_items, bool) or not isinstance(num_items, (int, np.integer)) or num_items < 1:
        raise ValueError(f"num_items must be a positive int, got {num_items!r}")
    return int(num_items)


def _check_k(k) -> int | None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
        raise ValueError(f"k must be None or an int >= 1, got {k!r}")
    return None if k is None else int(k)


def _entries(lists, num_items: int, k: int | None) -> np.ndarray:
    """``[T]`` int64: every item of ``lists`` (each cut to its first ``k`` entries, -1 padding dropped)."""
    if isinstance(lists, np.ndarray) and lists.dtype != object:
        if lists.ndim != 2:
            raise ValueError(f"lists must be an int array [N, K] or a sequence of 1-D lists, got shape {lists.shape}")
        rows = [lists]
    else:
        rows = [np.asarray(lst) for lst in lists]
        if any(r.ndim != 1 for r in rows):
            raise ValueError("lists must be an int array [N, K] or a sequence of 1-D lists")
        rows = [r[None, :] for r in rows]
    if any(r.size and not np.issubdtype(r.dtype, np.integer) for r in rows):
        raise ValueError("lists must hold integer item indices (-1: padding)")
    flat = np.concatenate([r[:, :k].reshape(-1).astype(np.int64) for r in rows] or [np.zeros(0, np.int64)])
    if flat.size and (flat.min() < -1 or flat.max() >= num_items):
        raise ValueError(f"lists must hold item indices in [0, {num_items}) or -1 (padding)")
    return flat[flat >= 0]


def _check_popularity(popularity, num_items: int) -> np.ndarray:
    p = np.asarray(popularity)
    if p.shape != (num_items,) or not (np.issubdtype(p.dtype, np.integer) or np.issubdtype(p.dtype, np.floating)):
        raise ValueError(f"popularity must be a numeric [num_items] = [{num_items}] array of counts, "
                         f"got shape {p.shape} and dtype {p.dtype}")
    p = p.astype(np.float64)
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("popularity must hold finite, non-negative counts")
    return p


def item_popularity(sequences: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """``[M]`` int64: how often each item occurs in ``sequences`` (e.g. the training split)."""
    num_items = _check_num_items(num_items)
    flat = np.concatenate([np.asarray(s, np.int64).reshape(-1) for s in sequences] or [np.zeros(0, np.int64)])
    if flat.size and (flat.min() < 0 or flat.max() >= num_items):
        raise ValueError(f"sequences must hold item indices in [0, {num_items})")
    return np.bincount(flat, minlength=num_items).astype(np.int64)


def exposure_counts(lists, num_items: int, k: int | None = None) -> np.ndarray:
    """``[M]`` int64: how many entries of ``lists`` hold each item.

    ``lists``: int array ``[N, K]`` or a sequence of N 1-D int lists of any length, item indices
    in ``[0, num_items)`` with -1 as padding (ignored); ``k``: only each list's first ``k``
    entries count (None: all). An item twice in one list counts twice."""
    num_items = _check_num_items(num_items)
    return np.bincount(_entries(lists, num_items, _check_k(k)), minlength=num_items).astype(np.int64)


def coverage(lists, num_items: int, k: int | None = None) -> float:
    """Distinct items in ``lists`` (first ``k`` entries of each) over ``num_items``; ``lists`` as in
    :func:`exposure_counts`."""
    return float((exposure_counts(lists, num_items, k) > 0).sum() / num_items)


def _entropy(c: np.ndarray, normalized: bool) -> float:
    if c.sum() == 0:
        return float("nan")
    d = c[c > 0] / c.sum()
    h = float(-(d * np.log(d)).sum())
    if not normalized:
        return h
    return h / float(np.log(len(c))) if len(c) > 1 else 1.0


def _gini(c: np.ndarray) -> float:
    x = np.sort(c).astype(np.float64)
    if x.sum() == 0:
        return float("nan")
    m = len(x)
    return float(((2 * np.arange(1, m + 1) - m - 1) * x).sum() / (m * x.sum()))


def _novelty(c: np.ndarray, p: np.ndarray) -> float:
    if c.sum() == 0:
        return float("nan")
    info = -np.log2((p + 1.0) / (p.sum() + len(p)))
    return float((c * info).sum() / c.sum())


def exposure_entropy(lists, num_items: int, k: int | None = None, *, normalized: bool = False) -> float:
    """Entropy (natural log) of the aggregate exposure ``d = counts / counts.sum()`` of
    :func:`exposure_counts`; ``normalized``: over ``ln(num_items)`` (1.0 for a single item).
    NaN when ``lists`` hold no item."""
    return _entropy(exposure_counts(lists, num_items, k), normalized)


def exposure_gini(lists, num_items: int, k: int | None = None) -> float:
    """Gini coefficient of the aggregate exposure over all ``num_items`` items (never shown: 0):
    ``sum_i (2 i - M - 1) x_(i) / (M sum x)`` with ``x_(1) <= ... <= x_(M)`` the counts of
    :func:`exposure_counts`. 0 for equal exposure; ``1 - 1/M`` at most. NaN when ``lists`` hold no item."""
    return _gini(exposure_counts(lists, num_items, k))


def tail_items(popularity, head_fraction: float = HEAD_FRACTION) -> np.ndarray:
    """``[M]`` bool: the tail, i.e. every item but the ``ceil(head_fraction * M)`` most popular.

    ``popularity [M]``: training interaction counts (int or float, >= 0); ties at the head's edge
    go to the lower item index. ``head_fraction`` in [0, 1] (0: everything is tail)."""
    p = np.asarray(popularity)
    if p.ndim != 1:
        raise ValueError(f"popularity must be 1-D [M], got shape {p.shape}")
    p = _check_popularity(p, len(p))
    if isinstance(head_fraction, bool) or not isinstance(head_fraction, (int, float, np.floating)) \
            or not 0.0 <= head_fraction <= 1.0:
        raise ValueError(f"head_fraction must be a number in [0, 1], got {head_fraction!r}")
    head = int(np.ceil(head_fraction * len(p) - 1e-9))
    tail = np.ones(len(p), bool)
    tail[np.argsort(-p, kind="stable")[:head]] = False
    return tail


def tail_exposure(lists, num_items: int, popularity, head_fraction: float = HEAD_FRACTION,
                  k: int | None = None) -> float:
    """Share of the exposure (entries of ``lists``) that goes to :func:`tail_items` of
    ``popularity [num_items]``. NaN when ``lists`` hold no item."""
    c = exposure_counts(lists, num_items, k)
    tail = tail_items(_check_popularity(popularity, num_items), head_fraction)
    return float(c[tail].sum() / c.sum()) if c.sum() else float("nan")


def novelty(lists, num_items: int, popularity, k: int | None = None) -> float:
    """Mean over the entries of ``lists`` of ``-log2 p(i)``, ``p(i) = (popularity[i] + 1) /
    (popularity.sum() + num_items)`` (``popularity [num_items]``: training counts, add-one
    smoothed). NaN when ``lists`` hold no item."""
    c = exposure_counts(lists, num_items, k)
    return _novelty(c, _check_popularity(popularity, num_items))


def exposure_metrics(lists, num_items: int, ks: Sequence[int], popularity=None, *,
                     head_fraction: float = HEAD_FRACTION) -> dict:
    """``entropy@K``, ``entropy_norm@K`` and ``gini@K`` of ``lists`` (as in :func:`exposure_counts`)
    for every K of ``ks``, and with ``popularity [num_items]`` (training counts) also
    ``tail_exposure@K`` and ``novelty@K`` (see the module's docstring; ``coverage@K`` is
    :func:`topk_metrics`')."""
    if len(ks) == 0:
        raise ValueError("ks must name at least one K")
    tail = pop = None
    if popularity is not None:
        pop = _check_popularity(popularity, _check_num_items(num_items))
        tail = tail_items(pop, head_fraction)
    out: dict[str, float] = {}
    for k in sorted(int(k) for k in ks):
        c = exposure_counts(lists, num_items, k)
        out[f"entropy@{k}"] = _entropy(c, False)
        out[f"entropy_norm@{k}"] = _entropy(c, True)
        out[f"gini@{k}"] = _gini(c)
        if pop is not None:
            out[f"tail_exposure@{k}"] = float(c[tail].sum() / c.sum()) if c.sum() else float("nan")
            out[f"novelty@{k}"] = _novelty(c, pop)
    return out
