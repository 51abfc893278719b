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

Files (``save``/``load``): one safetensors file, :mod:`plumrec.sid.trie_file`.
Devices: :meth:`SIDTrie.to_torch` / :meth:`SIDTrie.to_jax` give the kernel
arrays as ``plum_kernels``' ``TrieArrays``.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Sequence

import numpy as np

from plum_kernels.beam.trie_arrays import TrieArrays
from plumrec.sid.trie_file import ARRAYS as _ARRAYS
from plumrec.sid.trie_file import FORMAT_NAME, FORMAT_VERSION, level_layout, read_trie_file, write_trie_file
from plumrec.sid.trie_file import check_codebook_sizes as _check_codebook_sizes

try:  # the C++ builder (csrc/), compiled by the package's build
    _sid_trie = importlib.import_module("plumrec.sid._sid_trie")
except ImportError as e:
    raise ImportError(f"the C++ extension plumrec.sid._sid_trie (the SID trie builder, csrc/) is not built or does "
                      f"not load ({e}): run `pip install -e .` in the checkout") from e

__all__ = ["SIDTrie", "TrieArrays", "build_trie", "level_layout", "FORMAT_NAME", "FORMAT_VERSION"]


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


    def beam_items(self, codes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, int, int]:
        """One user's beams -> ``(items best first, live beams, live beams whose SID is not in the trie)``.

        ``codes [W, L]`` int, ``scores [W]`` float, beams best first; a beam is live when its score is finite.
        The items of the live beams' SIDs in beam order (colliding items all kept, in trie order), int64."""
        live = np.isfinite(scores)
        flat, offs = self.items_flat(np.where(live[:, None], codes, 0).astype(np.int64))
        present = np.diff(offs) > 0
        ranked = [flat[offs[w]:offs[w + 1]] for w in np.flatnonzero(live & present)]
        ranked = np.concatenate(ranked).astype(np.int64) if ranked else np.zeros(0, np.int64)
        return ranked, int(live.sum()), int((live & ~present).sum())
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
        """The kernel arrays (``plum_kernels.torch``'s trie argument): a
        ``TrieArrays`` of torch tensors on ``device`` (dtypes of the module
        docstring; ``shift``/``mask`` int32 ``[L]``)."""
        import torch

        arrs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in self._device_arrays().items()}
        return TrieArrays(**arrs, **self._meta())

    def to_jax(self, device: Any = None) -> TrieArrays:
        """The kernel arrays (``plum_kernels.jax``'s trie argument): a
        ``TrieArrays`` of jax arrays on ``device`` (a ``jax.Device`` or
        sharding; ``None``: the default device), a JAX pytree whose integers
        are static, so one ``jax.jit`` trace serves every trie of the same
        shapes. Without ``jax_enable_x64`` the int64 arrays become int32,
        ``ValueError`` if a value does not fit."""
        return TrieArrays.from_trie(self, device)

    def save(self, path: str | os.PathLike) -> None:
        """Write the trie to one safetensors file (atomically; format in :mod:`plumrec.sid.trie_file`)."""
        counts = {"num_items": self.num_items, "num_sids": self.num_sids, "chain_min_depth": self.chain_min_depth,
                  "num_logical_nodes": self.num_logical_nodes, "key_bits": self.key_bits}
        write_trie_file(path, {n: getattr(self, n) for n in _ARRAYS}, self.codebook_sizes, counts)

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> "SIDTrie":
        """Read a trie written by :meth:`save`; with ``mmap=True`` the arrays
        are memory-mapped read-only instead of read. The whole file is checked
        first (header against file size, dtypes, lengths, pointers, indices):
        a damaged file raises ``ValueError`` naming it and what is wrong."""
        arrays, counts = read_trie_file(path, mmap)
        return cls(arrays, arrays["codebook_sizes"].tolist(), **counts)


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
