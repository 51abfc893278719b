"""The public JAX namespace (``plum_kernels.jax``) inside users' JAX programs: the carriers are
pytrees that ``jax.jit`` takes as arguments (one trace for tries of equal shapes), and the ops run
under ``shard_map`` on a mesh of 4 CPU devices (data-parallel attention, expert-parallel grouped
matmul), matching the unsharded ops forward and backward."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax_sharded import run_sharded  # noqa: E402

import plum_kernels.jax as KJ  # noqa: E402
from plum_kernels.attention.pallas import BlockSizes  # noqa: E402
from plum_kernels.moe.pallas_gmm import GmmTiles  # noqa: E402
from plumrec.sid import build_trie  # noqa: E402

SIZES = (4, 3, 5)


def _tries(seed=0, n=20):
    """Two tries with equal shapes and different contents: the second relabels every level's codes."""
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, v, n) for v in SIZES], 1)
    perms = [rng.permutation(v) for v in SIZES]
    relabelled = np.stack([perms[lv][codes[:, lv]] for lv in range(len(SIZES))], 1)
    both = (codes, relabelled)
    return [KJ.TrieArrays.from_trie(build_trie(c, SIZES).to_jax()) for c in both], both, rng


def test_trie_arrays_is_a_jit_argument_and_two_tries_share_one_trace():
    (t1, t2), both, rng = _tries()
    assert jax.tree_util.tree_structure(t1) == jax.tree_util.tree_structure(t2)
    assert len(jax.tree_util.tree_leaves(t1)) == 7
    assert not np.array_equal(t1.child_token, t2.child_token)
    B, W = 2, 8
    tables = [jnp.asarray(rng.standard_normal((B, int(np.prod(SIZES[:lv])), v)), jnp.float32)
              for lv, v in enumerate(SIZES)]

    def step_fn(level, tokens, parent):
        idx = jnp.zeros(tokens.shape[:-1], jnp.int32)
        for lv in range(tokens.shape[-1]):
            idx = idx * SIZES[lv] + jnp.maximum(tokens[..., lv], 0)
        return jnp.take_along_axis(tables[level], idx.reshape(B, -1, 1), axis=1).reshape(B, W, SIZES[level])

    traces = []

    @jax.jit
    def search(trie, item_mass, item_arrays):
        traces.append(1)
        codes, scores = KJ.constrained_beam_search(step_fn, trie, batch_size=B, beam_width=W)
        return codes, scores, KJ.trie_aggregate(item_mass, trie, SimpleNamespace(**item_arrays))

    for trie, codes in zip((t1, t2), both):
        items = build_trie(codes, SIZES)
        mass = jnp.asarray(rng.random(len(codes)), jnp.float32)
        got = search(trie, mass, {n: jnp.asarray(getattr(items, n).astype(np.int32))
                                  for n in ("edge_item", "dup_ptr", "dup_items")})
        want_codes, want_scores = KJ.constrained_beam_search(step_fn, trie, batch_size=B, beam_width=W)
        want_agg = KJ.trie_aggregate(mass, trie, items)
        np.testing.assert_array_equal(got[0], want_codes)
        np.testing.assert_allclose(got[1], want_scores, rtol=1e-6)
        for a, b in zip(got[2], want_agg):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert len(traces) == 1


def test_config_carriers_are_leafless_pytrees():
    for cfg in (BlockSizes(), GmmTiles()):
        assert jax.tree_util.tree_leaves(cfg) == []
        assert jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(cfg), []) == cfg


def test_ops_under_shard_map_match_unsharded():
    report = run_sharded(("reference",))
    assert report["devices"] == 4
    for name in ("attention/reference", "grouped_matmul/reference"):
        res = report[name]
        for key, value in res.items():
            assert key == "tol" or value < res["tol"], (name, key, value)
