"""The SID trie's file (plumrec.sid.trie_file): round trips through SIDTrie.save / load, other files
rejected, and every class of damage named before any array reaches C++."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import save, save_file
from trie_checks import assert_same_trie

from plumrec.sid import SIDTrie, build_trie
from plumrec.sid.trie_file import (
    ARRAYS,
    COUNTS,
    check_codebook_sizes,
    level_layout,
    read_trie_file,
    write_trie_file,
)

PLUM_SIZES = (2048, 1024, 512, 256, 128, 64, 32, 16)


def test_level_layout_packs_level_zero_highest():
    bits, shift = level_layout(PLUM_SIZES)
    assert bits.tolist() == [11, 10, 9, 8, 7, 6, 5, 4] and bits.dtype == shift.dtype == np.int32
    assert shift.tolist() == [int(bits[l + 1:].sum()) for l in range(8)]
    assert level_layout([5, 1, 2**31])[0].tolist() == [3, 0, 31]
    assert check_codebook_sizes(np.array([4, 3])) == (4, 3)
    with pytest.raises(ValueError, match=r"codebook_sizes\[1\] = 0"):
        check_codebook_sizes([4, 0])


def test_write_then_read_gives_the_arrays_and_counts(tmp_path):
    trie = build_trie(np.array([[0, 1, 2], [0, 1, 3], [3, 3, 3], [3, 3, 3]]), [4, 4, 4])
    counts = {"num_items": 4, "num_sids": 3, "num_logical_nodes": trie.num_nodes, "chain_min_depth": 1,
              "key_bits": 6}
    path = tmp_path / "t.safetensors"
    write_trie_file(path, {n: getattr(trie, n) for n in ARRAYS}, (4, 4, 4), counts)
    arrays, back = read_trie_file(path, mmap=False)
    assert back == counts and set(back) == set(COUNTS)
    assert arrays["codebook_sizes"].tolist() == [4, 4, 4]
    for n in ARRAYS:
        assert arrays[n].dtype == getattr(trie, n).dtype
        np.testing.assert_array_equal(arrays[n], getattr(trie, n))
    write_trie_file(path, {n: getattr(trie, n) for n in ARRAYS}, (4, 4, 4), {**counts, "num_sids": 2})
    with pytest.raises(ValueError, match="'num_sids': '2 in the metadata, 3 in the arrays'"):
        read_trie_file(path)


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
        read_trie_file(path, mmap=mmap)


def test_load_checks_the_header_before_reading(tmp_path):
    path = tmp_path / "short.safetensors"
    for raw in (b"", b"\x01\x02", (10**15).to_bytes(8, "little") + b"{}"):
        path.write_bytes(raw)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated or not a safetensors file"):
            read_trie_file(path)
