"""plumrec.metrics: recall / NDCG / coverage of ranked lists, target ranks and paired differences, and the
exposure measures (coverage, entropy and Gini of the aggregate exposure, tail exposure, novelty), against values
worked out by hand and a brute-force oracle on random lists; bad input names the argument."""
from __future__ import annotations

import math

import exposure_oracle as oracle
import numpy as np
import pytest

from plumrec.metrics import (
    HEAD_FRACTION,
    coverage,
    drop_history,
    evaluate_lists,
    exposure_counts,
    exposure_entropy,
    exposure_gini,
    exposure_metrics,
    item_popularity,
    novelty,
    paired_difference,
    per_user_metric,
    tail_exposure,
    tail_items,
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


# exposure: 3 users' top-3 lists over M = 6 items, one padded; training counts of the 6 items
LISTS = np.array([[0, 1, 2], [0, 1, 3], [0, 4, -1]])
POP = np.array([10, 5, 0, 3, 1, 1])  # head (ceil(0.2 * 6) = 2 items): 0 and 1; tail: 2, 3, 4, 5


def test_exposure_measures_by_hand():
    # counts [3, 2, 1, 1, 1, 0] over 8 entries
    assert exposure_counts(LISTS, 6).tolist() == [3, 2, 1, 1, 1, 0]
    assert exposure_counts(LISTS, 6, k=1).tolist() == [3, 0, 0, 0, 0, 0]
    assert coverage(LISTS, 6) == pytest.approx(5 / 6) and coverage(LISTS, 6, k=2) == pytest.approx(3 / 6)
    d = np.array([3, 2, 1, 1, 1]) / 8
    h = -(d * np.log(d)).sum()
    assert exposure_entropy(LISTS, 6) == pytest.approx(h)
    assert exposure_entropy(LISTS, 6, normalized=True) == pytest.approx(h / math.log(6))
    # sorted x = 0,1,1,1,2,3; sum (2i - 7) x_i = -5*0 - 3 - 1 + 1 + 3*2 + 5*3 = 18; / (6 * 8)
    assert exposure_gini(LISTS, 6) == pytest.approx(18 / 48)
    assert tail_items(POP).tolist() == [False, False, True, True, True, True]
    assert tail_exposure(LISTS, 6, POP) == pytest.approx(3 / 8)
    assert tail_exposure(LISTS, 6, POP, head_fraction=0.0) == 1.0
    assert tail_exposure(LISTS, 6, POP, head_fraction=1.0) == 0.0
    # p(i) = (count + 1) / (20 + 6)
    info = [-math.log2((c + 1) / 26) for c in POP]
    assert novelty(LISTS, 6, POP) == pytest.approx((3 * info[0] + 2 * info[1] + info[2] + info[3] + info[4]) / 8)
    # ragged lists give the same as the padded array
    ragged = [[0, 1, 2], [0, 1, 3], [0, 4]]
    assert exposure_gini(ragged, 6) == exposure_gini(LISTS, 6) and novelty(ragged, 6, POP) == novelty(LISTS, 6, POP)


def test_tail_items_breaks_ties_by_index_and_rounds_the_head_up():
    assert tail_items([1, 3, 3, 0, 3], head_fraction=0.4).tolist() == [True, False, False, True, True]
    assert tail_items([1, 3, 3, 0, 3], head_fraction=0.3).tolist() == [True, False, False, True, True]
    assert tail_items(np.arange(10), head_fraction=0.7).sum() == 3
    assert HEAD_FRACTION == 0.2 and tail_items(np.arange(10.0)).tolist() == [True] * 8 + [False] * 2


def test_same_list_for_everyone_and_uniform_exposure():
    """Everyone gets the same K of M items: coverage K/M, entropy ln K, Gini 1 - K/M. Every item shown
    equally often: Gini 0, entropy ln M (normalised 1), coverage 1."""
    M, K, N = 50, 10, 37
    same = np.tile(np.arange(5, 5 + K), (N, 1))
    assert coverage(same, M) == pytest.approx(K / M)
    assert exposure_entropy(same, M) == pytest.approx(math.log(K))
    assert exposure_gini(same, M) == pytest.approx(1 - K / M)
    uniform = np.arange(M * 4).reshape(20, 10) % M  # each item 4 times
    assert coverage(uniform, M) == 1.0 and exposure_gini(uniform, M) == pytest.approx(0.0, abs=1e-12)
    assert exposure_entropy(uniform, M) == pytest.approx(math.log(M))
    assert exposure_entropy(uniform, M, normalized=True) == pytest.approx(1.0)
    assert exposure_gini([[3]], M) == pytest.approx(1 - 1 / M)  # all exposure on one item: the maximum


@pytest.mark.parametrize("seed, ragged", [(0, False), (1, True), (2, False), (3, True)])
def test_exposure_measures_match_the_brute_force_oracle(seed, ragged):
    rng = np.random.default_rng(seed)
    M = int(rng.integers(5, 60))
    lists = oracle.random_lists(rng, int(rng.integers(1, 40)), M, int(rng.integers(1, 12)), ragged=ragged)
    pop = rng.integers(0, 6, M) if seed % 2 else rng.pareto(1.0, M) * 3  # ties (ints) and floats
    frac = float(rng.choice([0.0, 0.1, 0.2, 0.35, 0.5, 1.0]))
    for k in (None, 1, 3, 5):
        n = sum(oracle.counts(lists, M, k))
        assert coverage(lists, M, k) == pytest.approx(oracle.coverage(lists, M, k))
        if n == 0:
            assert math.isnan(exposure_entropy(lists, M, k)) and math.isnan(novelty(lists, M, pop, k))
            continue
        assert exposure_entropy(lists, M, k) == pytest.approx(oracle.entropy(lists, M, k))
        assert exposure_gini(lists, M, k) == pytest.approx(oracle.gini(lists, M, k))
        assert tail_exposure(lists, M, pop, frac, k) == pytest.approx(oracle.tail_exposure(lists, M, pop, frac, k))
        assert novelty(lists, M, pop, k) == pytest.approx(oracle.novelty(lists, M, pop, k))
    out = exposure_metrics(lists, M, (3, 5), pop, head_fraction=frac)
    if sum(oracle.counts(lists, M, 5)):
        assert out["gini@5"] == pytest.approx(oracle.gini(lists, M, 5))
        assert out["entropy_norm@5"] == pytest.approx(oracle.entropy(lists, M, 5) / math.log(M))
        assert out["tail_exposure@5"] == pytest.approx(oracle.tail_exposure(lists, M, pop, frac, 5))
        assert out["novelty@5"] == pytest.approx(oracle.novelty(lists, M, pop, 5))


def test_evaluate_lists_adds_the_exposure_measures():
    out = evaluate_lists(RANKED, TARGETS, 6, (2, 3), popularity=POP)
    assert out["coverage@3"] == pytest.approx(5 / 6) and out["users"] == 3 and out["recall@3"] == pytest.approx(2 / 3)
    assert out["gini@3"] == pytest.approx(exposure_gini(RANKED, 6, 3))
    assert out["novelty@2"] == pytest.approx(novelty(RANKED, 6, POP, 2))
    assert out["tail_exposure@3"] == pytest.approx(tail_exposure(RANKED, 6, POP, k=3))
    bare = evaluate_lists(RANKED, TARGETS, 6, (2, 3))
    assert "entropy@3" in bare and "novelty@3" not in bare and "tail_exposure@3" not in bare
    empty = evaluate_lists([np.zeros(0, np.int64)] * 3, TARGETS, 6, (2,), popularity=POP, nonfinite=3)
    assert empty["coverage@2"] == 0.0 and math.isnan(empty["entropy@2"]) and math.isnan(empty["novelty@2"])


def test_item_popularity_counts_the_training_sequences():
    assert item_popularity([np.array([0, 2, 2]), np.array([], np.int64), np.array([4])], 6).tolist() == [
        1, 0, 2, 0, 1, 0]


@pytest.mark.parametrize("call, match", [
    (lambda: coverage(np.array([0, 1]), 6), "lists must be an int array"),
    (lambda: coverage([[0, 1], [[2]]], 6), "lists must be an int array"),
    (lambda: coverage(np.array([[0.0, 1.0]]), 6), "lists must hold integer"),
    (lambda: coverage([[0, 6]], 6), r"lists must hold item indices in \[0, 6\)"),
    (lambda: coverage([[0, -2]], 6), "lists must hold item indices"),
    (lambda: coverage([[0]], 0), "num_items must be a positive int"),
    (lambda: coverage([[0]], 6, k=0), "k must be None or an int >= 1"),
    (lambda: novelty(LISTS, 6, POP[:5]), "popularity must be a numeric"),
    (lambda: novelty(LISTS, 6, -POP), "popularity must hold finite, non-negative"),
    (lambda: tail_exposure(LISTS, 6, POP, head_fraction=1.5), "head_fraction must be a number in"),
    (lambda: tail_items(np.ones((2, 3))), "popularity must be 1-D"),
    (lambda: exposure_metrics(LISTS, 6, ()), "ks must name at least one K"),
    (lambda: item_popularity([[0, 7]], 6), "sequences must hold item indices"),
])
def test_exposure_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
