"""The fit over a set of users: the trie oracle and the dense oracle give the same fit; with lam = 0 the
fit's lists are the plain constrained beam search's, list for list (the kernels' reference on a trie of a
few hundred items, and Triton under the interpreter on a small one); a served list is drawn by the
mixture's weights, seeded per user; the argument errors."""
from __future__ import annotations

import numpy as np
import pytest
from explore_oracle import beam_lists, make_instance

from plumrec.explore.fit import fit_maxent, sample_list
from plumrec.explore.objective import Regulariser
from plumrec.explore.trie import TriePaths, edge_log_softmax


@pytest.fixture(scope="module")
def inst():
    trie, codes, logits, scores = make_instance(6, num_sids=300, collisions=40)
    return trie, logits, scores, edge_log_softmax(TriePaths(trie), logits)


@pytest.mark.parametrize("kind", ["entropy", "kl"])
def test_trie_fit_is_the_dense_fit(inst, kind):
    trie, _, scores, lp = inst
    target = np.arange(1.0, trie.num_items + 1) ** 0.5
    reg = Regulariser.entropy(1e-3) if kind == "entropy" else Regulariser.kl(target, 1e-3)
    a = fit_maxent(scores, lam=1.5, k=3, iters=25, regulariser=reg, progress=False)
    b = fit_maxent(trie=trie, edge_logprobs=lp, lam=1.5, k=3, iters=25, regulariser=reg, progress=False)
    assert np.array_equal(a.lists, b.lists)
    np.testing.assert_allclose(a.weights, b.weights, rtol=1e-12)
    np.testing.assert_allclose(a.objectives, b.objectives, rtol=1e-12)
    np.testing.assert_allclose(a.gaps, b.gaps, rtol=1e-9, atol=1e-12)


def test_users_pick_rows(inst):
    trie, _, scores, lp = inst
    users = [4, 0, 2]
    a = fit_maxent(trie=trie, edge_logprobs=lp, users=users, lam=1.0, k=2, iters=10, progress=False)
    b = fit_maxent(scores[users], lam=1.0, k=2, iters=10, progress=False)
    assert a.num_users == 3 and np.array_equal(a.lists, b.lists)


def test_lam_zero_is_the_plain_beam_search(inst):
    trie, logits, _, lp = inst
    assert trie.num_sids <= 512
    mix = fit_maxent(trie=trie, edge_logprobs=lp, lam=0.0, k=5, iters=20, progress=False)
    assert len(mix.weights) == 1
    assert np.array_equal(mix.lists[0], beam_lists(trie, logits, 5, 512))


def test_lam_zero_is_the_plain_beam_search_triton_interpreter():
    trie, _, logits, _ = make_instance(7, num_users=2, sizes=(6, 3, 3, 3), num_sids=30, collisions=6)
    assert trie.num_sids <= 16
    lp = edge_log_softmax(TriePaths(trie), logits)
    mix = fit_maxent(trie=trie, edge_logprobs=lp, lam=0.0, k=3, iters=5, progress=False)
    assert np.array_equal(mix.lists[0], beam_lists(trie, logits, 3, 16, impl="triton"))


def test_progress_bar_shows_the_gap(inst, capsys):
    _, _, scores, _ = inst
    fit_maxent(scores, lam=1.0, k=2, iters=3, progress=True)
    err = capsys.readouterr().err
    assert "maxent Frank-Wolfe" in err and "gap=" in err


def test_sample_list(inst):
    _, _, scores, _ = inst
    mix = fit_maxent(scores, lam=2.0, k=3, iters=12, regulariser=Regulariser.entropy(1e-3), progress=False)
    assert len(mix.weights) > 2
    assert np.array_equal(sample_list(mix, 1, seed=3), sample_list(mix, 1, seed=3))
    draws = [sample_list(mix, 0, seed=s) for s in range(3000)]
    found = np.array([[np.array_equal(x, mix.lists[t, 0]) for t in range(len(mix.weights))] for x in draws])
    assert (found.sum(1) >= 1).all()
    # per-component frequency of user 0's lists (components may share user 0's list)
    seen = {}
    for t, w in enumerate(mix.weights):
        seen[mix.lists[t, 0].tobytes()] = seen.get(mix.lists[t, 0].tobytes(), 0.0) + w
    freq = {key: np.mean([x.tobytes() == key for x in draws]) for key in seen}
    for key, w in seen.items():
        assert abs(freq[key] - w) < 4 * np.sqrt(w * (1 - w) / 3000) + 1e-9
    for user in (-1, 6 * 10, 1.0, True):
        with pytest.raises(ValueError, match="user"):
            sample_list(mix, user)
    for seed in (-1, 1.5):
        with pytest.raises(ValueError, match="seed"):
            sample_list(mix, 0, seed)


def test_bad_arguments(inst):
    trie, _, scores, lp = inst
    with pytest.raises(ValueError, match="either scores"):
        fit_maxent(lam=1.0, k=2, iters=2)
    with pytest.raises(ValueError, match="either scores"):
        fit_maxent(scores, trie=trie, edge_logprobs=lp, lam=1.0, k=2, iters=2)
    with pytest.raises(ValueError, match="SIDTrie"):
        fit_maxent(trie="trie", edge_logprobs=lp, lam=1.0, k=2, iters=2)
    with pytest.raises(ValueError, match="edge_logprobs .* is required"):
        fit_maxent(trie=trie, lam=1.0, k=2, iters=2)
    with pytest.raises(ValueError, match="edge_logprobs must be"):
        fit_maxent(trie=trie, edge_logprobs=lp[:, 1:], lam=1.0, k=2, iters=2)
    with pytest.raises(ValueError, match="2-D"):
        fit_maxent(scores[0], lam=1.0, k=2, iters=2)
    for users in ([], [[0]], [scores.shape[0]], [-1]):
        with pytest.raises(ValueError, match="users"):
            fit_maxent(scores, users=users, lam=1.0, k=2, iters=2, progress=False)
    with pytest.raises(ValueError, match="iters"):
        fit_maxent(scores, lam=1.0, k=2, iters="2", progress=False)
