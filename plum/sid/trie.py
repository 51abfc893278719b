"""The SID trie: every Semantic ID that exists, as arrays that kernels read.

Logical structure
-----------------
SIDs are integer codes ``[N, L]``; level ``l`` has codebook size ``V_l``. The
logical trie is the CSR of docs/design.md ('The SID trie'): nodes numbered breadth-first from the
root, children sorted by token, each full SID mapping to all of its items
(collisions are kept).

Physical format (version 1)
---------------------------
A plain CSR spends one node per level per item below the point where a prefix
holds a single SID (about 70 bytes per item at L = 8). Such *single-SID chains*
are compressed: the edge into the first node of a chain stores the rest of the
SID packed in one 31-bit word, and no node below it is materialized.

Packed key layout: level ``l`` uses ``bits[l] = ceil(log2 V_l)`` bits at
``shift[l] = sum(bits[l+1:])`` (level 0 highest), so the code at level ``l``
of a packed word ``w`` is ``(w >> shift[l]) & ((1 << bits[l]) - 1)``.
``chain_min_depth`` is the shallowest depth ``d >= 1`` whose suffix
(levels ``d..L-1``, ``shift[d-1]`` bits) fits in 31 bits; no chain starts
above it (for PLUM's 2048..16 codebooks it is 3; for 4 x 256 it is 1).

Arrays (``I`` internal nodes, ``E`` edges):

=================  =========================  ==========================================
name               dtype, shape               meaning
=================  =========================  ==========================================
``child_ptr``      int64 ``[I + 1]``           children of internal node ``n`` are edges
                                              ``child_ptr[n] : child_ptr[n + 1]``
``child_token``    int16 (int32 if any        code on each edge, sorted within a node
                   ``V_l > 32768``) ``[E]``
``edge_word``      int32 ``[E]``               ``< 0``: the edge leads to internal node
                                              ``~w``; ``>= 0``: the edge enters a chain
                                              and ``w`` holds the SID's codes of the
                                              levels below the edge, packed as above
``edge_item``      int32/int64 ``[E]``         ``>= 0``: the one item of the chain's SID;
                                              ``-1``: internal edge; ``<= -2``: the SID
                                              has several items, collision group
                                              ``g = -w - 2``
``dup_ptr``        int64 ``[C + 1]``           items of group ``g`` are
``dup_items``      int32/int64                ``dup_items[dup_ptr[g] : dup_ptr[g + 1]]``
                                              (groups in SID order, items in
                                              input row order)
``level_ptr``      int64 ``[L + 1]``           internal nodes at depth ``d`` are
                                              ``level_ptr[d] : level_ptr[d + 1]``
``edge_level_ptr`` int64 ``[L + 1]``           edges labelled with a level-``l`` code are
                                              ``edge_level_ptr[l] : edge_level_ptr[l + 1]``
=================  =========================  ==========================================

Internal nodes are numbered breadth-first (root 0, then by depth, then by
prefix), edges by (depth, prefix), so the children of consecutive internal
nodes are consecutive edges.

States. Kernels and queries walk the trie with one integer *state* per beam:
``0 <= s < I`` is internal node ``s``; ``s >= I`` is the chain entered through
edge ``e = s - I`` and stands for every node of that chain, the depth being
the beam's level. One step from state ``s`` at level ``l`` with code ``c``:

- internal ``s``: find ``c`` among ``child_token[child_ptr[s]:child_ptr[s+1]]``
  at edge ``e``; the next state is ``~edge_word[e]`` if ``edge_word[e] < 0``,
  else ``I + e``;
- chain ``s``: the only child is ``(edge_word[s - I] >> shift[l]) & mask[l]``
  and the next state is ``s`` again.

A full SID always ends in a chain state, whose ``edge_item`` entry gives its
items. ``-1`` is "absent" everywhere.

Files (``save``/``load``) are safetensors files holding the arrays above plus
``codebook_sizes``, with ``__metadata__`` ``{"format": "plum-sid-trie",
"version": "1", ...counts}``. ``load`` checks the whole file first (a damaged
one raises ``ValueError`` naming it); ``mmap=True`` maps the arrays read-only.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Sequence

import numpy as np
from safetensors.numpy import save_file

from plumrec.io import atomic_path

try:  # the C++ builder (csrc/), compiled by the package's build
    _sid_trie = importlib.import_module("plumrec.sid._sid_trie")
except ImportError as e:
    raise ImportError(f"the C++ extension plumrec.sid._sid_trie (the SID trie builder, csrc/) is not built or does "
                      f"not load ({e}): run `pip install -e .` in the checkout") from e

FORMAT_NAME = "plum-sid-trie"
FORMAT_VERSION = 1
_ARRAYS = ("child_ptr", "child_token", "edge_word", "edge_item", "dup_ptr", "dup_items",
           "level_ptr", "edge_level_ptr")
_MAX_CODEBOOK = 2**31


def level_layout(codebook_sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(bits, shift)`` int32 ``[L]`` of the packed key (level 0 highest)."""
    bits = np.array([int(v - 1).bit_length() for v in codebook_sizes], dtype=np.int32)
    shift = np.concatenate([np.cumsum(bits[::-1])[::-1][1:], [0]]).astype(np.int32)
    return bits, shift


def _check_codebook_sizes(codebook_sizes: Sequence[int]) -> tuple[int, ...]:
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


def _check_codes(codes: Any, name: str, num_levels: int, *, exact_levels: bool) -> np.ndarray:
    codes = np.asarray(codes)
    codes = codes if codes.dtype.isnative else codes.astype(codes.dtype.newbyteorder("="))  # C++ reads native order
    if codes.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {codes.dtype}")
    if codes.ndim != 2:
        raise ValueError(f"{name} must be 2-D [M, levels], got shape {codes.shape}")
    if exact_levels and codes.shape[1] != num_levels:
        raise ValueError(f"{name} has {codes.shape[1]} levels, the trie has L = {num_levels}")
    if codes.shape[1] > num_levels:
        raise ValueError(f"{name} has {codes.shape[1]} levels, more than the trie's L = {num_levels}")
    return codes


@dataclasses.dataclass(frozen=True)
class TrieArrays:
    """What the beam-search kernels read, on one device (torch or jax arrays).

    Array fields follow the module docstring; ``shift``/``mask`` are int32
    ``[L]`` for decoding chain words. Integer fields are host-side constants.
    """

    child_ptr: Any
    child_token: Any
    edge_word: Any
    level_ptr: Any
    edge_level_ptr: Any
    shift: Any
    mask: Any
    codebook_sizes: tuple[int, ...]
    num_internal: int
    num_edges: int
    chain_min_depth: int

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def num_states(self) -> int:
        """States are ``0 .. num_internal + num_edges - 1``."""
        return self.num_internal + self.num_edges


class SIDTrie:
    """Compressed SID trie (see the module docstring for the format).

    Build with :func:`build_trie`; query in batches with :meth:`walk`,
    :meth:`contains`, :meth:`items` and :meth:`children`; move to a device
    with :meth:`to_torch` / :meth:`to_jax`.
    """

    def __init__(self, arrays: dict[str, np.ndarray], codebook_sizes: Sequence[int], *,
                 num_items: int, num_sids: int, num_logical_nodes: int, chain_min_depth: int,
                 key_bits: int, num_threads: int = 0):
        self.codebook_sizes = tuple(int(v) for v in codebook_sizes)
        for name in _ARRAYS:
            setattr(self, name, arrays[name])
        self.num_items, self.num_sids, self.num_logical_nodes = int(num_items), int(num_sids), int(num_logical_nodes)
        self.chain_min_depth, self.key_bits, self.num_threads = int(chain_min_depth), int(key_bits), int(num_threads)
        self.bits, self.shift = level_layout(self.codebook_sizes)
        self.mask = ((np.int64(1) << self.bits.astype(np.int64)) - 1).astype(np.int32)

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def num_internal(self) -> int:
        return int(self.child_ptr.shape[0]) - 1

    @property
    def num_edges(self) -> int:
        return int(self.edge_word.shape[0])

    @property
    def num_nodes(self) -> int:
        """Nodes of the logical (uncompressed) trie, root included."""
        return self.num_logical_nodes

    @property
    def num_states(self) -> int:
        return self.num_internal + self.num_edges

    @property
    def nbytes(self) -> int:
        """Bytes of every array the trie holds."""
        return int(sum(getattr(self, n).nbytes for n in _ARRAYS))

    def __len__(self) -> int:
        return self.num_items

    def __repr__(self) -> str:
        return (f"SIDTrie(items={self.num_items}, sids={self.num_sids}, levels={self.codebook_sizes}, internal="
                f"{self.num_internal}, edges={self.num_edges}, {self.nbytes / max(self.num_items, 1):.2f} B/item)")

    def walk(self, prefixes: Any) -> np.ndarray:
        """State ids int64 ``[M]`` after walking each row of ``prefixes [M, l]``
        (``0 <= l <= L``) from the root; ``-1`` where the prefix is absent.
        Codes outside their codebook raise ``ValueError``."""
        prefixes = _check_codes(prefixes, "prefixes", self.num_levels, exact_levels=False)
        return _sid_trie.walk(prefixes, list(self.codebook_sizes), self.child_ptr, self.child_token,
                              self.edge_word, self.num_threads)

    def contains(self, codes: Any) -> np.ndarray:
        """bool ``[M]``: whether each full SID ``codes [M, L]`` exists."""
        codes = _check_codes(codes, "codes", self.num_levels, exact_levels=True)
        return self.walk(codes) >= 0

    def items(self, codes: Any) -> list[np.ndarray]:
        """The items of each full SID ``codes [M, L]`` (empty where absent)."""
        codes = _check_codes(codes, "codes", self.num_levels, exact_levels=True)
        flat, offsets = self.items_flat(codes)
        return np.split(flat, offsets[1:-1])

    def items_flat(self, codes: Any) -> tuple[np.ndarray, np.ndarray]:
        """Vectorized :meth:`items`: ``(items, offsets [M + 1])`` where the
        items of row ``m`` are ``items[offsets[m]:offsets[m + 1]]``."""
        codes = _check_codes(codes, "codes", self.num_levels, exact_levels=True)
        states = self.walk(codes)
        found = states >= self.num_internal  # a full SID always ends in a chain state
        word = np.full(states.shape, -1, dtype=np.int64)
        word[found] = self.edge_item[states[found] - self.num_internal]
        group = np.where(word <= -2, -word - 2, 0)
        dup_ptr = np.asarray(self.dup_ptr)
        dup_start = dup_ptr[group]
        dup_end = dup_ptr[np.minimum(group + 1, len(dup_ptr) - 1)]
        counts = np.where(word >= 0, 1, np.where(word <= -2, dup_end - dup_start, 0))
        offsets = np.zeros(len(states) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        row = np.repeat(np.arange(len(states)), counts)
        pos = np.arange(offsets[-1]) - offsets[row]
        single = word[row] >= 0
        flat = np.empty(offsets[-1], dtype=self.edge_item.dtype)
        flat[single] = word[row[single]]
        flat[~single] = np.asarray(self.dup_items)[dup_start[row[~single]] + pos[~single]]
        return flat, offsets

    def depth_of(self, state: int) -> int | None:
        """Depth of an internal state; ``None`` for a chain state (any depth below its entry edge)."""
        if not 0 <= state < self.num_states:
            raise ValueError(f"state must be in [0, {self.num_states}), got {state}")
        if state >= self.num_internal:
            return None
        return int(np.searchsorted(self.level_ptr, state, side="right")) - 1

    def children(self, node: int, depth: int | None = None) -> np.ndarray:
        """Tokens (int64, sorted) of the children of state ``node``.

        For a chain state the depth is not stored in the state, so ``depth``
        (the number of codes walked to reach it) is required; for an internal
        node it is optional and checked."""
        node = int(node)
        own = self.depth_of(node)
        if own is not None:
            if depth is not None and depth != own:
                raise ValueError(f"node {node} is at depth {own}, not {depth}")
            lo, hi = int(self.child_ptr[node]), int(self.child_ptr[node + 1])
            return np.asarray(self.child_token[lo:hi], dtype=np.int64)
        if depth is None:
            raise ValueError(f"node {node} is a compressed chain: pass depth= to children()")
        e = node - self.num_internal
        entry = int(np.searchsorted(self.edge_level_ptr, e, side="right"))  # depth the chain starts at
        if not entry <= depth <= self.num_levels:
            raise ValueError(f"depth must be in [{entry}, {self.num_levels}] for chain node {node}, got {depth}")
        if depth == self.num_levels:
            return np.empty(0, dtype=np.int64)
        w = int(self.edge_word[e])
        return np.array([(w >> int(self.shift[depth])) & int(self.mask[depth])], dtype=np.int64)

    def _device_arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("child_ptr", "child_token", "edge_word", "level_ptr", "edge_level_ptr",
                                              "shift", "mask")}

    def _meta(self) -> dict[str, Any]:
        return {"codebook_sizes": self.codebook_sizes, "num_internal": self.num_internal,
                "num_edges": self.num_edges, "chain_min_depth": self.chain_min_depth}

    def to_torch(self, device: Any = "cpu") -> TrieArrays:
        """The kernel arrays as torch tensors on ``device``."""
        import torch

        arrs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in self._device_arrays().items()}
        return TrieArrays(**arrs, **self._meta())

    def to_jax(self, device: Any = None) -> TrieArrays:
        """The kernel arrays as jax arrays. Without ``jax_enable_x64`` the
        int64 arrays are stored as int32, which requires every value to fit."""
        import jax
        import jax.numpy as jnp

        x64 = jax.config.jax_enable_x64
        arrs = {}
        for k, v in self._device_arrays().items():
            if v.dtype == np.int64 and not x64:
                if v.size and int(v.max()) >= 2**31:
                    raise ValueError(f"trie array {k} needs int64; enable jax_enable_x64")
                v = v.astype(np.int32)
            a = jnp.asarray(np.ascontiguousarray(v))
            arrs[k] = jax.device_put(a, device) if device is not None else a
        return TrieArrays(**arrs, **self._meta())

    def save(self, path: str | os.PathLike) -> None:
        """Write the trie to one safetensors file (atomically)."""
        path = os.fspath(path)
        tensors = {n: np.ascontiguousarray(getattr(self, n)) for n in _ARRAYS}
        tensors["codebook_sizes"] = np.asarray(self.codebook_sizes, dtype=np.int64)
        meta = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "num_items": str(self.num_items),
                "num_sids": str(self.num_sids), "num_logical_nodes": str(self.num_logical_nodes),
                "chain_min_depth": str(self.chain_min_depth), "key_bits": str(self.key_bits)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> "SIDTrie":
        """Read a trie written by :meth:`save`; with ``mmap=True`` the arrays
        are memory-mapped read-only instead of read. The whole file is checked
        first (header against file size, dtypes, lengths, pointers, indices):
        a damaged file raises ``ValueError`` naming it and what is wrong."""
        path = os.fspath(path)
        arrays, meta = _read_file(path, mmap)
        counts = _check_header_arrays(path, arrays, meta)
        _check_edges(path, arrays, counts)
        return cls(arrays, arrays["codebook_sizes"].tolist(), **counts)


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
    names, start, spans = sorted((*_ARRAYS, "codebook_sizes")), 8 + n, []
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
        counts = {k: int(meta[k]) for k in ("num_items", "num_sids", "num_logical_nodes", "chain_min_depth",
                                            "key_bits")}
        sizes = _check_codebook_sizes(a["codebook_sizes"].tolist())
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is damaged: bad metadata or codebook_sizes ({e!r})") from e
    L, (bits, shift) = len(sizes), level_layout(sizes)
    dstar = next(d for d in range(1, L + 1) if shift[d - 1] <= 31)
    _require(path, (counts["key_bits"], counts["chain_min_depth"]) == (bits.sum(), dstar) and bits.sum() <= 128,
             f"key_bits, chain_min_depth = {counts['key_bits']}, {counts['chain_min_depth']}; the codebook_sizes "
             f"give {bits.sum()}, {dstar} (at most 128 bits)")
    item = np.int32 if a["edge_item"].dtype == np.int32 else np.int64
    for name in _ARRAYS + ("codebook_sizes",):
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


def build_trie(codes: Any, codebook_sizes: Sequence[int], item_ids: Any = None, *,
               num_threads: int = 0) -> SIDTrie:
    """Build the SID trie of ``codes`` (integer array ``[N, L]``, any integer
    dtype, read in place without a copy unless its byte order is not native).

    Item ``i`` is row ``i`` unless ``item_ids`` (integer ``[N]``) says
    otherwise; several items may share a SID. ``num_threads=0`` uses every
    core. Codes outside ``[0, codebook_sizes[l])`` raise ``ValueError`` naming
    the row and level; nothing is clamped.
    """
    sizes = _check_codebook_sizes(codebook_sizes)
    codes = _check_codes(codes, "codes", len(sizes), exact_levels=True)
    n = codes.shape[0]
    if n == 0:
        raise ValueError("codes is empty: a trie needs at least one SID")
    ids = None
    if item_ids is not None:
        ids = np.asarray(item_ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"item_ids must be an integer array, got dtype {ids.dtype}")
        if ids.ndim != 1 or ids.shape[0] != n:
            raise ValueError(f"item_ids must have shape [{n}] (one per row of codes), got {ids.shape}")
        if ids.size and int(ids.min()) < 0:
            raise ValueError(f"item_ids must be non-negative, item_ids[{int(ids.argmin())}] = {int(ids.min())}")
        if ids.dtype.kind == "u" and ids.size and int(ids.max()) >= 2**63:
            raise ValueError("item_ids must be below 2**63")
        fits32 = not ids.size or int(ids.max()) < 2**31
        ids = np.ascontiguousarray(ids, dtype=np.int32 if fits32 else np.int64)
    elif n >= 2**31:
        ids = np.arange(n, dtype=np.int64)
    out = _sid_trie.build(codes, list(sizes), ids, int(num_threads))
    return SIDTrie({k: out[k] for k in _ARRAYS}, sizes, num_items=n, num_sids=int(out["num_sids"]),
                   num_logical_nodes=int(out["num_logical_nodes"]), chain_min_depth=int(out["chain_min_depth"]),
                   key_bits=int(out["key_bits"]), num_threads=num_threads)
