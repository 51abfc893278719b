"""plumrec.baselines.Popularity: the most frequent training items for everyone (ties: lower index), with
and without the history-excluded protocol; bad input names the argument."""
from __future__ import annotations

import numpy as np
import pytest

from plumrec.baselines.popularity import Popularity

SEQS = [np.array([2, 2, 5]), np.array([5, 1, 2]), np.array([0, 5])]  # counts: 2 -> 3, 5 -> 3, 0 -> 1, 1 -> 1


def test_ranking_and_ties():
    pop = Popularity(SEQS, num_items=7)
    assert [r.tolist() for r in pop.recommend([np.array([0])] * 2, 4)] == [[2, 5, 0, 1]] * 2


def test_exclude_history_skips_each_users_items():
    pop = Popularity(SEQS, num_items=7)
    recs = pop.recommend([np.array([2, 2]), np.array([5, 0])], 3, exclude_history=True)
    assert [r.tolist() for r in recs] == [[5, 0, 1], [2, 1, 3]]


def test_evaluate_matches_the_lists():
    pop = Popularity(SEQS, num_items=7)
    out = pop.evaluate([np.array([1])] * 3, [2, 5, 6], ks=(1, 2))
    assert out["recall@1"] == pytest.approx(1 / 3) and out["recall@2"] == pytest.approx(2 / 3)
    assert out["invalid_rate"] == 0.0


@pytest.mark.parametrize("seqs", [[np.array([0, 7])], [np.array([-1])]])
def test_out_of_range_items_are_refused(seqs):
    with pytest.raises(ValueError, match="sequences"):
        Popularity(seqs, num_items=7)
    with pytest.raises(ValueError, match="histories"):
        Popularity(SEQS, num_items=7).recommend(seqs, 2)
