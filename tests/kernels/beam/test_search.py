"""constrained_beam_search against exhaustive scoring of every
SID of small tries: with W >= the number of SIDs the ranking is exact,
including the -inf padding; torch reference, Triton (interpreter), jnp
reference and Pallas (TPU interpret mode)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import plum_kernels.torch as K
from plumrec.sid import build_trie

SIZES = (4, 3, 5)


def _problem(seed, n=20):
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, v, n) for v in SIZES], 1)
    codes = np.concatenate([codes, codes[:3]])           # collisions
    sids = np.unique(codes, axis=0)
    B = 2
    # logits depend on the user and the whole prefix: one random row per (user, prefix)
    tables = [rng.standard_normal((B, int(np.prod(SIZES[:l])), v)) * 2 for l, v in enumerate(SIZES)]
    return build_trie(codes, SIZES), sids, tables, B


def _prefix_index(tokens: np.ndarray) -> np.ndarray:
    idx = np.zeros(tokens.shape[:-1], dtype=np.int64)
    for l in range(tokens.shape[-1]):
        idx = idx * SIZES[l] + np.maximum(tokens[..., l], 0)
    return idx


def _exhaustive(sids, tables, normalize):
    """float64 score of every SID for each user, best first (ties by code)."""
    out = []
    for b in range(tables[0].shape[0]):
        total = np.zeros(len(sids))
        for l in range(len(SIZES)):
            rows = tables[l][b][_prefix_index(sids[:, :l])]
            x = rows[np.arange(len(sids)), sids[:, l]]
            if normalize == "codebook":
                lse = np.log(np.exp(rows).sum(1))
            else:  # over the trie's children of each prefix
                lse = np.empty(len(sids))
                for i, s in enumerate(sids):
                    kids = np.unique(sids[(sids[:, :l] == s[:l]).all(1), l])
                    lse[i] = np.log(np.exp(rows[i, kids]).sum())
            total += x - lse
        order = np.lexsort((*sids.T[::-1], -total))
        out.append((sids[order], total[order]))
    return out


def _check(codes, scores, expected, W):
    for b, (sids, total) in enumerate(expected):
        n = len(sids)
        assert n <= W
        np.testing.assert_array_equal(codes[b, :n], sids)
        np.testing.assert_allclose(scores[b, :n], total, rtol=1e-5, atol=1e-5)
        assert np.all(np.isneginf(scores[b, n:])) and np.all(codes[b, n:] == -1)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("normalize", ["codebook", "children"])
def test_torch_search_is_exhaustive_ranking(impl, normalize):
    trie, sids, tables, B = _problem(1)
    W = 32 if impl == "triton" else 48
    assert len(sids) <= W
    seen = []

    def step_fn(level, tokens, parent):
        assert tokens.shape == (B, W, level) and parent.shape == (B, W)
        seen.append(parent.clone())
        idx = torch.from_numpy(_prefix_index(tokens.numpy()))
        t = torch.from_numpy(tables[level])
        return torch.stack([t[b][idx[b]] for b in range(B)]).float()

    codes, scores = K.constrained_beam_search(step_fn, trie.to_torch(), batch_size=B, beam_width=W,
                                              normalize=normalize, impl=impl)
    assert codes.shape == (B, W, 3) and codes.dtype == torch.int64 and scores.dtype == torch.float32
    assert torch.equal(seen[0], torch.arange(W).expand(B, W))
    _check(codes.numpy(), scores.numpy(), _exhaustive(sids, tables, normalize), W)
    finite = scores.numpy() > -np.inf
    assert trie.contains(codes.numpy()[finite]).all()


def test_torch_search_narrow_beam_keeps_valid_sids():
    """W below the number of SIDs: every result is a distinct SID of the trie,
    best first, and the top-1 of a greedy-compatible problem is exact."""
    trie, sids, tables, B = _problem(2, n=40)

    def step_fn(level, tokens, parent):
        idx = torch.from_numpy(_prefix_index(tokens.numpy()))
        t = torch.from_numpy(tables[level])
        return torch.stack([t[b][idx[b]] for b in range(B)]).float()

    codes, scores = K.constrained_beam_search(step_fn, trie.to_torch(), batch_size=B, beam_width=5)
    assert (scores > float("-inf")).all()
    assert trie.contains(codes.reshape(-1, 3).numpy()).all()
    for b in range(B):
        assert len({tuple(c) for c in codes[b].tolist()}) == 5
        assert (scores[b, 1:] <= scores[b, :-1]).all()


@pytest.mark.parametrize("normalize", ["codebook", "children"])
def test_jax_search_on_to_jax_equals_torch_search_on_to_torch(normalize):
    """A beam narrower than the SIDs (pruning matters): JAX on ``SIDTrie.to_jax()`` (the kernels' pytree)
    returns the SIDs and scores of torch on ``to_torch()``, the trie passed as one ``jax.jit`` argument."""
    import jax
    import jax.numpy as jnp

    import plum_kernels.jax as KJ
    trie, sids, tables, B = _problem(21, n=60)
    W = 6
    assert len(sids) > 2 * W

    def logits(level, tokens):
        idx = _prefix_index(np.asarray(tokens).astype(np.int64))
        return np.stack([tables[level][b][idx[b]] for b in range(B)]).astype(np.float32)

    codes_t, scores_t = K.constrained_beam_search(lambda l, t, p: torch.from_numpy(logits(l, t)), trie.to_torch(),
                                                  batch_size=B, beam_width=W, normalize=normalize)
    ja = trie.to_jax()
    assert isinstance(ja, KJ.TrieArrays)
    codes_j, scores_j = KJ.constrained_beam_search(lambda l, t, p: jnp.asarray(logits(l, t)), ja, batch_size=B,
                                                   beam_width=W, normalize=normalize, impl="reference")
    np.testing.assert_array_equal(np.asarray(codes_j), codes_t.numpy())
    np.testing.assert_allclose(np.asarray(scores_j), scores_t.numpy(), rtol=1e-5, atol=1e-5)
    assert (scores_t.numpy() > -np.inf).all() and trie.contains(codes_t.reshape(-1, 3).numpy()).all()

    bounds = KJ.children_bounds(ja)

    @jax.jit
    def first_step(t, x):
        return KJ.constrained_beam_step(x, jnp.zeros((B, 1)), jnp.zeros((B, 1), jnp.int32), t, 0, W,
                                        normalize=normalize, max_children=bounds[0], impl="reference", validate=False)

    x = jnp.asarray(logits(0, np.zeros((B, 1, 0), np.int64)))                # [B, 1, V_0], the root's row
    top = first_step(ja, x)
    step_t = K.constrained_beam_step(torch.from_numpy(np.array(x)), torch.zeros(B, 1), torch.zeros(B, 1,
                                     dtype=torch.int64), trie.to_torch(), 0, W, normalize=normalize)
    np.testing.assert_array_equal(np.asarray(top.token), step_t.token.numpy())
    np.testing.assert_allclose(np.asarray(top.scores), step_t.scores.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_jax_search_is_exhaustive_ranking(impl):
    import jax.numpy as jnp

    import plum_kernels.jax as KJ
    normalize = "children" if impl == "pallas" else "codebook"
    trie, sids, tables, B = _problem(3)
    W = 40

    def step_fn(level, tokens, parent):
        idx = _prefix_index(np.asarray(tokens))
        return jnp.asarray(np.stack([tables[level][b][idx[b]] for b in range(B)]).astype(np.float32))

    codes, scores = KJ.constrained_beam_search(step_fn, trie.to_jax(), batch_size=B, beam_width=W,
                                               normalize=normalize, impl=impl, interpret=True)
    _check(np.asarray(codes), np.asarray(scores), _exhaustive(sids, tables, normalize), W)


# ------------------------------------------------------------------ non-finite scores
# A NaN logit in a user's first-level row (at a code without any SID) leaves that user with SIDs of the
# trie scored NaN, never -inf slots with codes -1, and the other users untouched.

def _nan_trie(seed=0, n=30, skip_code0=None):
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, v, n) for v in SIZES], 1)
    if skip_code0 is not None:  # no SID starts with this level-0 code
        codes = codes[codes[:, 0] != skip_code0]
    return build_trie(codes, SIZES)


def _nan_search(impl, trie, tables, B, W):
    def step_fn(level, tokens, parent):
        x = tables[level][:, None, :].repeat(W, 1)   # logits that depend on the user only
        if impl.startswith("jax"):
            import jax.numpy as jnp
            return jnp.asarray(x)
        return torch.from_numpy(x)

    if impl.startswith("jax"):
        import plum_kernels.jax as KJ
        codes, scores = KJ.constrained_beam_search(step_fn, trie.to_jax(), batch_size=B, beam_width=W,
                                                   impl=impl.split("-")[1], interpret=True)
    else:
        codes, scores = K.constrained_beam_search(step_fn, trie.to_torch(), batch_size=B, beam_width=W, impl=impl)
    return np.asarray(codes).astype(np.int64), np.asarray(scores)


@pytest.mark.parametrize("impl", ["reference", "triton", "jax-reference", "jax-pallas"])
def test_a_nan_logit_at_a_code_without_sid_is_reported_not_emptied(impl):
    trie = _nan_trie(3, skip_code0=3)
    B, W = 3, 8
    rng = np.random.default_rng(4)
    tables = [rng.standard_normal((B, v)).astype(np.float32) for v in SIZES]
    clean_codes, clean_scores = _nan_search(impl, trie, tables, B, W)
    tables[0][1, 3] = np.nan                                           # user 1, a level-0 code no SID has
    codes, scores = _nan_search(impl, trie, tables, B, W)
    for b in (0, 2):
        np.testing.assert_array_equal(codes[b], clean_codes[b])
        np.testing.assert_array_equal(scores[b], clean_scores[b])
    assert np.isnan(scores[1]).all(), "every beam of user 1 met the NaN: its scores must say so"
    assert (codes[1] >= 0).all() and trie.contains(codes[1]).all()




# ------------------------------------------------------------------ edge_bias
# A SID's score is its log-probability plus the edge biases along its path; trie_aggregate's log-ratios
# for a mass on one SID make that SID win.

SEARCH_IMPLS = ["reference", "triton", "jax-reference", "jax-pallas"]


def _path_bias(trie, sids, bias):
    """float64 sum of ``bias`` over each SID's edges (an internal node's ``p``-th child is edge
    ``child_ptr[s] + p``; inside a chain no edge is taken)."""
    total = np.zeros(len(sids))
    for l in range(sids.shape[1]):
        states = trie.walk(sids[:, :l])
        for k, s in enumerate(states.tolist()):
            if s < trie.num_internal:
                p = int(np.searchsorted(trie.children(s, l), sids[k, l]))
                total[k] += float(bias[int(trie.child_ptr[s]) + p])
    return total


def _search(impl, trie, tables, B, W, bias, normalize="codebook", bias_row=None):
    def step_fn(level, tokens, parent):
        idx = _prefix_index(np.asarray(tokens).astype(np.int64))
        x = np.stack([tables[level][b][idx[b]] for b in range(B)]).astype(np.float32)
        if impl.startswith("jax"):
            import jax.numpy as jnp
            return jnp.asarray(x)
        return torch.from_numpy(x)

    if impl.startswith("jax"):
        import jax.numpy as jnp

        import plum_kernels.jax as KJ
        codes, scores = KJ.constrained_beam_search(step_fn, trie.to_jax(), batch_size=B, beam_width=W,
                                                   normalize=normalize, edge_bias=jnp.asarray(bias),
                                                   bias_row=None if bias_row is None else jnp.asarray(bias_row),
                                                   impl=impl[4:], interpret=True)
    else:
        codes, scores = K.constrained_beam_search(step_fn, trie.to_torch(), batch_size=B, beam_width=W,
                                                  normalize=normalize, edge_bias=torch.from_numpy(bias),
                                                  bias_row=None if bias_row is None else torch.from_numpy(bias_row),
                                                  impl=impl)
    return np.asarray(codes).astype(np.int64), np.asarray(scores)


@pytest.mark.parametrize("impl", SEARCH_IMPLS)
def test_search_with_edge_bias_is_exhaustive_ranking(impl):
    trie, sids, tables, B = _problem(5)
    bias = (np.random.default_rng(6).standard_normal(trie.num_edges) * 1.5).astype(np.float32)
    W = 32
    assert len(sids) <= W
    codes, scores = _search(impl, trie, tables, B, W, bias)
    expected = []
    for b, (ranked, total) in enumerate(_exhaustive(sids, tables, "codebook")):
        total = total + _path_bias(trie, ranked, bias)
        order = np.lexsort((*ranked.T[::-1], -total))
        expected.append((ranked[order], total[order]))
    _check(codes, scores, expected, W)


@pytest.mark.parametrize("impl", SEARCH_IMPLS)
def test_a_bias_that_makes_one_leaf_dominate_makes_search_return_it(impl):
    trie, sids, tables, B = _problem(7)
    target = sids[len(sids) // 2]
    mass = np.zeros(trie.num_items, np.float32)
    mass[trie.items(target[None])[0]] = 1.0                 # every item of the target SID (collisions too)
    if impl.startswith("jax"):
        import plum_kernels.jax as KJ
        bias = np.asarray(KJ.trie_aggregate(mass, trie.to_jax(), trie, eps=1e-9, impl=impl[4:],
                                            interpret=True).edge_bias)
    else:
        bias = K.trie_aggregate(torch.from_numpy(mass), trie.to_torch(), trie, eps=1e-9, impl=impl).edge_bias.numpy()
    codes, scores = _search(impl, trie, tables, B, 2, bias)
    plain, _ = _search(impl, trie, tables, B, 2, np.zeros(trie.num_edges, np.float32))
    assert not (plain[:, 0] == target).all(axis=1).all(), "the target must not already be every user's best"
    np.testing.assert_array_equal(codes[:, 0], np.broadcast_to(target, (B, 3)))
    assert (scores[:, 0] - scores[:, 1] > 10).all()


@pytest.mark.parametrize("impl", SEARCH_IMPLS)
def test_search_with_per_user_bias_rows_ranks_each_user_by_its_row(impl):
    """edge_bias [T, E] with bias_row [B]: user b's SIDs score log-probability plus row bias_row[b]
    summed along the path (the exhaustive ranking of each user alone with that [E] bias)."""
    trie, sids, tables, B = _problem(9)
    table = (np.random.default_rng(10).standard_normal((3, trie.num_edges)) * 1.5).astype(np.float32)
    rows = np.array([2, 0], np.int32)
    W = 32
    codes, scores = _search(impl, trie, tables, B, W, table, bias_row=rows)
    expected = []
    for b, (ranked, total) in enumerate(_exhaustive(sids, tables, "codebook")):
        total = total + _path_bias(trie, ranked, table[rows[b]])
        order = np.lexsort((*ranked.T[::-1], -total))
        expected.append((ranked[order], total[order]))
    _check(codes, scores, expected, W)


@pytest.mark.parametrize("impl", SEARCH_IMPLS)
def test_search_rejects_a_bias_row_outside_the_table(impl):
    trie, sids, tables, B = _problem(9)
    table = np.zeros((3, trie.num_edges), np.float32)
    with pytest.raises(ValueError, match=r"bias_row\[1\] = 3 is not a row of edge_bias"):
        _search(impl, trie, tables, B, 4, table, bias_row=np.array([0, 3]))
    with pytest.raises(ValueError, match="needs bias_row"):
        _search(impl, trie, tables, B, 4, table)
