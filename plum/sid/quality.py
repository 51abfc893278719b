"""Quality report of a set of Semantic IDs.

:func:`sid_quality` measures, for codes ``[N, L]``:

- **uniqueness**: the share of items whose full SID no other item has
  (PLUM's "uniqueness"); ``max_items_per_sid`` is the largest collision;
- **utilisation** per level: the share of level l's ``V_l`` codes used by at
  least one item;
- **reconstruction error** (passed in by the tokenizer; relative squared
  error of the decoded content embeddings, see
  :meth:`SemanticIdTokenizer.reconstruction_error`);
- **retrieval proxy** (needs ``cooccurrence``): for pairs ``(a, b)`` of items
  engaged together, e.g. held-out ``(previous item, next item)`` transitions,
  ``prefix_share[l]`` is the share of pairs whose SIDs agree on the first
  ``l + 1`` levels. ``random_prefix_share[l]`` is the same share for
  popularity-matched random pairs: the first items of the pairs against the
  second items of the pairs shuffled (a fixed-seed permutation), so a SID
  that only groups popular items scores no better than chance.
  ``prefix_lift[l] = prefix_share[l] / random_prefix_share[l]``.
  Read it as: if a generative retriever got the previous item's first
  ``l + 1`` tokens right, how often would the next item be in that branch
  of the trie, compared with chance. Higher share and lift are better;
  the level-1 and level-2 figures are the ones the benchmark reports.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

__all__ = ["SIDQuality", "first_level_purity", "sid_quality"]


@dataclass(frozen=True)
class SIDQuality:
    num_items: int
    uniqueness: float
    max_items_per_sid: int
    utilisation: tuple[float, ...]
    reconstruction_error: float | None = None
    num_pairs: int = 0
    prefix_share: tuple[float, ...] | None = None
    random_prefix_share: tuple[float, ...] | None = None

    @property
    def prefix_lift(self) -> tuple[float, ...] | None:
        if self.prefix_share is None:
            return None
        return tuple(s / r if r > 0 else float("inf") for s, r in zip(self.prefix_share, self.random_prefix_share))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["prefix_lift"] = self.prefix_lift
        return d

    def __str__(self) -> str:
        util = ", ".join(f"{u:.1%}" for u in self.utilisation)
        s = (f"SIDs of {self.num_items} items: uniqueness {self.uniqueness:.2%} "
             f"(largest collision {self.max_items_per_sid}), utilisation per level [{util}]")
        if self.reconstruction_error is not None:
            s += f", reconstruction error {self.reconstruction_error:.4f}"
        if self.prefix_share is not None:
            s += (f"; co-engaged pairs ({self.num_pairs}) sharing level-1 code "
                  f"{self.prefix_share[0]:.3f} vs random {self.random_prefix_share[0]:.3f}")
            if len(self.prefix_share) > 1:
                s += (f", level-1..2 prefix {self.prefix_share[1]:.4f} vs random "
                      f"{self.random_prefix_share[1]:.4f}")
        return s


def sid_quality(
    codes,
    codebook_sizes: Sequence[int],
    *,
    cooccurrence=None,
    reconstruction_error: float | None = None,
    seed: int = 0,
) -> SIDQuality:
    """Quality of SIDs ``codes [N, L]`` (see the module docstring).

    Args:
        codes: int ``[N, L]``, level l's codes in ``[0, codebook_sizes[l])``.
        codebook_sizes: ``V_l`` per level.
        cooccurrence: optional ``[P, 2]`` item-index pairs for the proxy.
        reconstruction_error: reported as given.
        seed: seed of the permutation that makes the random pairs.
    """
    codes = np.asarray(codes)
    sizes = tuple(int(v) for v in codebook_sizes)
    if codes.ndim != 2 or codes.shape[1] != len(sizes):
        raise ValueError(f"codes must have shape [N, {len(sizes)}] (one column per level), got {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise TypeError(f"codes must be integers, got dtype {codes.dtype}")
    n = codes.shape[0]
    if n == 0:
        raise ValueError("codes: the catalogue is empty (0 items)")
    for l, v in enumerate(sizes):
        if codes[:, l].min() < 0 or codes[:, l].max() >= v:
            raise ValueError(f"codes[:, {l}] must be in [0, {v}), got range "
                             f"[{codes[:, l].min()}, {codes[:, l].max()}]")
    if np.prod([float(v) for v in sizes]) < 2.0**62:  # one int64 key per SID: a 1-D sort, 10M SIDs in seconds
        key = np.zeros(n, np.int64)
        for l, v in enumerate(sizes):
            key = key * v + codes[:, l]
        _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    else:
        _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    uniqueness = float((counts[inverse] == 1).mean())
    utilisation = tuple(len(np.unique(codes[:, l])) / v for l, v in enumerate(sizes))

    share = rand = None
    num_pairs = 0
    if cooccurrence is not None:
        pairs = np.asarray(cooccurrence)
        if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0:
            raise ValueError(f"cooccurrence must have shape [P, 2] with P > 0, got {pairs.shape}")
        if not np.issubdtype(pairs.dtype, np.integer):
            raise TypeError(f"cooccurrence must hold integer item indices, got dtype {pairs.dtype}")
        if pairs.min() < 0 or pairs.max() >= n:
            raise ValueError(f"cooccurrence names item {int(pairs.max() if pairs.max() >= n else pairs.min())}, "
                             f"but there are {n} items")
        num_pairs = len(pairs)
        a, b = codes[pairs[:, 0]], codes[pairs[:, 1]]
        b_rand = codes[pairs[np.random.default_rng(seed).permutation(num_pairs), 1]]
        eq = np.cumprod(a == b, axis=1).astype(bool)  # eq[:, l]: agree on levels 0..l
        eq_rand = np.cumprod(a == b_rand, axis=1).astype(bool)
        share = tuple(float(x) for x in eq.mean(0))
        rand = tuple(float(x) for x in eq_rand.mean(0))
    return SIDQuality(
        num_items=n,
        uniqueness=uniqueness,
        max_items_per_sid=int(counts.max()),
        utilisation=utilisation,
        reconstruction_error=reconstruction_error,
        num_pairs=num_pairs,
        prefix_share=share,
        random_prefix_share=rand,
    )


def first_level_purity(codes, labels) -> float:
    """Purity of the first SID level against known item classes (e.g. the clusters of a synthetic
    catalogue): each level-1 code is credited with the items of its most common class, over all items.
    1.0 when no code mixes classes; a code may hold a class split over several codes.

    Args:
        codes: int ``[N, L]`` SIDs (only ``codes[:, 0]`` is read).
        labels: int ``[N]`` class of each item, ``>= 0``.
    """
    first = np.asarray(codes)[:, 0].astype(np.int64)
    labels = np.asarray(labels).astype(np.int64)
    if labels.shape != first.shape or len(first) == 0:
        raise ValueError(f"labels must be [N] with N = len(codes) > 0, got {labels.shape} for {len(first)} codes")
    if first.min() < 0 or labels.min() < 0:
        raise ValueError("codes and labels must be >= 0")
    radix = int(labels.max()) + 1
    pairs, pair_counts = np.unique(first * radix + labels, return_counts=True)
    best = np.zeros(int(first.max()) + 1, np.int64)
    np.maximum.at(best, pairs // radix, pair_counts)
    return float(best.sum() / len(first))
