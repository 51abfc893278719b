"""The popularity baseline: the items most frequent in the training sequences, for everyone."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from plumrec.metrics import drop_history, evaluate_lists
from plumrec.sequences import check_histories

__all__ = ["Popularity"]


class Popularity:
    """Recommends the items most frequent in the training sequences to everyone (ties: lower index)."""

    def __init__(self, sequences: Sequence[np.ndarray], num_items: int):
        check_histories(sequences, num_items, "sequences")
        counts = np.bincount(np.concatenate([np.asarray(s, np.int64) for s in sequences] or [np.zeros(0, np.int64)]),
                             minlength=num_items)
        self.num_items = num_items
        self.ranking = np.argsort(-counts, kind="stable")

    def recommend(self, histories: Sequence[np.ndarray], k: int, *, exclude_history: bool = False) -> list[np.ndarray]:
        """The ``k`` most popular items (``exclude_history``: the most popular ones not in each history)."""
        check_histories(histories, self.num_items, "histories")
        if not exclude_history:
            return [self.ranking[:k].copy() for _ in histories]
        return [drop_history(self.ranking[:k + len(np.unique(h))], h)[:k] for h in histories]

    def evaluate(self, histories, targets, ks=(5, 10), *, exclude_history: bool = False, return_ranks: bool = False,
                 popularity=None):
        """Recall/NDCG/coverage@K and the exposure measures (``popularity [M]``: training item counts, see
        :func:`~plumrec.metrics.exposure_metrics`); ``return_ranks``: ``(metrics, per-user target ranks)``."""
        return evaluate_lists(self.recommend(histories, max(ks), exclude_history=exclude_history), targets,
                              self.num_items, ks, return_ranks=return_ranks, popularity=popularity)
