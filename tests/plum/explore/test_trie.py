"""The exploration bias on the SID trie, against oracles that walk the trie by prefixes: the item paths, the
subtree masses (the kernel ``trie_aggregate``), the split of the exploration bias (every item's bias
recovered exactly, the collision rule), the trie oracle against the dense oracle, and the biased beam
search with the per-edge bias (the kernels' reference, and Triton under the interpreter on a small trie)
against the trie oracle, list for list."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from explore_oracle import beam_lists, edge_paths, make_instance

import plum_kernels.torch as K
from plumrec.explore.frank_wolfe import dense_oracle, frank_wolfe
from plumrec.explore.objective import Regulariser, exploration_bias
from plumrec.explore.trie import (
    BiasTables,
    TriePaths,
    bias_split,
    edge_log_softmax,
    expand_beams,
    exposure_edge_bias,
    mixture_bias_tables,
    path_log_ratios,
    subtree_mass,
    trie_oracle,
)
from plumrec.sid import build_trie


@pytest.fixture(scope="module")
def inst():
    """A trie of 228 items on 175 SIDs (collision groups of 2 and 3, chains entered at every level)."""
    trie, codes, logits, scores = make_instance(1, num_sids=300, collisions=40)
    return trie, codes, logits, scores, TriePaths(trie)


def _exposure(rng, m, zeros=20):
    d = rng.random(m) ** 3
    d[rng.choice(m, zeros, replace=False)] = 0.0
    return d / d.sum()


def _regs(rng, m):
    return [Regulariser.entropy(1e-4), Regulariser.kl(rng.random(m) + 0.05, 1e-3)]


def test_instance_has_chains_and_groups(inst):
    trie, codes, *_ = inst
    level = np.searchsorted(np.asarray(trie.edge_level_ptr), np.arange(trie.num_edges), side="right") - 1
    entries = np.asarray(trie.edge_word) >= 0
    assert all(entries[level == lvl].any() for lvl in range(trie.num_levels))
    sizes = np.diff(np.asarray(trie.dup_ptr))
    assert (sizes == 2).any() and (sizes == 3).any() and 150 <= trie.num_items <= 300


def test_paths_sids_and_sums(inst):
    trie, codes, logits, scores, paths = inst
    walked = edge_paths(trie, codes)
    for i in range(trie.num_items):
        assert paths.paths[i][paths.paths[i] >= 0].tolist() == walked[i]
        assert paths.item_edge[i] == walked[i][-1]
        group = trie.items(codes[i][None])[0].tolist()
        e = paths.item_edge[i]
        assert paths.sid_items[paths.sid_ptr[e]:paths.sid_ptr[e + 1]].tolist() == group
        assert group[paths.item_pos[i]] == i
    np.testing.assert_allclose(paths.sums(edge_log_softmax(paths, logits)), scores, rtol=0, atol=1e-12)


def test_subtree_mass_and_log_ratios(inst):
    trie, codes, _, _, paths = inst
    m = np.random.default_rng(0).random(trie.num_items)
    node, edge = subtree_mass(paths, m)
    walked = edge_paths(trie, codes)
    want = np.zeros(trie.num_edges)
    for i, path in enumerate(walked):
        want[path] += m[i]
    np.testing.assert_allclose(edge, want, rtol=1e-13)
    assert node[0] == pytest.approx(m.sum(), rel=1e-13)
    np.testing.assert_allclose(np.bincount(paths.parent, edge, trie.num_internal), node, rtol=1e-13)
    ratio, root = path_log_ratios(paths, m)
    sid_mass = np.bincount(paths.item_edge, m, trie.num_edges)[paths.item_edge]
    np.testing.assert_allclose(root + paths.sums(ratio), np.log(sid_mass), rtol=0, atol=1e-12)


def test_split_recovers_every_items_bias(inst):
    trie, _, _, _, paths = inst
    rng = np.random.default_rng(1)
    d = _exposure(rng, trie.num_items)
    for reg in _regs(rng, trie.num_items):
        split = exposure_edge_bias(paths, d, 1.7, 3, reg)
        b = exploration_bias(d, 1.7, 3, reg)
        np.testing.assert_allclose(split.values(paths), b, rtol=0, atol=1e-11)
        # the collision rule: a SID stands for its group's best item, the others keep a residual <= 0
        assert (split.item <= 0).all()
        for e in np.unique(paths.item_edge):
            group = paths.sid_items[paths.sid_ptr[e]:paths.sid_ptr[e + 1]]
            best = group[np.argmax(b[group])]
            assert split.item[best] == 0.0
            np.testing.assert_allclose(split.item[group], b[group] - b[best], rtol=0, atol=0)
        t = split.tensor()
        assert t.dtype == torch.float32 and t.shape == (trie.num_edges,)
    zero = exposure_edge_bias(paths, d, 0.0, 3, Regulariser.entropy())
    assert not zero.edge.any() and not zero.item.any() and zero.root == 0.0


def test_split_is_the_kernels_log_ratio_without_collisions():
    """Without collisions the edge bias is ``-(lam / K)`` times the kernel's ``log d(child) / d(parent)`` with
    the smoothing as the kernel's per-SID ``eps``."""
    trie, *_ = make_instance(5, num_sids=200, collisions=0)
    rng = np.random.default_rng(5)
    d = _exposure(rng, trie.num_items)
    split = exposure_edge_bias(trie, d, 2.0, 4, Regulariser.entropy(1e-3))
    agg = K.trie_aggregate(torch.from_numpy(d), trie.to_torch("cpu"), trie, eps=1e-3, impl="reference")
    np.testing.assert_allclose(split.edge, -(2.0 / 4) * agg.edge_bias.numpy(), rtol=1e-12, atol=1e-13)
    assert not split.item.any()


def test_trie_oracle_is_the_dense_oracle(inst):
    trie, _, logits, scores, paths = inst
    rng = np.random.default_rng(2)
    for reg in _regs(rng, trie.num_items):
        for lam, k in ((0.0, 5), (0.8, 5), (6.0, 2)):
            d = _exposure(rng, trie.num_items)
            b = exploration_bias(d, lam, k, reg)
            lists, rel = trie_oracle(paths, edge_log_softmax(paths, logits), k, lam, reg)(b, d)
            assert np.array_equal(lists, dense_oracle(scores, k)(b, d))
            np.testing.assert_allclose(rel, np.take_along_axis(scores, lists, 1), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="lam, k and regulariser"):
        trie_oracle(paths, edge_log_softmax(paths, logits), 5, 1.0, reg)(exploration_bias(d, 2.0, 5, reg), d)


def test_biased_beam_search_is_the_trie_oracle(inst):
    """Beams as wide as the SIDs: the kernels' beam search with the per-edge bias, expanded into items with
    the residuals, gives the trie oracle's lists, list for list (and :func:`expand_beams` does the expansion
    of the support oracle)."""
    trie, _, logits, _, paths = inst
    rng = np.random.default_rng(3)
    lp = edge_log_softmax(paths, logits)
    for reg in _regs(rng, trie.num_items):
        d = _exposure(rng, trie.num_items)
        split = exposure_edge_bias(paths, d, 3.0, 4, reg)
        want, _ = trie_oracle(paths, lp, 4, 3.0, reg)(exploration_bias(d, 3.0, 4, reg), d)
        got = beam_lists(trie, logits, 4, 512, split.edge, split.item)
        assert np.array_equal(got, want)
        assert (want != dense_oracle(paths.sums(lp), 4)(np.zeros(trie.num_items), d)).any()   # the bias acts


def test_biased_beam_search_triton_interpreter():
    trie, _, logits, _ = make_instance(4, num_users=2, sizes=(6, 3, 3, 3), num_sids=30, collisions=6)
    assert trie.num_sids <= 16
    paths = TriePaths(trie)
    d = _exposure(np.random.default_rng(4), trie.num_items, zeros=4)
    reg = Regulariser.entropy(1e-3)
    split = exposure_edge_bias(paths, d, 2.0, 3, reg)
    want, _ = trie_oracle(paths, edge_log_softmax(paths, logits), 3, 2.0, reg)(exploration_bias(d, 2.0, 3, reg), d)
    assert np.array_equal(beam_lists(trie, logits, 3, 16, split.edge, split.item, impl="triton"), want)


def test_expand_beams():
    codes = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [0, 1], [1, 1], [1, 1]])   # items 1/4, 3/5/6 collide
    trie = build_trie(codes, (2, 2))
    paths = TriePaths(trie)
    beams = np.array([[[1, 1], [0, 1], [0, 0], [1, 0]], [[1, 0], [0, 0], [-1, -1], [-1, -1]]])
    scores = np.array([[-1.0, -1.2, -3.0, -3.1], [-0.5, -0.7, -np.inf, -np.inf]])
    item_bias = np.array([0.0, -0.1, 0.0, -0.5, 0.0, 0.0, -0.05])
    got = expand_beams(paths, beams, scores, item_bias, 5)
    # user 0: 5 (-1.0), 6 (-1.05), 4 (-1.2), 1 (-1.3), 3 (-1.5); user 1: 2, 0, then nothing
    assert got.tolist() == [[5, 6, 4, 1, 3], [2, 0, -1, -1, -1]]
    assert expand_beams(paths, beams, scores, np.zeros(7), 3).tolist() == [[3, 5, 6], [2, 0, -1]]
    with pytest.raises(ValueError, match="codes must be"):
        expand_beams(paths, beams[..., :1], scores, item_bias, 3)
    with pytest.raises(ValueError, match="item_bias"):
        expand_beams(paths, beams, scores, item_bias[:3], 3)
    with pytest.raises(ValueError, match="k must be"):
        expand_beams(paths, beams, scores, item_bias, 0)


def test_mixture_bias_tables(inst):
    trie, _, _, scores, paths = inst
    reg = Regulariser.entropy(1e-3)
    mix = frank_wolfe(scores, k=3, lam=1.0, iters=6, regulariser=reg)
    tables = mixture_bias_tables(paths, mix)
    assert isinstance(tables, BiasTables) and tables.edge.dtype == np.float32
    assert tables.edge.shape == (len(mix.weights), trie.num_edges)
    assert tables.item.shape == (len(mix.weights), trie.num_items)
    np.testing.assert_array_equal(tables.weights, mix.weights)
    for t in range(len(mix.weights)):   # the tables stand for the bias that produced each component
        values = paths.sums(tables.edge[t].astype(np.float64)) + tables.item[t]
        shift = np.mean(mix.bias[t] - values)   # the root: a constant
        np.testing.assert_allclose(values + shift, mix.bias[t], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(np.argsort(-(scores + mix.bias[t]), 1, kind="stable")[:, :3], mix.lists[t])


def test_bias_split_is_the_plain_search_for_a_constant_bias(inst):
    trie, _, _, _, paths = inst
    M, reg = trie.num_items, Regulariser.entropy(1e-3)
    d = np.full(M, 1.0 / M)                 # Frank-Wolfe's start: a constant bias
    flat = bias_split(paths, exploration_bias(d, 1.0, 3, reg), d, 1.0, 3, reg)
    assert not flat.edge.any() and not flat.item.any()
    assert exposure_edge_bias(paths, d, 1.0, 3, reg).edge.any()   # the trie is unbalanced: a non-zero split
    d = _exposure(np.random.default_rng(3), M)
    bias = exploration_bias(d, 1.0, 3, reg)
    split, ref = bias_split(paths, bias, d, 1.0, 3, reg), exposure_edge_bias(paths, d, 1.0, 3, reg)
    np.testing.assert_array_equal(split.edge, ref.edge)
    np.testing.assert_array_equal(split.item, ref.item)
    with pytest.raises(ValueError, match="differs from bias"):
        bias_split(paths, bias, d, 2.0, 3, reg)
    with pytest.raises(ValueError, match="bias must be"):
        bias_split(paths, bias[:-1], d, 1.0, 3, reg)


def test_bad_arguments(inst):
    trie, _, logits, _, paths = inst
    M = trie.num_items
    with pytest.raises(ValueError, match="SIDTrie"):
        TriePaths("trie")
    sparse = build_trie(np.array([[0, 0], [1, 1]]), (2, 2), item_ids=np.array([3, 7]))
    with pytest.raises(ValueError, match="items must be 0 .. 1"):
        TriePaths(sparse)
    with pytest.raises(ValueError, match="item_mass"):
        subtree_mass(paths, np.ones(M - 1))
    with pytest.raises(ValueError, match="item_mass"):
        subtree_mass(paths, -np.ones(M))
    with pytest.raises(ValueError, match="positive mass"):
        path_log_ratios(paths, np.zeros(M))
    d = np.full(M, 1.0 / M)
    for bad in (np.ones(M - 1), np.full(M, np.nan), -d):
        with pytest.raises(ValueError, match="d must be"):
            exposure_edge_bias(paths, bad, 1.0, 2, Regulariser.entropy())
    d0 = d.copy()
    d0[0] = 0
    with pytest.raises(ValueError, match="smoothing is 0"):
        exposure_edge_bias(paths, d0, 1.0, 2, Regulariser.entropy(0.0))
    with pytest.raises(ValueError, match="Regulariser"):
        exposure_edge_bias(paths, d, 1.0, 2, "entropy")
    with pytest.raises(ValueError, match="lam"):
        exposure_edge_bias(paths, d, -1.0, 2, Regulariser.entropy())
    with pytest.raises(ValueError, match="edge_values"):
        paths.sums(np.zeros(3))
    with pytest.raises(ValueError, match="edge_logits"):
        edge_log_softmax(paths, logits[:, :-1])
    with pytest.raises(ValueError, match="edge_logprobs"):
        trie_oracle(paths, np.full_like(logits, np.nan), 2, 1.0, Regulariser.entropy())
    with pytest.raises(ValueError, match="Mixture"):
        mixture_bias_tables(paths, "mixture")
