"""The C++ SID trie against the plain-Python and numpy reference builders."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save, save_file
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


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(tmp_path, mmap):
    rng = np.random.default_rng(5)
    codes = np.stack([rng.integers(0, v, 5000) for v in PLUM_SIZES], axis=1)
    codes[:10] = codes[10]
    trie = build_trie(codes, PLUM_SIZES, item_ids=np.arange(5000) * 7 + 2**33)
    path = tmp_path / "trie.safetensors"
    trie.save(path)
    back = SIDTrie.load(path, mmap=mmap)
    assert_same_trie(back, trie)
    assert back.codebook_sizes == trie.codebook_sizes
    if mmap:
        assert isinstance(back.child_token, np.memmap)
    np.testing.assert_array_equal(back.walk(codes[:100]), trie.walk(codes[:100]))
    assert [x.tolist() for x in back.items(codes[:12])] == [x.tolist() for x in trie.items(codes[:12])]


def test_load_rejects_other_files(tmp_path):
    p = tmp_path / "other.safetensors"
    save_file({"x": np.zeros(3)}, str(p), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a plum-sid-trie"):
        SIDTrie.load(p)
    trie = build_trie(np.array([[1, 2]]), [4, 4])
    q = tmp_path / "t.safetensors"
    trie.save(q)
    raw = q.read_bytes().replace(b'"version":"1"', b'"version":"9"')
    q.write_bytes(raw)
    with pytest.raises(ValueError, match="version 9"):
        SIDTrie.load(q)


def test_device_arrays():
    import torch

    codes = np.array([[0, 1, 2], [0, 1, 3], [3, 3, 3]])
    trie = build_trie(codes, [4, 4, 4])
    ta = trie.to_torch("cpu")
    assert ta.child_ptr.dtype == torch.int64 and ta.edge_word.dtype == torch.int32
    assert ta.num_states == trie.num_states and ta.codebook_sizes == (4, 4, 4)
    ja = trie.to_jax()
    np.testing.assert_array_equal(np.asarray(ja.edge_word), trie.edge_word)
    np.testing.assert_array_equal(np.asarray(ja.child_ptr), trie.child_ptr)


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



def _header(raw: bytes) -> tuple[dict, int]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), 8 + n


def _arrays(raw: bytes) -> dict[str, np.ndarray]:
    header, start = _header(raw)
    dtypes = {"I16": "<i2", "I32": "<i4", "I64": "<i8"}
    return {k: np.frombuffer(raw[start + v["data_offsets"][0]:start + v["data_offsets"][1]], dtype=dtypes[v["dtype"]])
            for k, v in header.items() if k != "__metadata__"}


def _patched(name, fn):
    """A damage that applies ``fn`` in place to array ``name`` and writes the file back."""
    def damage(raw: bytes) -> bytes:
        arrays = {k: v.copy() for k, v in _arrays(raw).items()}
        fn(arrays[name])
        return save(arrays, _header(raw)[0]["__metadata__"])
    return damage


def _retyped(name, dtype):
    def damage(raw: bytes) -> bytes:
        arrays = _arrays(raw)
        return save({**arrays, name: arrays[name].astype(dtype)}, _header(raw)[0]["__metadata__"])
    return damage


def _set(index, value):
    def fn(a):
        a[index] = value
    return fn


def _swap(i, j):
    def fn(a):
        a[i], a[j] = a[j], a[i]
    return fn


# The trie of DAMAGE_CODES: internal nodes 0..3 (root, [0], [3], [0, 1]), chains below them, and one collision group.
DAMAGE_CODES = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 0], [3, 3, 3], [3, 3, 3], [3, 0, 1]])
DAMAGES = {  # name: (damage of the file's bytes, what the error says)
    "truncated": (lambda raw: raw[:-5], "is damaged: truncated"),
    "extended": (lambda raw: raw + bytes(16), "is damaged: extended"),
    "huge_header": (lambda raw: (10**15).to_bytes(8, "little") + raw[8:], "header length 1000000000000000, file size"),
    "header_not_json": (lambda raw: raw[:9] + b"\xff" + raw[10:], "damaged header"),
    "child_ptr_out_of_range": (_patched("child_ptr", _set(1, 10**15)), "child_ptr does not rise from 0 to the 8"),
    "child_ptr_not_monotone": (_patched("child_ptr", _swap(1, 2)), "child_ptr does not rise from 0 to the 8"),
    "level_ptr_out_of_range": (_patched("level_ptr", _set(2, -7)), "level_ptr does not rise from 0"),
    "dup_ptr_not_monotone": (_patched("dup_ptr", _set(0, 2)), "dup_ptr does not rise from 0"),
    "edge_word_internal_node": (_patched("edge_word", _set(0, ~10**6)), "edge_word"),
    "edge_word_chain_code": (_patched("edge_word", lambda a: a.__setitem__(a >= 0, 2**30)), "edge_word"),
    "child_token_outside_codebook": (_patched("child_token", _set(0, 9)), "child_token"),
    "child_token_unsorted": (_patched("child_token", _swap(0, 1)), "child_token is not sorted"),
    "edge_item_group": (_patched("edge_item", lambda a: a.__setitem__(a <= -2, -10**6)), "edge_item"),
    "dup_items_negative": (_patched("dup_items", _set(0, -5)), "dup_items holds a negative"),
    "wrong_dtype": (_retyped("child_ptr", np.int32), "child_ptr has dtype int32, expected int64"),
    "wrong_token_dtype": (_retyped("child_token", np.int64), "child_token has dtype int64, expected int16"),
    "missing_array": (lambda raw: save({k: v for k, v in _arrays(raw).items() if k != "dup_ptr"},
                                       _header(raw)[0]["__metadata__"]), "it holds arrays"),
    "metadata_count": (lambda raw: raw.replace(b'"num_items":"6"', b'"num_items":"7"'),
                       "'num_items': '7 in the metadata, 6 in the arrays'"),
}


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_file_raises_naming_it(tmp_path, damage, mmap):
    """Each damage class: ValueError naming the file and what is wrong, before any array reaches C++."""
    trie = build_trie(DAMAGE_CODES, [4, 4, 4])
    assert (trie.num_internal, len(trie.dup_ptr)) == (4, 2)
    path = tmp_path / "damaged_trie.safetensors"
    trie.save(path)
    fn, message = DAMAGES[damage]
    raw = fn(path.read_bytes())
    assert raw != path.read_bytes()
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        SIDTrie.load(path, mmap=mmap)


def test_load_checks_the_header_before_reading(tmp_path):
    path = tmp_path / "short.safetensors"
    for raw in (b"", b"\x01\x02", (10**15).to_bytes(8, "little") + b"{}"):
        path.write_bytes(raw)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated or not a safetensors file"):
            SIDTrie.load(path)
