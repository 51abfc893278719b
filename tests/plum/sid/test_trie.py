"""The C++ SID trie against the plain-Python and numpy reference builders."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from trie_checks import assert_same_trie

from plumrec.sid import SIDTrie, build_trie
from plumrec.sid.reference import build_numpy, build_python

PLUM_SIZES = (2048, 1024, 512, 256, 128, 64, 32, 16)


def logical_reference(codes, item_ids=None):
    """prefix -> set of child tokens, and SID -> items, straight from the rows."""
    children, items = {}, {}
    for r, row in enumerate(np.asarray(codes).tolist()):
        sid = tuple(row)
        items.setdefault(sid, []).append(r if item_ids is None else int(item_ids[r]))
        for d in range(len(sid)):
            children.setdefault(sid[:d], set()).add(sid[d])
        children.setdefault(sid, set())
    return children, items


def check_queries(trie: SIDTrie, codes, item_ids, rng):
    children, items = logical_reference(codes, item_ids)
    L = trie.num_levels
    # every existing prefix: walk finds it, children() lists its children
    for prefix, kids in children.items():
        state = int(trie.walk(np.array([prefix], dtype=np.int64).reshape(1, len(prefix)))[0])
        assert state >= 0, prefix
        got = trie.children(state, depth=len(prefix))
        assert got.tolist() == sorted(kids), (prefix, got, kids)
    # random prefixes: present exactly when the reference has them
    for depth in range(L + 1):
        q = np.stack([rng.integers(0, v, size=64) for v in trie.codebook_sizes[:depth]], axis=1) \
            if depth else np.zeros((64, 0), dtype=np.int64)
        got = trie.walk(q) >= 0
        want = np.array([tuple(r) in children for r in q.tolist()])
        np.testing.assert_array_equal(got, want)
    # full SIDs: contains and items
    full = np.concatenate([np.asarray(codes),
                           np.stack([rng.integers(0, v, size=32) for v in trie.codebook_sizes], axis=1)])
    np.testing.assert_array_equal(trie.contains(full), [tuple(r) in items for r in full.tolist()])
    for row, got in zip(full.tolist(), trie.items(full)):
        assert got.tolist() == items.get(tuple(row), []), row


@st.composite
def code_sets(draw):
    L = draw(st.integers(1, 5))
    wide = draw(st.booleans())
    if wide:  # wide levels exercise chain_min_depth > 1 and 16/32-bit tokens
        sizes = [draw(st.sampled_from([3, 300, 2**15, 2**16 + 1, 2**24])) for _ in range(L)]
    else:
        sizes = [draw(st.integers(1, 5)) for _ in range(L)]
    n_distinct = draw(st.integers(1, 40))
    base = [[draw(st.integers(0, v - 1)) for v in sizes] for _ in range(n_distinct)]
    # duplicates (collisions) and shared prefixes
    rows = base + [draw(st.sampled_from(base)) for _ in range(draw(st.integers(0, 10)))]
    perm = draw(st.permutations(range(len(rows))))
    codes = np.array([rows[i] for i in perm], dtype=np.int64).reshape(len(rows), L)
    ids = None
    if draw(st.booleans()):
        big = draw(st.booleans())
        ids = np.array(draw(st.lists(st.integers(0, 2**40 if big else 10**6), min_size=len(rows),
                                     max_size=len(rows))), dtype=np.int64)
    return codes, sizes, ids


@given(code_sets(), st.sampled_from([np.int64, np.int32, np.uint16]))
def test_matches_python_reference(case, dtype):
    codes, sizes, ids = case
    if dtype is np.uint16 and max(sizes) > 2**16:
        dtype = np.int64
    trie = build_trie(codes.astype(dtype), sizes, ids)
    ref = build_python(codes, sizes, ids)
    assert_same_trie(trie, ref)
    assert_same_trie(build_numpy(codes, sizes, ids), ref)
    check_queries(trie, codes, ids, np.random.default_rng(len(codes)))


def test_full_levels_and_single_sid():
    full = np.array(np.meshgrid(*[np.arange(3)] * 3, indexing="ij")).reshape(3, -1).T
    for codes in (full, full[:1], np.repeat(full[:1], 5, axis=0)):
        trie = build_trie(codes, [3, 3, 3])
        assert_same_trie(trie, build_python(codes, [3, 3, 3]))
        check_queries(trie, codes, None, np.random.default_rng(0))
    trie = build_trie(full, [3, 3, 3])
    assert trie.num_nodes == 1 + 3 + 9 + 27
    assert trie.num_sids == 27


def test_chains_are_compressed():
    """One SID per level-1 prefix: no node is materialized below the chain start."""
    rng = np.random.default_rng(1)
    codes = np.stack([rng.permutation(256)[:200]] + [rng.integers(0, 256, 200) for _ in range(3)], axis=1)
    trie = build_trie(codes, [256] * 4)
    assert trie.chain_min_depth == 1
    assert trie.num_internal == 1 and trie.num_edges == 200
    assert trie.num_nodes == 1 + 4 * 200
    check_queries(trie, codes, None, rng)


def test_plum_codebooks_large_random_matches_numpy():
    rng = np.random.default_rng(2)
    n = 300_000  # several threads' worth of chunks
    codes = np.stack([rng.integers(0, v, n) for v in PLUM_SIZES], axis=1).astype(np.int32)
    codes[-1000:] = codes[:1000]  # collisions
    trie = build_trie(codes, PLUM_SIZES, num_threads=4)
    assert trie.chain_min_depth == 3
    assert_same_trie(trie, build_numpy(codes, PLUM_SIZES))
    assert_same_trie(trie, build_trie(codes, PLUM_SIZES, num_threads=1))
    sample = rng.choice(n, 2000, replace=False)
    assert trie.contains(codes[sample]).all()
    its = trie.items(codes[:3])
    assert [sorted(x.tolist()) for x in its] == [[i, n - 1000 + i] for i in range(3)]


def test_128_bit_keys():
    sizes = [2**30, 2**30, 2**30]  # 90 bits: the 128-bit path
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 2**30, (500, 3))
    codes[250:300, :2] = codes[0, :2]  # shared prefixes
    codes[300:310] = codes[0]
    trie = build_trie(codes, sizes)
    assert trie.key_bits == 90
    assert_same_trie(trie, build_python(codes, sizes))
    check_queries(trie, codes, None, rng)
    with pytest.raises(ValueError, match="at most 128"):
        build_trie(np.zeros((2, 5), dtype=np.int64), [2**31] * 5)


def test_non_contiguous_codes_are_read_in_place():
    rng = np.random.default_rng(4)
    big = rng.integers(0, 8, (400, 6))
    view = big[::2, ::2]
    assert not view.flags.c_contiguous
    assert_same_trie(build_trie(view, [8, 8, 8]), build_python(np.ascontiguousarray(view), [8, 8, 8]))


def test_device_arrays():
    import torch

    from plum_kernels.beam.trie_arrays import TrieArrays

    codes = np.array([[0, 1, 2], [0, 1, 3], [3, 3, 3]])
    trie = build_trie(codes, [4, 4, 4])
    ta = trie.to_torch("cpu")
    assert type(ta) is TrieArrays and ta.child_ptr.dtype == torch.int64 and ta.edge_word.dtype == torch.int32
    assert ta.num_states == trie.num_states and ta.codebook_sizes == (4, 4, 4)
    np.testing.assert_array_equal(ta.child_token.numpy(), trie.child_token)


def _relabelled(codes, sizes, seed):
    """The same trie shape with other tokens: each level's codes mapped by a random permutation."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(v)[codes[:, l]] for l, v in enumerate(sizes)], 1)


def test_to_jax_is_the_kernels_pytree_and_jit_traces_once_per_shape():
    import jax
    import jax.numpy as jnp

    import plum_kernels.jax as KJ

    sizes = (6, 5, 7)
    rng = np.random.default_rng(11)
    codes = np.stack([rng.integers(0, v, 40) for v in sizes], 1)
    trie, twin = build_trie(codes, sizes), build_trie(_relabelled(codes, sizes, 12), sizes)
    assert (twin.num_internal, twin.num_edges) == (trie.num_internal, trie.num_edges)
    assert not np.array_equal(twin.child_token, trie.child_token)
    ja = trie.to_jax()
    assert type(ja) is KJ.TrieArrays and ja.chain_min_depth == trie.chain_min_depth
    assert KJ.TrieArrays.from_trie(ja) is ja and ja.codebook_sizes == sizes
    leaves, treedef = jax.tree_util.tree_flatten(ja)
    assert len(leaves) == 7 and all(isinstance(x, jax.Array) for x in leaves)
    for name in ("child_ptr", "child_token", "edge_word", "level_ptr", "edge_level_ptr", "shift", "mask"):
        np.testing.assert_array_equal(np.asarray(getattr(ja, name)), getattr(trie, name), err_msg=name)
    assert jax.tree_util.tree_unflatten(treedef, leaves) == ja
    traces = []

    @jax.jit
    def root_tokens(t):
        traces.append((t.num_internal, t.num_edges))
        lo, hi = t.child_ptr[0], t.child_ptr[1]
        lane = jnp.arange(t.codebook_sizes[0])
        return jnp.where(lane < hi - lo, t.child_token[jnp.minimum(lo + lane, t.num_edges - 1)], -1)

    for t in (trie, twin, trie):
        np.testing.assert_array_equal(np.asarray(root_tokens(t.to_jax()))[:len(t.children(0))], t.children(0))
    assert len(traces) == 1
    other = build_trie(codes[:20], sizes)
    assert (other.num_internal, other.num_edges) != (trie.num_internal, trie.num_edges)
    root_tokens(other.to_jax())
    assert len(traces) == 2


def test_to_jax_narrows_int64_and_rejects_torch_arrays():
    import jax

    trie = build_trie(np.array([[0, 1], [1, 1]]), [2, 2])
    assert not jax.config.jax_enable_x64
    ja = trie.to_jax(jax.devices("cpu")[0])
    assert ja.child_ptr.dtype == np.int32 and ja.edge_word.dtype == np.int32
    from plum_kernels.beam.trie_arrays import TrieArrays
    with pytest.raises(TypeError, match="not to_torch"):
        TrieArrays.from_trie(trie.to_torch())
    big = SIDTrie({**{n: getattr(trie, n) for n in ("child_token", "edge_word", "edge_item", "dup_ptr", "dup_items",
                                                   "level_ptr", "edge_level_ptr")},
                   "child_ptr": trie.child_ptr + np.int64(2**31)}, [2, 2], num_items=2, num_sids=2,
                  num_logical_nodes=trie.num_nodes, chain_min_depth=trie.chain_min_depth, key_bits=2)
    with pytest.raises(ValueError, match="trie.child_ptr needs int64"):
        big.to_jax()


def test_the_trie_works_without_jax():
    """plumrec.sid imports, builds and moves to torch with jax absent; to_jax then names the missing jax."""
    code = ("import sys; sys.modules['jax'] = None\n"
            "import numpy as np, plumrec.sid as S\n"
            "t = S.build_trie(np.array([[0, 1], [1, 1]]), [2, 2]); t.to_torch()\n"
            "assert 'jax' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
            "try:\n    t.to_jax()\nexcept ImportError as e:\n    print('no jax:', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("no jax:")


@pytest.mark.parametrize("codes, sizes, match, exc", [
    (np.array([[0, -1, 2]]), [4, 4, 4], r"codes\[0, 1\] = -1", ValueError),
    (np.array([[0, 1, 2], [3, 1, 4]]), [4, 4, 4], r"codes\[1, 2\] = 4 .*level 2", ValueError),
    (np.array([0, 1, 2]), [4, 4, 4], "2-D", ValueError),
    (np.array([[0, 1]]), [4, 4, 4], "L = 3", ValueError),
    (np.zeros((0, 3), dtype=np.int64), [4, 4, 4], "empty", ValueError),
    (np.array([[0.0, 1.0, 2.0]]), [4, 4, 4], "integer", TypeError),
    (np.array([[0, 1, 2]]), [4, 0, 4], r"codebook_sizes\[1\]", ValueError),
    (np.array([[0, 1, 2]]), [], "at least one level", ValueError),
])
def test_bad_input(codes, sizes, match, exc):
    with pytest.raises(exc, match=match):
        build_trie(codes, sizes)


def test_bad_item_ids_and_queries():
    codes = np.array([[0, 1], [1, 1]])
    with pytest.raises(ValueError, match=r"item_ids must have shape \[2\]"):
        build_trie(codes, [2, 2], item_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="non-negative"):
        build_trie(codes, [2, 2], item_ids=[1, -2])
    with pytest.raises(TypeError, match="item_ids"):
        build_trie(codes, [2, 2], item_ids=[1.5, 2.0])
    trie = build_trie(codes, [2, 2])
    with pytest.raises(ValueError, match=r"prefixes\[1, 0\] = 2"):
        trie.walk(np.array([[0], [2]]))
    with pytest.raises(ValueError, match="more than the trie"):
        trie.walk(np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="L = 2"):
        trie.contains(np.zeros((1, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="state must be in"):
        trie.children(99)
    chain = int(trie.walk(np.array([[0]]))[0])
    with pytest.raises(ValueError, match="depth="):
        trie.children(chain)


def test_big_endian_codes_build_the_native_trie():
    rng = np.random.default_rng(6)
    sizes = [300, 5, 2**16 + 1]
    codes = np.stack([rng.integers(0, v, 400) for v in sizes], axis=1)
    codes[:20] = codes[20]
    ids = rng.integers(0, 2**40, 400)
    native = build_trie(codes.astype(np.int32), sizes, ids)
    for dtype in (">i4", ">u4", ">i8"):
        assert_same_trie(build_trie(codes.astype(dtype), sizes, ids.astype(">i8")), native)
    assert native.contains(codes.astype(">i8")).all()
    np.testing.assert_array_equal(native.walk(codes[:, :2].astype(">u2")), native.walk(codes[:, :2]))
    assert [x.tolist() for x in native.items(codes[:25].astype(">i4"))] == \
        [x.tolist() for x in native.items(codes[:25])]


def test_beam_items_ranks_the_live_beams_items_and_counts_the_invalid():
    """Beams best first: a SID's items (a collision keeps both, in trie order), a SID not in the trie
    counted invalid, a dead beam (-inf) neither ranked nor counted live."""
    trie = build_trie(np.array([[0, 1], [1, 0], [0, 1], [1, 1]]), [2, 2])   # items 0 and 2 share (0, 1)
    codes = np.array([[1, 1], [0, 1], [0, 0], [1, 0], [1, 0]])
    scores = np.array([-0.1, -0.5, -0.7, -np.inf, -1.0], np.float32)
    items, live, invalid = trie.beam_items(codes, scores)
    assert items.dtype == np.int64 and items.tolist() == [3, 0, 2, 1]
    assert (live, invalid) == (4, 1)
    empty, live, invalid = trie.beam_items(codes[:1], np.array([np.nan], np.float32))
    assert empty.tolist() == [] and (live, invalid) == (0, 0)
