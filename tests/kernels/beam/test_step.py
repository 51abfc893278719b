"""constrained_beam_step: torch reference, Triton (interpreter on
CPU), jnp reference and Pallas (TPU interpret mode) against a float64 oracle
built on the SIDTrie query API; ties; vocabulary offsets; bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from beam_oracle import assert_step_matches, beam_prefixes, make_trie, oracle_step, states

import plum_kernels.torch as K
from plumrec.sid import build_trie


def _case(kind, level, B, W_in, dtype, seed, *, extra=0):
    rng = np.random.default_rng(seed)
    trie, sids = make_trie(kind, rng)
    level = min(level, trie.num_levels - 1)
    prefixes, scores, live, dead = beam_prefixes(sids, level, B, W_in, rng)
    nodes = states(trie, prefixes, live, dead)
    V = trie.codebook_sizes[level]
    logits = torch.from_numpy(rng.standard_normal((B, W_in, V + extra)).astype(np.float32) * 3).to(dtype)
    return trie, level, prefixes, scores, nodes, logits


def _run_torch(impl, trie, logits, scores, nodes, level, W, normalize, offset=None, bias=None, bias_row=None):
    tr = trie.to_torch()
    bias = None if bias is None else torch.from_numpy(bias)
    rows = None if bias_row is None else torch.from_numpy(bias_row)
    if impl == "triton":  # poisoned outputs: every slot must be written
        from plum_kernels.beam import triton as tk
        from plum_kernels.beam.ops_torch import _TrieView, chain_layout
        sh, mk = chain_layout(trie.codebook_sizes)
        view = _TrieView(tr.child_ptr, tr.child_token, tr.edge_word, sh, mk, trie.codebook_sizes,
                         tr.num_internal, tr.num_edges)
        B = nodes.shape[0]
        out = (torch.full((B, W), float("nan")), torch.full((B, W), 12345, dtype=torch.int64),
               torch.full((B, W), 12345, dtype=torch.int64), torch.full((B, W), 12345, dtype=torch.int64))
        K.constrained_beam_step(logits, torch.from_numpy(scores), torch.from_numpy(nodes), tr, level, W,
                                normalize=normalize, vocab_offset=offset, edge_bias=bias, bias_row=rows,
                                impl="reference")  # validates
        res = tk.beam_step(logits.contiguous(), torch.from_numpy(scores), torch.from_numpy(nodes), view, level, W,
                           normalize, offset or 0, out=out, edge_bias=bias, bias_row=rows)
    else:
        res = K.constrained_beam_step(logits, torch.from_numpy(scores), torch.from_numpy(nodes), tr, level, W,
                                      normalize=normalize, vocab_offset=offset, edge_bias=bias, bias_row=rows,
                                      impl=impl)
    return tuple(t.numpy() for t in res)


def _run_jax(impl, trie, logits, scores, nodes, level, W, normalize, offset=None, bias=None, bias_row=None):
    import jax.numpy as jnp

    import plum_kernels.jax as KJ
    x = jnp.asarray(logits.float().numpy()).astype({torch.float32: jnp.float32, torch.bfloat16: jnp.bfloat16,
                                                    torch.float16: jnp.float16}[logits.dtype])
    res = KJ.constrained_beam_step(x, jnp.asarray(scores), jnp.asarray(nodes.astype(np.int32)), trie.to_jax(),
                                   level, W, normalize=normalize, vocab_offset=offset, impl=impl, interpret=True,
                                   edge_bias=None if bias is None else jnp.asarray(bias),
                                   bias_row=None if bias_row is None else jnp.asarray(bias_row))
    return tuple(np.asarray(t) for t in res)


def _check(out, trie, logits, scores, prefixes, nodes, level, W, normalize, offset=0, exact=False, bias=None):
    x = logits.float().numpy()
    oracle = oracle_step(trie, x, scores, prefixes, nodes, level, W, normalize, offset, edge_bias=bias)
    # logits are exact in float64 whatever their dtype: only the float32 math errs
    assert_step_matches(out, oracle, W, rtol=1e-5, exact=exact)
    return oracle


# ------------------------------------------------------------------ torch reference (fast, broad)

@pytest.mark.parametrize("kind,dtype", [("wide", torch.float32), ("plum", torch.bfloat16),
                                        ("single", torch.float16), ("dense", torch.bfloat16)])
@pytest.mark.parametrize("normalize", ["codebook", "children"])
def test_reference_step_matches_oracle(kind, normalize, dtype):
    for level, W_in, W in ((0, 4, 7), (1, 6, 5), (2, 9, 16), (3, 5, 3), (5, 8, 8)):
        trie, lv, prefixes, scores, nodes, logits = _case(kind, level, 3, W_in, dtype, 17 * level + len(kind))
        out = _run_torch("reference", trie, logits, scores, nodes, lv, W, normalize)
        oracle = _check(out, trie, logits, scores, prefixes, nodes, lv, W, normalize)
        for b, o in enumerate(oracle):  # every kept SID prefix exists
            n = min(len(o), W)
            if n:
                got = np.concatenate([prefixes[b][out[2][b, :n]], out[3][b, :n, None]], 1)
                assert (trie.walk(got) == out[1][b, :n]).all()


# ------------------------------------------------------------------ Triton (interpreter)

@pytest.mark.parametrize("kind,level,W_in,W,dtype,normalize", [
    ("plum", 0, 4, 20, torch.bfloat16, "codebook"),     # root with > KP children: multi-block merges
    ("plum", 3, 6, 8, torch.float16, "children"),       # internal nodes below chain_min_depth
    ("plum", 5, 5, 4, torch.float32, "codebook"),       # chains only
    ("wide", 1, 19, 5, torch.float32, "children"),      # W_in > GROUP: several select iterations
    ("dense", 2, 8, 16, torch.bfloat16, "codebook"),    # fewer candidates than W: -inf padding
])
def test_triton_step_matches_oracle(kind, level, W_in, W, dtype, normalize):
    trie, lv, prefixes, scores, nodes, logits = _case(kind, level, 2, W_in, dtype, 5 + level)
    out = _run_torch("triton", trie, logits, scores, nodes, lv, W, normalize)
    _check(out, trie, logits, scores, prefixes, nodes, lv, W, normalize)


def test_triton_vocab_offset_and_strided_logits():
    trie, lv, prefixes, scores, nodes, logits = _case("wide", 1, 2, 6, torch.float32, 3, extra=40)
    V = trie.codebook_sizes[lv]
    host = torch.full((2, 8, V + 40), 50.0)   # garbage outside the slice must be ignored
    big = host[:, 1:7]                         # non-default batch/beam strides
    big[..., 13:13 + V] = logits[..., :V]
    for impl in ("triton", "reference"):
        out = _run_torch(impl, trie, big, scores, nodes, lv, 6, "codebook", offset=13)
        _check(out, trie, big, scores, prefixes, nodes, lv, 6, "codebook", offset=13)


@pytest.mark.parametrize("impl", ["reference", "triton", "jax-reference", "pallas"])
def test_ties_follow_documented_order(impl):
    """Equal scores: lower parent first, then lower token. Every beam has the
    same logits row (integers, many exact ties) and the same score."""
    rng = np.random.default_rng(11)
    trie, sids = make_trie("dense", rng)
    level, B, W_in, W = 1, 2, 4, 11
    prefixes = np.stack([np.repeat(sids[[0, 7, 0, 20], :1][None], 1, 0)[0]] * B)
    live = np.ones((B, W_in), bool)
    nodes = states(trie, prefixes, live, ~live)
    scores = np.full((B, W_in), -1.5, np.float32)
    row = rng.integers(0, 2, trie.codebook_sizes[level]).astype(np.float32)
    logits = torch.from_numpy(np.broadcast_to(row, (B, W_in, row.size)).copy())
    run = _run_jax if impl in ("jax-reference", "pallas") else _run_torch
    out = run(impl.replace("jax-", ""), trie, logits, scores, nodes, level, W, "codebook")
    _check(out, trie, logits, scores, prefixes, nodes, level, W, "codebook", exact=True)


# ------------------------------------------------------------------ JAX: jnp reference and Pallas

@pytest.mark.parametrize("impl,kind,level,W_in,W,normalize", [
    ("reference", "plum", 0, 3, 12, "codebook"),
    ("reference", "plum", 3, 6, 8, "children"),
    ("reference", "wide", 2, 7, 9, "codebook"),
    ("pallas", "plum", 3, 6, 8, "codebook"),
    ("pallas", "wide", 1, 7, 9, "children"),
])
def test_jax_step_matches_oracle(impl, kind, level, W_in, W, normalize):
    trie, lv, prefixes, scores, nodes, logits = _case(kind, level, 2, W_in, torch.bfloat16, 9 + level, extra=5)
    out = _run_jax(impl, trie, logits, scores, nodes, lv, W, normalize, offset=3)
    _check(out, trie, logits, scores, prefixes, nodes, lv, W, normalize, offset=3)


# ------------------------------------------------------------------ bad input

def test_bad_inputs_raise_clear_errors():
    import jax.numpy as jnp

    import plum_kernels.jax as KJ
    rng = np.random.default_rng(0)
    trie, sids = make_trie("wide", rng)
    tr = trie.to_torch()
    B, W = 2, 4
    logits = torch.randn(B, W, 16)
    scores = torch.zeros(B, W)
    nodes = torch.from_numpy(trie.walk(sids[:B * W, :1]).reshape(B, W))
    step = K.constrained_beam_step
    step(logits, scores, nodes, tr, 1, W)  # valid
    with pytest.raises(ValueError, match="W \\(beam width\\).*513"):
        step(logits, scores, nodes, tr, 1, 513)
    with pytest.raises(ValueError, match="logits must have width V_1 = 16"):
        step(torch.randn(B, W, 17), scores, nodes, tr, 1, W)
    with pytest.raises(TypeError, match="logits must be float16, bfloat16 or float32"):
        step(logits.double(), scores, nodes, tr, 1, W)
    with pytest.raises(TypeError, match="nodes must be int64"):
        step(logits, scores, nodes.int(), tr, 1, W)
    with pytest.raises(ValueError, match="beam_scores must have shape"):
        step(logits, scores[:, :2], nodes, tr, 1, W)
    with pytest.raises(ValueError, match="not a trie state at level 1"):
        step(logits, scores, nodes + 10**6, tr, 1, W)
    with pytest.raises(ValueError, match="not a trie state at level 2"):  # right range, wrong depth
        step(torch.randn(B, W, 8), scores, nodes, tr, 2, W)
    with pytest.raises(ValueError, match="level must be an int in \\[0, 4\\)"):
        step(logits, scores, nodes, tr, 4, W)
    with pytest.raises(ValueError, match="vocab_offset \\+ V_1"):
        step(logits, scores, nodes, tr, 1, W, vocab_offset=1)
    with pytest.raises(ValueError, match="normalize must be one of"):
        step(logits, scores, nodes, tr, 1, W, normalize="softmax")
    with pytest.raises(ValueError, match="B, W_in >= 1"):
        step(logits[:0], scores[:0], nodes[:0], tr, 1, W)
    with pytest.raises(TypeError, match="SIDTrie.to_torch"):
        step(logits, scores, nodes, trie.to_jax(), 1, W)
    with pytest.raises(ValueError, match="beam_width must be an int in \\[1, 512\\]"):
        K.constrained_beam_search(lambda *a: None, tr, batch_size=1, beam_width=600)
    tj = trie.to_jax()
    jstep = KJ.constrained_beam_step
    jl, js, jn = jnp.asarray(logits.numpy()), jnp.asarray(scores.numpy()), jnp.asarray(nodes.numpy().astype(np.int32))
    with pytest.raises(ValueError, match="not a trie state at level 1"):
        jstep(jl, js, jn + 10**6, tj, 1, W)
    with pytest.raises(ValueError, match="W \\(beam width\\)"):
        jstep(jl, js, jn, tj, 1, 1000)
    with pytest.raises(ValueError, match="logits must have width"):
        jstep(jl[..., :15], js, jn, tj, 1, W)
    with pytest.raises(TypeError, match="logits must be"):
        jstep(jl.astype(jnp.int32), js, jn, tj, 1, W)


# ------------------------------------------------------------------ non-finite scores, unchecked states
# A NaN candidate is kept, ranked after every number, NaNs by parent then token, with its real node /
# parent / token (reference.py, semantics 5); a NaN beam score is a live beam, not an empty slot.
# validate=False with states that are not in the trie runs without an out-of-range access.

NF_SIZES = (4, 3, 5)
NF_IMPLS = ["reference", "triton", "jax-reference", "jax-pallas"]


def _trie(seed=0, n=30, skip_code0=None):
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, v, n) for v in NF_SIZES], 1)
    if skip_code0 is not None:  # no SID starts with this level-0 code
        codes = codes[codes[:, 0] != skip_code0]
    return build_trie(codes, NF_SIZES)


def _step(impl, logits, scores, nodes, trie, level, W, normalize="codebook", validate=True):
    """One step through ``impl``; numpy ``(scores, nodes, parent, token)``."""
    if impl.startswith("jax"):
        import jax.numpy as jnp

        import plum_kernels.jax as KJ
        out = KJ.constrained_beam_step(jnp.asarray(logits), jnp.asarray(scores), jnp.asarray(nodes.astype(np.int32)),
                                       trie.to_jax(), level, W, normalize=normalize, impl=impl.split("-")[1],
                                       interpret=True, validate=validate)
    else:
        out = K.constrained_beam_step(torch.from_numpy(logits), torch.from_numpy(scores), torch.from_numpy(nodes),
                                      trie.to_torch(), level, W, normalize=normalize, impl=impl, validate=validate)
    return tuple(np.asarray(t).astype(np.float32 if i == 0 else np.int64) for i, t in enumerate(out))


def _level1_beams(trie, B=3):
    """Every level-0 code with a SID as a live beam of each user (finite, distinct scores)."""
    first = _step("reference", np.random.default_rng(1).standard_normal((B, 1, NF_SIZES[0])).astype(np.float32),
                  np.zeros((B, 1), np.float32), np.zeros((B, 1), np.int64), trie, 0, NF_SIZES[0])
    return first[0], first[1]


@pytest.mark.parametrize("normalize", ["codebook", "children"])
@pytest.mark.parametrize("impl", NF_IMPLS)
def test_nan_candidates_are_kept_after_every_number(impl, normalize):
    trie = _trie()
    scores, nodes = _level1_beams(trie)
    B, W_in = nodes.shape
    W = 16  # more slots than candidates: every candidate is returned
    logits = np.random.default_rng(2).standard_normal((B, W_in, NF_SIZES[1])).astype(np.float32)
    clean = _step(impl, logits, scores, nodes, trie, 1, W, normalize)
    nan_beams = {0: set(), 1: {2}, 2: {0}}
    bad_scores, bad_logits = scores.copy(), logits.copy()
    bad_scores[1, 2] = np.nan                                          # a NaN beam score: live, not empty
    first_child = clean[3][2][clean[2][2] == 0][0]
    bad_logits[2, 0, first_child] = np.nan                             # a NaN logit of one of beam 0's children
    got = _step(impl, bad_logits, bad_scores, nodes, trie, 1, W, normalize)
    for b in range(B):
        keep = clean[0][b] != -np.inf
        numeric = keep & ~np.isin(clean[2][b], list(nan_beams[b]))
        nans = keep & np.isin(clean[2][b], list(nan_beams[b]))
        order = np.concatenate([np.flatnonzero(numeric), np.flatnonzero(nans)[np.lexsort(
            (clean[3][b][nans], clean[2][b][nans]))]])
        n, m = int(numeric.sum()), len(order)
        for got_t, clean_t in zip(got[1:], clean[1:]):                 # nodes, parent, token
            np.testing.assert_array_equal(got_t[b, :m], clean_t[b][order])
        np.testing.assert_array_equal(got[0][b, :n], clean[0][b][order[:n]])
        assert np.isnan(got[0][b, n:m]).all() and len(nan_beams[b]) == (m > n)
        assert np.isneginf(got[0][b, m:]).all() and (got[1][b, m:] == -1).all() and (got[3][b, m:] == -1).all()


@pytest.mark.parametrize("impl", NF_IMPLS)
def test_unchecked_bad_states_never_read_out_of_bounds(impl):
    """States that are no trie state (far past the edges, below -1) with ``validate=False``: undefined
    results, but no crash and outputs of the documented shapes and dtypes."""
    trie = _trie()
    I, E = trie.num_internal, trie.num_edges
    nodes = np.array([[I + E + 1000, 2**40 if not impl.startswith("jax") else 2**30, -7, 0]], np.int64)
    scores = np.zeros((1, 4), np.float32)
    logits = np.random.default_rng(5).standard_normal((1, 4, NF_SIZES[1])).astype(np.float32)
    with pytest.raises(ValueError, match="not a trie state"):
        _step(impl, logits, scores, nodes, trie, 1, 6)
    out = _step(impl, logits, scores, nodes, trie, 1, 6, validate=False)
    assert [t.shape for t in out] == [(1, 6)] * 4


# ------------------------------------------------------------------ edge_bias
# One float32 value per trie edge, added to each candidate's score after the normalisation; a candidate
# inside a chain adds 0 (reference.py, semantics 3).

BIAS_IMPLS = ["reference", "triton", "jax-reference", "jax-pallas"]


def _run(impl, *args, **kw):
    return _run_jax(impl[4:], *args, **kw) if impl.startswith("jax") else _run_torch(impl, *args, **kw)


@pytest.mark.parametrize("impl", BIAS_IMPLS)
@pytest.mark.parametrize("kind,level,W_in,W,normalize", [
    ("plum", 0, 3, 20, "codebook"),     # the root's many children: several Triton blocks
    ("plum", 3, 6, 8, "children"),      # internal nodes and chains entered above
    ("wide", 2, 7, 9, "codebook"),      # chains only below depth 1, collisions
])
def test_biased_step_matches_oracle(impl, kind, level, W_in, W, normalize):
    trie, lv, prefixes, scores, nodes, logits = _case(kind, level, 2, W_in, torch.bfloat16, 21 + level)
    rng = np.random.default_rng(level)
    bias = (rng.standard_normal(trie.num_edges) * 2).astype(np.float32)
    bias[rng.random(trie.num_edges) < 0.1] = -np.inf                 # a -inf bias drops the edge
    out = _run(impl, trie, logits, scores, nodes, lv, W, normalize, bias=bias)
    _check(out, trie, logits, scores, prefixes, nodes, lv, W, normalize, bias=bias)


@pytest.mark.parametrize("impl", BIAS_IMPLS)
def test_a_zero_bias_equals_no_bias_exactly(impl):
    for kind, level, normalize in (("plum", 3, "children"), ("wide", 1, "codebook")):
        trie, lv, prefixes, scores, nodes, logits = _case(kind, level, 2, 5, torch.float32, 2 + level)
        plain = _run(impl, trie, logits, scores, nodes, lv, 7, normalize)
        zero = _run(impl, trie, logits, scores, nodes, lv, 7, normalize, bias=np.zeros(trie.num_edges, np.float32))
        for a, b in zip(plain, zero):
            np.testing.assert_array_equal(a, b)


def test_bad_edge_bias_raises_the_same_error_everywhere():
    import jax.numpy as jnp

    trie, lv, prefixes, scores, nodes, logits = _case("wide", 1, 2, 4, torch.float32, 0)
    E = trie.num_edges
    for bias, exc, what in ((np.zeros(E - 1, np.float32), ValueError, "edge_bias must have shape [E]"),
                            (np.zeros((1, 2, E), np.float32), ValueError, "edge_bias must have shape [E]"),
                            (np.zeros(E, np.float64), TypeError, "edge_bias must be float32")):
        messages = set()
        for impl in BIAS_IMPLS:
            with pytest.raises(exc) as info:
                if impl.startswith("jax"):
                    import plum_kernels.jax as KJ
                    KJ.constrained_beam_step(jnp.asarray(logits.numpy()), jnp.asarray(scores),
                                             jnp.asarray(nodes.astype(np.int32)), trie.to_jax(), lv, 4,
                                             edge_bias=np.asarray(bias), impl=impl[4:], interpret=True)
                else:
                    K.constrained_beam_step(logits, torch.from_numpy(scores), torch.from_numpy(nodes),
                                            trie.to_torch(), lv, 4, edge_bias=torch.from_numpy(bias), impl=impl)
            assert what in str(info.value), (impl, info.value)
            messages.add(str(info.value))
        assert len(messages) == 1, messages


# ------------------------------------------------------------------ per-user rows of edge_bias
# edge_bias [T, E] with bias_row [B]: user b adds edge_bias[bias_row[b], e].

@pytest.mark.parametrize("impl", BIAS_IMPLS)
@pytest.mark.parametrize("kind,level,W_in,W,normalize,row_dtype", [
    ("plum", 0, 3, 20, "codebook", np.int64),     # the root's many children: several Triton blocks
    ("plum", 3, 6, 8, "children", np.int32),      # internal nodes and chains entered above
    ("wide", 2, 7, 9, "codebook", np.int32),      # chains only below depth 1, collisions
])
def test_per_user_bias_rows_equal_each_user_alone(impl, kind, level, W_in, W, normalize, row_dtype):
    B, T = 4, 3
    trie, lv, prefixes, scores, nodes, logits = _case(kind, level, B, W_in, torch.bfloat16, 40 + level)
    rng = np.random.default_rng(100 + level)
    table = (rng.standard_normal((T, trie.num_edges)) * 2).astype(np.float32)
    table[rng.random(table.shape) < 0.1] = -np.inf
    rows = rng.integers(0, T, B).astype(row_dtype)
    rows[:2] = (T - 1, 0)                                            # first and last row both read
    out = _run(impl, trie, logits, scores, nodes, lv, W, normalize, bias=table, bias_row=rows)
    for b in range(B):
        one = slice(b, b + 1)
        alone = _run(impl, trie, logits[one], scores[one], nodes[one], lv, W, normalize, bias=table[rows[b]])
        for got, want in zip(out, alone):
            np.testing.assert_array_equal(got[one], want)
        _check(tuple(t[one] for t in out), trie, logits[one], scores[one], prefixes[one], nodes[one], lv, W,
               normalize, bias=table[rows[b]])


def test_bad_bias_row_raises_naming_the_argument():
    import jax.numpy as jnp

    import plum_kernels.jax as KJ

    trie, lv, prefixes, scores, nodes, logits = _case("wide", 1, 2, 4, torch.float32, 0)
    E = trie.num_edges
    table, flat = np.zeros((3, E), np.float32), np.zeros(E, np.float32)
    for bias, rows, exc, what in (
            (table, np.array([0, 3]), ValueError, "bias_row[1] = 3 is not a row of edge_bias"),
            (table, np.array([-1, 0]), ValueError, "bias_row[0] = -1 is not a row of edge_bias"),
            (table, np.array([0, 1, 2]), ValueError, "bias_row must have shape [B] = [2]"),
            (table, np.array([[0, 1]]), ValueError, "bias_row must have shape [B] = [2]"),
            (table, np.array([0.0, 1.0]), TypeError, "bias_row must be int32 or int64"),
            (flat, np.array([0, 0]), ValueError, "bias_row must be None with a one-dimensional edge_bias"),
            (table, None, ValueError, "needs bias_row"),
            (None, np.array([0, 0]), ValueError, "bias_row is given without an edge_bias")):
        for impl in BIAS_IMPLS:
            with pytest.raises(exc) as info:
                if impl.startswith("jax"):
                    KJ.constrained_beam_step(jnp.asarray(logits.numpy()), jnp.asarray(scores),
                                             jnp.asarray(nodes.astype(np.int32)), trie.to_jax(), lv, 4,
                                             edge_bias=None if bias is None else np.asarray(bias),
                                             bias_row=None if rows is None else np.asarray(rows), impl=impl[4:],
                                             interpret=True)
                else:
                    K.constrained_beam_step(logits, torch.from_numpy(scores), torch.from_numpy(nodes),
                                            trie.to_torch(), lv, 4,
                                            edge_bias=None if bias is None else torch.from_numpy(bias),
                                            bias_row=None if rows is None else torch.from_numpy(rows), impl=impl)
            assert what in str(info.value), (impl, info.value)


def test_unchecked_bias_rows_are_clamped_into_the_table():
    trie, lv, prefixes, scores, nodes, logits = _case("plum", 2, 2, 4, torch.float32, 5)
    table = np.random.default_rng(0).standard_normal((3, trie.num_edges)).astype(np.float32)
    tr = trie.to_torch()
    for impl in ("reference", "triton"):
        got = K.constrained_beam_step(logits, torch.from_numpy(scores), torch.from_numpy(nodes), tr, lv, 6,
                                      edge_bias=torch.from_numpy(table), bias_row=torch.tensor([-5, 9]), impl=impl,
                                      validate=False)
        want = K.constrained_beam_step(logits, torch.from_numpy(scores), torch.from_numpy(nodes), tr, lv, 6,
                                       edge_bias=torch.from_numpy(table), bias_row=torch.tensor([0, 2]), impl=impl)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _op_args(trie, scores, nodes, level, impl, rng):
    """``plum_kernels::constrained_beam_step`` arguments for beams ``(scores, nodes)`` at ``level``."""
    tr = trie.to_torch()
    B, W_in = nodes.shape
    logits = torch.from_numpy(rng.standard_normal((B, W_in, NF_SIZES[level])).astype(np.float32))
    return (logits, torch.from_numpy(scores), torch.from_numpy(nodes), tr.child_ptr, tr.child_token, tr.edge_word,
            [int(v) for v in tr.codebook_sizes], int(tr.num_internal), level, 4, "codebook", 0, impl)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_opcheck(impl):
    trie = _trie()
    scores, nodes = _level1_beams(trie)
    rng = np.random.default_rng(5)
    args = _op_args(trie, scores, nodes, 1, impl, rng)
    bias = torch.from_numpy(rng.standard_normal(int(trie.num_edges)).astype(np.float32))
    for extra in ((), (bias, None)):
        torch.library.opcheck(torch.ops.plum_kernels.constrained_beam_step.default, args + extra)


def test_torch_compile_fullgraph_triton_step_matches_eager_and_reference():
    trie = _trie()
    scores, nodes = _level1_beams(trie)
    tr = trie.to_torch()
    logits = torch.from_numpy(np.random.default_rng(6).standard_normal((3, scores.shape[1], NF_SIZES[1]))
                              .astype(np.float32))

    def step(logits, scores, nodes):
        return K.constrained_beam_step(logits, scores, nodes, tr, 1, 4, impl="triton")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(logits, torch.from_numpy(scores),
                                                                        torch.from_numpy(nodes))
    eager = step(logits, torch.from_numpy(scores), torch.from_numpy(nodes))
    ref = _step("reference", logits.numpy(), scores, nodes, trie, 1, 4)
    for c, e, r in zip(compiled, eager, ref):
        torch.testing.assert_close(c, e, rtol=0, atol=0)
        np.testing.assert_allclose(c.numpy(), r, rtol=1e-6, atol=1e-6)
