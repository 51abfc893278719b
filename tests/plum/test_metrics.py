"""plumrec.metrics: recall / NDCG / coverage of ranked lists, target ranks and paired differences, against
values worked out by hand; bad input names the argument."""
from __future__ import annotations

import math

import numpy as np
import pytest

from plumrec.metrics import (
    drop_history,
    evaluate_lists,
    paired_difference,
    per_user_metric,
    target_ranks,
    topk_from_scores,
    topk_metrics,
)

RANKED = [np.array([3, 1, 2]), np.array([0, 4, 1]), np.array([2, 3, 4])]
TARGETS = [1, 1, 0]  # ranks 1, 2, absent


def test_topk_metrics_by_hand():
    out = topk_metrics(RANKED, TARGETS, num_items=6, ks=(1, 2, 3))
    assert out["recall@1"] == 0 and out["recall@2"] == pytest.approx(1 / 3) and out["recall@3"] == pytest.approx(2 / 3)
    assert out["ndcg@2"] == pytest.approx((1 / math.log2(3)) / 3)
    assert out["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert out["coverage@1"] == pytest.approx(3 / 6) and out["coverage@3"] == pytest.approx(5 / 6)
    assert out["users"] == 3


def test_ranks_and_per_user_metrics():
    ranks = target_ranks(RANKED, TARGETS, 3)
    np.testing.assert_array_equal(ranks, [1, 2, -1])
    np.testing.assert_array_equal(target_ranks(RANKED, TARGETS, 2), [1, -1, -1])
    np.testing.assert_allclose(per_user_metric(ranks, 3, "ndcg"), [1 / math.log2(3), 0.5, 0.0])
    full = evaluate_lists(RANKED, TARGETS, 6, (2, 3), invalid_rate=0.25, return_ranks=True)
    assert full[0]["invalid_rate"] == 0.25 and full[1].tolist() == [1, 2, -1]


def test_paired_difference_by_hand():
    a, b = np.array([0, -1, 3, -1]), np.array([0, 1, -1, 2])  # recall@3: a = 1,0,0,0  b = 1,1,0,1
    mean, se = paired_difference(a, b, 3)
    d = np.array([0, 1, 0, 1], float)
    assert mean == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / 2)


def test_topk_from_scores_breaks_ties_by_index_and_drop_history_keeps_order():
    scores = np.array([[0.5, 1.0, 1.0, 0.2], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(topk_from_scores(scores, 3)), [[1, 2, 0], [0, 1, 2]])
    np.testing.assert_array_equal(drop_history(np.array([5, 3, 1, 4]), [3, 4]), [5, 1])


@pytest.mark.parametrize("call, match", [
    (lambda: topk_metrics(RANKED, [1, 1], 6), "ranked has 3 lists but targets has 2"),
    (lambda: topk_metrics(RANKED, [1, 1, 6], 6), "targets must be item indices"),
    (lambda: topk_metrics(RANKED, TARGETS, 6, ks=(0,)), "ks must be >= 1"),
    (lambda: topk_metrics([], [], 6), "no users"),
    (lambda: target_ranks(RANKED, TARGETS, 0), "k must be >= 1"),
    (lambda: per_user_metric([0], 1, "mrr"), "metric must be"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_nonfinite_scores_are_refused_and_counted():
    """A NaN or +inf score names its rows (a NaN model must not rank silently); -inf (a masked item) is fine.
    ``evaluate_lists`` always reports ``nonfinite``, the count of users whose scores were not finite."""
    with pytest.raises(ValueError, match=r"not finite .* 2 row\(s\).*\[1, 3\]"):
        topk_from_scores(np.array([[0.1, 0.2], [np.nan, 0.0], [0.3, 0.1], [np.inf, 0.0]]), 1)
    assert topk_from_scores(np.array([[-np.inf, 0.2, -1.0]]), 2).tolist() == [[1, 2]]
    assert evaluate_lists(RANKED, TARGETS, 6, (2,))["nonfinite"] == 0
    out = evaluate_lists([RANKED[0], np.zeros(0, np.int64), RANKED[2]], TARGETS, 6, (2,), nonfinite=1)
    assert out["nonfinite"] == 1 and out["recall@2"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="nonfinite must be a non-negative int"):
        evaluate_lists(RANKED, TARGETS, 6, (2,), nonfinite=-1)
