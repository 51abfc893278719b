"""The exploration objective: the regulariser's value and gradient against their formulas and finite
differences, the oracle's reward (``s + b``) against the objective's directional derivative, the targets,
and the argument errors."""
from __future__ import annotations

import numpy as np
import pytest

from plumrec.explore.objective import (
    Regulariser,
    check_k,
    check_lam,
    check_scores,
    exploration_bias,
    objective,
    target_exposure,
)


def _random_d(rng, m, zeros=3):
    d = rng.random(m)
    d[rng.choice(m, zeros, replace=False)] = 0.0
    return d / d.sum()


@pytest.mark.parametrize("sigma", [0.0, 1e-3])
def test_entropy_and_kl_values(sigma):
    rng = np.random.default_rng(0)
    d, t = _random_d(rng, 40), rng.random(40) + 0.1
    x = d + sigma
    plain = -sum(v * np.log(v) for v in x if v > 0)
    assert Regulariser.entropy(sigma).value(d) == pytest.approx(plain, rel=1e-12)
    tn = t / t.sum()
    kl = -sum(v * (np.log(v) - np.log(w)) for v, w in zip(x, tn) if v > 0)
    assert Regulariser.kl(t, sigma).value(d) == pytest.approx(kl, rel=1e-12)
    if sigma == 0:   # the plain entropy and KL of a distribution
        assert Regulariser.entropy(0).value(np.full(40, 1 / 40)) == pytest.approx(np.log(40), rel=1e-12)
        assert Regulariser.kl(t, 0).value(tn) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kl", [False, True])
def test_gradient_matches_finite_differences(kl):
    rng = np.random.default_rng(1)
    d = _random_d(rng, 30) + 0.01
    reg = Regulariser.kl(rng.random(30) + 0.1, 1e-4) if kl else Regulariser.entropy(1e-4)
    h = 1e-6
    fd = np.array([(reg.value(d + h * e) - reg.value(d - h * e)) / (2 * h) for e in np.eye(30)])
    np.testing.assert_allclose(reg.grad(d), fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kl", [False, True])
def test_oracle_reward_is_the_gradient(kl):
    """``<v - q, grad F(q)> = (1/N) sum_u <v_u - q_u, s_u + b>``: the directional derivative of ``F`` towards
    any vertex (finite differences) is the oracle's reward, so the top-K under ``s + b`` is the linear oracle."""
    rng = np.random.default_rng(2)
    N, M, k, lam = 5, 25, 3, 0.7
    scores = rng.normal(size=(N, M))
    reg = Regulariser.kl(rng.random(M) + 0.1, 1e-3) if kl else Regulariser.entropy(1e-3)
    q = np.stack([np.full(M, k / M) * (0.5 + rng.random(M)) for _ in range(N)])
    q = q / q.sum(1, keepdims=True) * k
    v = np.zeros((N, M))
    v[np.arange(N)[:, None], np.stack([rng.permutation(M)[:k] for _ in range(N)])] = 1.0
    d = q.sum(0) / (N * k)
    b = exploration_bias(d, lam, k, reg)
    h = 1e-6
    fd = (objective(scores, q + h * (v - q), lam, k, reg) - objective(scores, q - h * (v - q), lam, k, reg)) / (2 * h)
    assert np.sum((v - q) * (scores + b)) / N == pytest.approx(fd, rel=1e-6, abs=1e-8)
    np.testing.assert_allclose(b, (lam / k) * ((reg.log_target if kl else 0.0) - np.log(d + 1e-3)),
                               rtol=1e-12)
    assert not exploration_bias(d, 0.0, k, reg).any()


def test_objective_relevance_ignores_excluded_items():
    scores = np.array([[0.0, -np.inf, -1.0]])
    q = np.array([[1.0, 0.0, 1.0]])
    assert objective(scores, q, 0.0, 2, Regulariser.entropy()) == pytest.approx(-1.0)
    d = np.array([0.5, 0.0, 0.5])
    reg = Regulariser.entropy(0.0)
    assert objective(scores, q, 2.0, 2, reg) == pytest.approx(-1.0 + 2.0 * np.log(2))
    assert reg.value(d) == pytest.approx(np.log(2))


def test_target_exposure():
    assert np.array_equal(target_exposure("uniform", 4), np.full(4, 0.25))
    pop = np.array([1.0, 4.0, 9.0])
    np.testing.assert_allclose(target_exposure("popularity", 3, pop, 0.5), np.array([1, 2, 3]) / 6)
    np.testing.assert_allclose(target_exposure("popularity", 3, pop, -1.0), (1 / pop) / (1 / pop).sum())
    for kwargs, match in [(dict(kind="zipf", num_items=3), "kind"), (dict(kind="uniform", num_items=0), "num_items"),
                          (dict(kind="popularity", num_items=3), "popularity is required"),
                          (dict(kind="popularity", num_items=3, popularity=[1.0, 0.0, 2.0]), "positive"),
                          (dict(kind="popularity", num_items=2, popularity=pop), r"\[2\]"),
                          (dict(kind="popularity", num_items=3, popularity=pop, alpha=np.nan), "alpha")]:
        with pytest.raises(ValueError, match=match):
            target_exposure(**kwargs)


def test_bad_arguments():
    for lam in (-0.1, np.nan, np.inf, "x", None):
        with pytest.raises(ValueError, match="lam"):
            check_lam(lam)
    for k in (0, 6, 2.0, True, "2"):
        with pytest.raises(ValueError, match="k must be"):
            check_k(k, 5)
    assert check_k(np.int64(5), 5) == 5
    with pytest.raises(ValueError, match="2-D"):
        check_scores(np.zeros(3))
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        check_scores(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        check_scores(np.array([[0.0, np.inf]]))
    with pytest.raises(ValueError, match="users \\[1\\] have fewer than k = 2"):
        check_scores(np.array([[0.0, 1.0], [0.0, -np.inf]]), 2)
    for sigma in (-1e-3, np.nan):
        with pytest.raises(ValueError, match="smoothing"):
            Regulariser.entropy(sigma)
    for target in ([1.0, 0.0], [[1.0, 2.0]], [], [1.0, np.inf]):
        with pytest.raises(ValueError, match="target"):
            Regulariser.kl(target)
    with pytest.raises(ValueError, match="target has 2 items, the exposure 3"):
        Regulariser.kl([1.0, 2.0]).value(np.full(3, 1 / 3))
