"""The SID trie's file: one safetensors file holding the arrays of the
physical format (:mod:`plumrec.sid.trie`) plus ``codebook_sizes`` int64
``[L]``, with ``__metadata__`` ``{"format": "plum-sid-trie", "version": "1",
"num_items", "num_sids", "num_logical_nodes", "chain_min_depth", "key_bits"}``
(decimal strings).

:func:`read_trie_file` checks the whole file before returning it (header
length against the file size, dtypes, lengths, pointers, every edge and the
counts): a damaged one raises ``ValueError`` naming it and what is wrong;
``mmap=True`` maps the arrays read-only. Also here: the layout helpers the
format rests on (:func:`level_layout`, :func:`check_codebook_sizes`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
from safetensors.numpy import save_file

from plumrec.io import atomic_path

FORMAT_NAME = "plum-sid-trie"
FORMAT_VERSION = 1
ARRAYS = ("child_ptr", "child_token", "edge_word", "edge_item", "dup_ptr", "dup_items",
          "level_ptr", "edge_level_ptr")
COUNTS = ("num_items", "num_sids", "num_logical_nodes", "chain_min_depth", "key_bits")
_MAX_CODEBOOK = 2**31


def level_layout(codebook_sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(bits, shift)`` int32 ``[L]`` of the packed key (level 0 highest)."""
    bits = np.array([int(v - 1).bit_length() for v in codebook_sizes], dtype=np.int32)
    shift = np.concatenate([np.cumsum(bits[::-1])[::-1][1:], [0]]).astype(np.int32)
    return bits, shift


def check_codebook_sizes(codebook_sizes: Sequence[int]) -> tuple[int, ...]:
    """``codebook_sizes`` as a tuple of ints, each in ``[1, 2**31]`` (``TypeError`` / ``ValueError`` otherwise)."""
    try:
        sizes = tuple(int(v) for v in codebook_sizes)
    except TypeError as exc:
        raise TypeError("codebook_sizes must be a sequence of ints") from exc
    if not sizes:
        raise ValueError("codebook_sizes must name at least one level")
    for l, v in enumerate(sizes):
        if not 1 <= v <= _MAX_CODEBOOK:
            raise ValueError(f"codebook_sizes[{l}] = {v} must be in [1, 2**31]")
    return sizes


def write_trie_file(path: str | os.PathLike, arrays: dict[str, np.ndarray], codebook_sizes: Sequence[int],
                    counts: dict[str, int]) -> None:
    """Write a trie to one safetensors file at ``path`` (atomically).

    Args:
        arrays: the :data:`ARRAYS` of the physical format (numpy, 1-D).
        codebook_sizes: the ``L`` codebook sizes.
        counts: the :data:`COUNTS` (ints), stored in the metadata.
    """
    tensors = {n: np.ascontiguousarray(arrays[n]) for n in ARRAYS}
    tensors["codebook_sizes"] = np.asarray(codebook_sizes, dtype=np.int64)
    meta = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), **{k: str(int(counts[k])) for k in COUNTS}}
    with atomic_path(os.fspath(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_trie_file(path: str | os.PathLike, mmap: bool = True) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """``(arrays, counts)`` of the trie file at ``path``, checked whole first.

    Returns the :data:`ARRAYS` plus ``codebook_sizes`` (1-D numpy arrays in
    native byte order, memory-mapped read-only when ``mmap``) and the
    :data:`COUNTS` of the metadata (ints). A file that is not a trie file of
    this version, or is damaged, raises ``ValueError`` naming it.
    """
    path = os.fspath(path)
    arrays, meta = _read_file(path, mmap)
    counts = _check_header_arrays(path, arrays, meta)
    _check_edges(path, arrays, counts)
    return arrays, counts


_DTYPES = {"I16": np.dtype("<i2"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8")}


def _read_file(path: str, mmap: bool) -> tuple[dict[str, np.ndarray], dict]:
    """``(arrays, __metadata__)`` of trie file ``path``, mapped or read. Checks the header's length against
    the file size (and safetensors' 100 MiB limit) before reading it, the format and version, and that the
    arrays are the trie's, 1-D, integer, aligned, and tile the rest of the file exactly."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else None
        if n is None or not 2 <= n <= min(size - 8, 100 * 2**20):
            raise ValueError(f"{path} is truncated or not a safetensors file: header length {n}, file size {size}")
        try:
            header = json.loads(f.read(n))
            meta = dict(header.pop("__metadata__", None) or {})
        except (ValueError, TypeError, AttributeError, RecursionError) as e:
            raise ValueError(f"{path} has a damaged header (not a UTF-8 JSON object): {e}") from e
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a {FORMAT_NAME} file (format={meta.get('format')!r})")
    if meta.get("version") != str(FORMAT_VERSION):
        raise ValueError(f"{path} has trie format version {meta.get('version')}, this library reads {FORMAT_VERSION}")
    names, start, spans = sorted((*ARRAYS, "codebook_sizes")), 8 + n, []
    _require(path, sorted(header) == names, f"it holds arrays {sorted(header)}, a trie holds {names}")
    for name, info in header.items():
        try:
            dt, (count,), (b, e) = _DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            ok = {type(count), type(b), type(e)} == {int} and b >= 0 and 0 <= count * dt.itemsize == e - b \
                and (start + b) % dt.itemsize == 0
        except (KeyError, TypeError, ValueError):
            ok = False
        _require(path, ok, f"array {name} has the entry {info!r}; a trie holds aligned 1-D {'/'.join(_DTYPES)}")
        spans.append((b, e, name, dt, count))
    spans.sort()
    ends = [0] + [e for _, e, *_ in spans]
    _require(path, [b for b, *_ in spans] == ends[:-1], "its arrays overlap or leave gaps")
    _require(path, ends[-1] == size - start, f"{'truncated' if ends[-1] > size - start else 'extended'}: its "
             f"arrays take {ends[-1]} bytes after the header, the file holds {size - start}")
    arrays = {}
    for b, _, name, dt, count in spans:
        arr = np.memmap(path, dtype=dt, mode="r", offset=start + b, shape=(count,)) if mmap and count \
            else np.fromfile(path, dtype=dt, count=count, offset=start + b)
        arrays[name] = arr if dt.isnative else arr.astype(dt.newbyteorder("="))
    return arrays, meta


def _require(path: str, ok: Any, what: str) -> None:
    if not ok:
        raise ValueError(f"{path} is damaged: {what}")


def _check_header_arrays(path: str, a: dict[str, np.ndarray], meta: dict) -> dict[str, int]:
    """Checks the metadata, every array's dtype and length, and the pointer arrays (``child_ptr``,
    ``level_ptr``, ``edge_level_ptr``, ``dup_ptr``); returns the counts the metadata holds."""
    try:
        counts = {k: int(meta[k]) for k in COUNTS}
        sizes = check_codebook_sizes(a["codebook_sizes"].tolist())
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is damaged: bad metadata or codebook_sizes ({e!r})") from e
    L, (bits, shift) = len(sizes), level_layout(sizes)
    dstar = next(d for d in range(1, L + 1) if shift[d - 1] <= 31)
    _require(path, (counts["key_bits"], counts["chain_min_depth"]) == (bits.sum(), dstar) and bits.sum() <= 128,
             f"key_bits, chain_min_depth = {counts['key_bits']}, {counts['chain_min_depth']}; the codebook_sizes "
             f"give {bits.sum()}, {dstar} (at most 128 bits)")
    item = np.int32 if a["edge_item"].dtype == np.int32 else np.int64
    for name in ARRAYS + ("codebook_sizes",):
        dt = {"child_token": np.int16 if max(sizes) <= 32768 else np.int32, "edge_word": np.int32,
              "edge_item": item, "dup_items": item}.get(name, np.int64)
        _require(path, a[name].dtype == dt, f"{name} has dtype {a[name].dtype}, expected {np.dtype(dt)}")
    cp, lp, elp, dp, di = (a[k] for k in ("child_ptr", "level_ptr", "edge_level_ptr", "dup_ptr", "dup_items"))
    I, E = len(cp) - 1, len(a["edge_word"])
    for name, n in (("child_token", E), ("edge_item", E), ("level_ptr", L + 1), ("edge_level_ptr", L + 1)):
        _require(path, len(a[name]) == n, f"{name} has length {len(a[name])}, expected {n}")
    _require(path, 1 <= I < 2**31 and len(dp) >= 1, f"child_ptr has length {I + 1}, dup_ptr {len(dp)}")
    for name, v, hi, step, what in (("child_ptr", cp, E, 1, "edges"), ("level_ptr", lp, I, 0, "internal nodes"),
                                    ("edge_level_ptr", elp, E, 0, "edges"), ("dup_ptr", dp, len(di), 2, "dup_items")):
        _require(path, v[0] == 0 and v[-1] == hi and v.min() >= 0 and v.max() <= hi and (np.diff(v) >= step).all(),
                 f"{name} does not rise from 0 to the {hi} {what} by steps of at least {step}")  # range first
    _require(path, lp[1] == 1 and (cp[lp] == elp).all(), "level_ptr and edge_level_ptr disagree with child_ptr")
    _require(path, not len(di) or di.min() >= 0, "dup_items holds a negative item id")
    return counts


def _check_edges(path: str, a: dict[str, np.ndarray], counts: dict[str, int]) -> None:
    """Checks every edge, vectorised per level: its token is in its level's codebook and sorted within its
    node; its word leads to the next internal node in breadth-first order or holds the codes of a chain;
    its item is ``-1`` (internal edge), an item id, or the one reference to a collision group."""
    sizes = tuple(int(v) for v in a["codebook_sizes"])
    L, (bits, shift), chains, logical = len(sizes), level_layout(sizes), 0, 0
    cp, tok, ew, ei, lp, elp = (a[k] for k in ("child_ptr", "child_token", "edge_word", "edge_item", "level_ptr",
                                                "edge_level_ptr"))
    I, E, C = len(cp) - 1, len(ew), len(a["dup_ptr"]) - 1
    for l in range(L):
        t, w = tok[elp[l]:elp[l + 1]], ew[elp[l]:elp[l + 1]]
        _require(path, not len(t) or 0 <= t.min() <= t.max() < sizes[l],
                 f"a level-{l} child_token is outside [0, {sizes[l]})")
        below = int(lp[l + 2] - lp[l + 1]) if l + 2 <= L else 0  # internal nodes at depth l + 1
        _require(path, np.count_nonzero(w < 0) == below,
                 f"level {l}'s edge_word must lead to the {below} internal nodes at depth {l + 1}")
        cw = w[w >= 0]
        _require(path, not len(cw) or l + 1 >= counts["chain_min_depth"] and cw.max() >> int(shift[l]) == 0,
                 f"a level-{l} edge_word holds a chain longer than the levels below it")
        for k in range(l + 1, L) if len(cw) else ():
            _require(path, ((cw >> int(shift[k])) & ((1 << int(bits[k])) - 1)).max() < sizes[k],
                     f"a level-{l} edge_word holds a level-{k} code outside [0, {sizes[k]})")
        chains, logical = chains + len(cw), logical + len(cw) * (L - l)
    first = np.zeros(E, dtype=bool)
    first[cp[:-1]] = True
    _require(path, ((tok[1:] > tok[:-1]) | first[1:]).all(), "child_token is not sorted within a node")
    _require(path, np.array_equal(~ew[ew < 0], np.arange(1, I, dtype=np.int32)),
             "edge_word does not number the internal nodes 1, 2, ... in edge order")
    _require(path, (ei[ew < 0] == -1).all(), "edge_item is not -1 on an internal edge")
    ci = ei[ew >= 0]
    groups = -ci[ci <= -2].astype(np.int64) - 2
    _require(path, len(groups) == C and (groups < C).all() and (np.bincount(groups, minlength=C) == 1).all(),
             f"edge_item does not name each of the {C} collision groups once")
    found = {"num_sids": chains, "num_logical_nodes": I + logical, "num_items": len(ci) - C + len(a["dup_items"])}
    wrong = {k: f"{counts[k]} in the metadata, {v} in the arrays" for k, v in found.items() if counts[k] != v}
    _require(path, not wrong, f"counts differ: {wrong}")
