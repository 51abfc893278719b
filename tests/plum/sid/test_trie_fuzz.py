"""Damaged trie files: flipped, truncated or extended bytes either load into a trie that answers queries
consistently or raise ``ValueError`` naming the file; nothing crashes (the fuzz runs in-process)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plumrec.sid import SIDTrie, build_trie

SIZES = [4, 3, 300]  # int16 tokens, a level whose codes do not fill their bits, chains from depth 1
CODES = np.array([[0, 1, 2], [0, 1, 299], [0, 2, 0], [3, 2, 7], [3, 2, 7], [3, 0, 1], [1, 1, 1], [3, 2, 8]])
ITEM_IDS = np.array([5, 6, 7, 8, 9, 10, 2**33, 0])  # int64 items


@pytest.fixture(scope="module")
def saved():
    """``(raw bytes, data section start, folder)`` of the saved trie of CODES."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trie.safetensors"
        build_trie(CODES, SIZES, ITEM_IDS).save(path)
        raw = path.read_bytes()
        yield raw, 8 + int.from_bytes(raw[:8], "little"), Path(folder)


def _queries(trie: SIDTrie) -> np.ndarray:
    """CODES, the same with each level's code moved, and random SIDs, all inside the trie's codebooks."""
    sizes = np.array(trie.codebook_sizes)
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 2**31, (32, len(sizes))) % sizes
    return np.concatenate([CODES % sizes, (CODES + 1) % sizes, rand])


def _check_answers(trie: SIDTrie) -> None:
    """``walk``, ``contains``, ``items`` and ``children`` agree with one another."""
    q = _queries(trie)
    states = trie.walk(q)
    assert ((states == -1) | ((states >= trie.num_internal) & (states < trie.num_states))).all()
    found = trie.contains(q)
    np.testing.assert_array_equal(found, states >= 0)
    items = trie.items(q)
    assert [len(x) > 0 for x in items] == found.tolist()
    assert all((x >= 0).all() for x in items)
    for depth in range(trie.num_levels + 1):
        prefix_states = trie.walk(q[:12, :depth])
        for row, state in zip(q[:12].tolist(), prefix_states.tolist()):
            if state >= 0 and depth < trie.num_levels:  # a present prefix lists the next code iff the SID exists
                kids = trie.children(state, depth=depth).tolist()
                assert kids == sorted(set(kids))
                assert (row[depth] in kids) == (trie.walk(np.array([row[:depth + 1]]))[0] >= 0)


def _load_or_refuse(path: Path, raw: bytes, original: bytes, mmap: bool) -> None:
    path.write_bytes(raw)
    try:
        trie = SIDTrie.load(path, mmap=mmap)
    except ValueError as e:
        assert str(path) in str(e)
        return
    _check_answers(trie)
    if raw == original:
        np.testing.assert_array_equal(trie.contains(CODES), True)
        assert [x.tolist() for x in trie.items(CODES)] == [[i] for i in ITEM_IDS[:3]] + [[8, 9], [8, 9]] + \
            [[i] for i in ITEM_IDS[5:]]


def test_the_intact_file_loads(saved, tmp_path):
    raw, _, _ = saved
    for mmap in (True, False):
        _load_or_refuse(tmp_path / "intact.safetensors", raw, raw, mmap)
        assert SIDTrie.load(tmp_path / "intact.safetensors", mmap=mmap).num_items == len(CODES)


@pytest.mark.parametrize("mask", [0x01, 0xFF])
def test_every_byte_of_the_arrays_flipped(saved, tmp_path, mask):
    """Each byte of the data section XOR ``mask``, one at a time."""
    raw, start, _ = saved
    path = tmp_path / "flipped.safetensors"
    for pos in range(start, len(raw)):
        _load_or_refuse(path, raw[:pos] + bytes([raw[pos] ^ mask]) + raw[pos + 1:], raw, mmap=pos % 2 == 0)


@st.composite
def damages(draw, raw: bytes, start: int) -> bytes:
    """``raw`` with bytes flipped (mostly in the arrays), then maybe truncated or extended."""
    out = bytearray(raw)
    for _ in range(draw(st.integers(0, 4))):
        in_data = draw(st.booleans()) or draw(st.booleans())
        pos = draw(st.integers(start if in_data else 0, len(out) - 1))
        out[pos] = draw(st.integers(0, 255))
    cut = draw(st.sampled_from(["none", "truncate", "extend"]))
    if cut == "truncate":
        del out[draw(st.integers(0, len(out) - 1)):]
    elif cut == "extend":
        out += draw(st.binary(min_size=1, max_size=64))
    return bytes(out)



def test_random_damage(saved):
    raw, start, folder = saved

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(damaged=damages(raw, start), mmap=st.booleans())
    def run(damaged, mmap):
        _load_or_refuse(folder / "fuzzed.safetensors", damaged, raw, mmap)

    run()


def test_header_fields_rewritten(saved, tmp_path):
    """Header values replaced by other JSON values: shapes, offsets, dtypes, metadata."""
    raw, start, _ = saved
    header = json.loads(raw[8:start])
    path = tmp_path / "header.safetensors"
    for name, info in header.items():
        for key in info:
            for value in (None, -1, 2**70, "I8", [1, 2, 3], [0, 2**62], {"a": 1}, "12"):
                edited = json.dumps({**header, name: {**info, key: value}}).encode()
                edited += b" " * (-len(edited) % 8)
                _load_or_refuse(path, len(edited).to_bytes(8, "little") + edited + raw[start:], raw, mmap=True)
