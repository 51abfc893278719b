"""Frank-Wolfe over mixtures of top-K lists, exact on small cases: the iterates' objective against the optimum
of an independent solver (spectral projected gradient over every user's capped simplex), the duality gap
as a certificate at every iteration, the O(1/t) rate, lam = 0, the exposure's entropy (or KL to a target)
as lam grows, and the argument errors. Instances: random SID tries with explicit per-edge logits."""
from __future__ import annotations

import numpy as np
import pytest
from explore_oracle import make_instance, solve

from plumrec.explore.frank_wolfe import Mixture, dense_oracle, frank_wolfe
from plumrec.explore.objective import Regulariser, objective, target_exposure


def _entropy(d):
    d = d[d > 0]
    return float(-np.sum(d * np.log(d)))


@pytest.fixture(scope="module")
def inst():
    return make_instance(2)


@pytest.mark.parametrize("lam, sigma, k, kl", [(0.5, 1e-3, 3, False), (2.0, 1e-2, 2, False), (5.0, 1e-3, 4, False),
                                               (1.5, 1e-3, 3, True)])
def test_converges_to_the_optimum_with_a_certified_gap(inst, lam, sigma, k, kl):
    trie, _, _, scores = inst
    M, T = trie.num_items, 300
    target = target_exposure("popularity", M, np.random.default_rng(0).integers(1, 30, M), 0.7) if kl else None
    reg = Regulariser.kl(target, sigma) if kl else Regulariser.entropy(sigma)
    log_target = None if target is None else np.log(target)
    q_star, f_star, solver_gap = solve(scores, lam, k, sigma, log_target)
    assert solver_gap < 1e-9                          # F* lies in [f_star, f_star + solver_gap]
    mix = frank_wolfe(scores, k=k, lam=lam, iters=T, regulariser=reg)
    assert len(mix.gaps) == len(mix.objectives) == T + 1
    h = f_star - mix.objectives                        # <= F* - F(q_t)
    assert (mix.gaps >= h - 1e-12).all()               # the gap certifies every iterate
    assert (mix.objectives <= f_star + solver_gap + 1e-12).all()
    assert h[-1] <= mix.gaps[-1] and h[-1] < 2e-3 * (1 + abs(f_star))
    assert mix.objectives[-1] == pytest.approx(objective(scores, mix.exposure(), lam, k, reg), abs=1e-10)
    # O(1/t): (t + 2) times the best gap so far (and the suboptimality) stays below its early level
    t = np.arange(T + 1)
    scaled_gap = (t + 2) * np.minimum.accumulate(mix.gaps)
    assert scaled_gap[T // 2:].max() <= scaled_gap[1:11].max()
    assert ((t + 2) * h)[T // 2:].max() <= ((t + 2) * h)[1:11].max()


def test_line_search_rises_monotonically(inst):
    trie, _, _, scores = inst
    reg = Regulariser.entropy(1e-3)
    _, f_star, _ = solve(scores, 1.0, 3, 1e-3)
    mix = frank_wolfe(scores, k=3, lam=1.0, iters=150, step="line", regulariser=reg)
    assert (np.diff(mix.objectives) >= -1e-12).all()
    assert (mix.gaps >= f_star - mix.objectives - 1e-12).all()
    assert f_star - mix.objectives[-1] < 0.02


def test_lam_zero_is_the_plain_top_k(inst):
    _, _, _, scores = inst
    mix = frank_wolfe(scores, k=4, lam=0.0, iters=50)
    assert len(mix.weights) == 1 and mix.weights[0] == 1.0 and mix.gaps.tolist() == [0.0]
    assert np.array_equal(mix.lists[0], np.argsort(-scores, 1, kind="stable")[:, :4])


def test_mixture_exposure(inst):
    trie, _, _, scores = inst
    mix = frank_wolfe(scores, k=3, lam=1.0, iters=20, regulariser=Regulariser.entropy(1e-3))
    assert isinstance(mix, Mixture) and mix.weights.sum() == pytest.approx(1.0) and (mix.weights > 0).all()
    q = mix.exposure()
    np.testing.assert_allclose(q.sum(1), 3.0)
    assert q.min() >= 0 and q.max() <= 1 + 1e-12
    np.testing.assert_allclose(mix.aggregate(), q.sum(0) / (q.shape[0] * 3), atol=1e-14)
    assert mix.d.shape == mix.bias.shape == (len(mix.weights), trie.num_items)
    assert len({lists.tobytes() for lists in mix.lists}) == len(mix.weights)


def test_entropy_tends_to_the_reachable_maximum():
    """All items allowed: the uniform exposure is reachable and the entropy tends to ``log M`` as lam grows.
    User 0 allowed only its K first items: the maximum is the water-filling of the others' exposure."""
    trie, _, _, scores = make_instance(3, num_users=4)
    N, M, k = scores.shape[0], trie.num_items, 3
    reg = Regulariser.entropy(1e-6)
    gaps = [np.log(M) - _entropy(frank_wolfe(scores, k=k, lam=lam, iters=300, regulariser=reg).aggregate())
            for lam in (0.0, 0.3, 3.0, 30.0, 300.0)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 2e-3
    restricted = scores.copy()
    restricted[0, k:] = -np.inf
    level = (N - 1) * k / (M - k) / (N * k)          # < 1 / (N k): user 0's items stay above it
    best = -k / (N * k) * np.log(1 / (N * k)) - (M - k) * level * np.log(level)
    mix = frank_wolfe(restricted, k=k, lam=300.0, iters=300, regulariser=reg)
    assert (mix.lists[:, 0] < k).all()
    assert 0 <= best - _entropy(mix.aggregate()) < 2e-3


def test_kl_to_a_popularity_target():
    trie, _, _, scores = make_instance(3, num_users=4)
    M, k = trie.num_items, 3
    target = target_exposure("popularity", M, np.random.default_rng(1).integers(1, 50, M), 0.5)
    assert target.max() < 1 / k                        # reachable: d(i) <= 1 / K

    def kl(d):
        on = d > 0
        return float(np.sum(d[on] * np.log(d[on] / target[on])))

    kls = [kl(frank_wolfe(scores, k=k, lam=lam, iters=300, regulariser=Regulariser.kl(target, 1e-6)).aggregate())
           for lam in (0.0, 3.0, 30.0, 300.0)]
    assert all(a > b for a, b in zip(kls, kls[1:])) and kls[-1] < 3e-3
    entropy_fit = frank_wolfe(scores, k=k, lam=300.0, iters=300, regulariser=Regulariser.entropy(1e-6))
    assert kl(entropy_fit.aggregate()) > 10 * kls[-1]   # the target, not the uniform exposure


def test_oracle_with_lists_and_scores(inst):
    _, _, _, scores = inst
    dense = dense_oracle(scores, 3)

    def oracle(bias, d):
        lists = dense(bias, d)
        return lists, np.take_along_axis(scores, lists, 1)

    a = frank_wolfe(scores, k=3, lam=1.0, iters=30, regulariser=Regulariser.entropy(1e-3))
    b = frank_wolfe(None, k=3, lam=1.0, iters=30, oracle=oracle, num_users=scores.shape[0],
                    num_items=scores.shape[1], regulariser=Regulariser.entropy(1e-3))
    np.testing.assert_allclose(a.objectives, b.objectives, rtol=1e-13)
    np.testing.assert_allclose(a.gaps, b.gaps, rtol=1e-10, atol=1e-13)
    assert np.array_equal(a.lists, b.lists)


def test_tol_stops_early(inst):
    _, _, _, scores = inst
    seen = []
    mix = frank_wolfe(scores, k=3, lam=1.0, iters=500, tol=0.05, regulariser=Regulariser.entropy(1e-3),
                      callback=lambda t, g, f: seen.append((t, g, f)))
    assert mix.gaps[-1] <= 0.05 and (mix.gaps[:-1] > 0.05).all() and len(seen) == len(mix.gaps) < 501
    assert [s[1] for s in seen] == mix.gaps.tolist()


def test_bad_arguments(inst):
    _, _, _, scores = inst
    N, M = scores.shape
    for kwargs, match in [(dict(iters=-1), "iters"), (dict(iters=2.0), "iters"), (dict(step="exact"), "step"),
                          (dict(k=0), "k must be"), (dict(k=M + 1), "k must be"), (dict(lam=-1.0), "lam"),
                          (dict(regulariser="entropy"), "Regulariser"),
                          (dict(regulariser=Regulariser.entropy(0.0)), "smoothing > 0")]:
        args = dict(k=2, lam=1.0, iters=3) | kwargs
        with pytest.raises(ValueError, match=match):
            frank_wolfe(scores, **args)
    with pytest.raises(ValueError, match="num_users and num_items"):
        frank_wolfe(None, k=2, lam=1.0, iters=3, oracle=dense_oracle(scores, 2))
    with pytest.raises(ValueError, match="pass scores, or an oracle"):
        frank_wolfe(None, k=2, lam=1.0, iters=3, num_users=N, num_items=M)
    with pytest.raises(ValueError, match="expected \\[N, K\\]"):
        frank_wolfe(scores, k=2, lam=1.0, iters=3, oracle=lambda b, d: np.zeros((N, 3), np.int64))
    with pytest.raises(ValueError, match="scores of the lists"):
        frank_wolfe(None, k=2, lam=1.0, iters=3, oracle=dense_oracle(scores, 2), num_users=N, num_items=M)
    with pytest.raises(ValueError, match="fewer than k"):
        dense_oracle(np.full((2, 3), -np.inf), 1)
    assert frank_wolfe(scores, k=2, lam=0.0, iters=3, regulariser=Regulariser.entropy(0.0)).gaps[0] == 0.0
