"""Reference builders of the SID trie, for tests and benchmarks.

Both produce exactly the arrays of the physical format in :mod:`plumrec.sid.trie`
(same numbering, same dtypes) from the same inputs as :func:`build_trie`:

- :func:`build_python`: plain Python, a dict-of-dicts trie compressed by a
  breadth-first walk; readable, slow (tests, up to ~1M items in benchmarks).
- :func:`build_numpy`: numpy-vectorized (``lexsort`` + ``diff``), the
  baseline the C++ builder is measured against.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import numpy as np

from plumrec.sid.trie import _ARRAYS, SIDTrie, _check_codebook_sizes, _check_codes, level_layout


def _chain_min_depth(shift: np.ndarray) -> int:
    L = len(shift)
    return next(d for d in range(1, L + 1) if shift[d - 1] <= 31)


def _dtypes(sizes: Sequence[int], item_ids: np.ndarray | None, n: int):
    tok = np.int16 if max(sizes) <= 32768 else np.int32
    if item_ids is None:
        item = np.int32 if n < 2**31 else np.int64
    else:
        item = np.int32 if (item_ids.size == 0 or int(item_ids.max()) < 2**31) else np.int64
    return tok, item


def _finish(arrays: dict[str, Any], sizes, n, num_sids, logical, dstar, tok, item) -> SIDTrie:
    dt = {"child_ptr": np.int64, "child_token": tok, "edge_word": np.int32, "edge_item": item,
          "dup_ptr": np.int64, "dup_items": item, "level_ptr": np.int64, "edge_level_ptr": np.int64}
    arrs = {k: np.asarray(arrays[k], dtype=dt[k]) for k in _ARRAYS}
    bits, _ = level_layout(sizes)
    return SIDTrie(arrs, sizes, num_items=n, num_sids=num_sids, num_logical_nodes=logical,
                   chain_min_depth=dstar, key_bits=int(bits.sum()))


def build_python(codes: Any, codebook_sizes: Sequence[int], item_ids: Any = None) -> SIDTrie:
    """Plain-Python reference: build the logical trie as nested dicts, then
    number internal nodes and edges breadth-first, compressing every subtree
    that holds a single SID below ``chain_min_depth``."""
    sizes = _check_codebook_sizes(codebook_sizes)
    codes = _check_codes(codes, "codes", len(sizes), exact_levels=True)
    L, n = len(sizes), codes.shape[0]
    ids = None if item_ids is None else np.asarray(item_ids)
    bits, shift = level_layout(sizes)
    dstar = _chain_min_depth(shift)
    sid_items: dict[tuple, list[int]] = {}
    for r, row in enumerate(codes.tolist()):
        for l, c in enumerate(row):
            if not 0 <= c < sizes[l]:
                raise ValueError(f"codes[{r}, {l}] = {c} is outside level {l}'s codebook")
        sid_items.setdefault(tuple(row), []).append(r if ids is None else int(ids[r]))
    root: dict = {}
    for sid in sid_items:
        node = root
        for c in sid:
            node = node.setdefault(c, {})
    logical = 1 + len({sid[:d] for sid in sid_items for d in range(1, L + 1)})

    def single_sid(prefix: tuple, node: dict) -> tuple | None:
        sid = prefix
        while len(sid) < L:
            if len(node) != 1:
                return None
            (c, node), = node.items()
            sid = sid + (c,)
        return sid

    # collision groups are numbered in lexicographic SID order
    groups = {sid: g for g, sid in enumerate(s for s in sorted(sid_items) if len(sid_items[s]) > 1)}
    dup_ptr = np.cumsum([0] + [len(sid_items[s]) for s in groups]).tolist()
    dup_items = [i for s in groups for i in sid_items[s]]
    child_ptr, child_token, edge_word, edge_item = [], [], [], []
    level_count = [0] * (L + 1)
    edge_level_count = [0] * L
    queue = deque([((), root)])
    next_internal = 1
    while queue:
        prefix, node = queue.popleft()
        level_count[len(prefix)] += 1
        child_ptr.append(len(child_token))
        for c in sorted(node):
            child, cprefix = node[c], prefix + (c,)
            d = len(cprefix)
            child_token.append(c)
            edge_level_count[d - 1] += 1
            sid = single_sid(cprefix, child) if d >= dstar else None
            if sid is None:
                edge_word.append(~next_internal)
                edge_item.append(-1)
                next_internal += 1
                queue.append((cprefix, child))
            else:
                word = 0
                for l in range(d, L):
                    word |= sid[l] << int(shift[l])
                edge_word.append(word)
                its = sid_items[sid]
                if len(its) == 1:
                    edge_item.append(its[0])
                else:
                    edge_item.append(-(groups[sid] + 2))
    child_ptr.append(len(child_token))
    level_ptr = np.concatenate([[0], np.cumsum(level_count[:L])])
    edge_level_ptr = np.concatenate([[0], np.cumsum(edge_level_count)])
    arrays = dict(child_ptr=child_ptr, child_token=child_token, edge_word=edge_word, edge_item=edge_item,
                  dup_ptr=dup_ptr, dup_items=dup_items, level_ptr=level_ptr, edge_level_ptr=edge_level_ptr)
    tok, item = _dtypes(sizes, ids, n)
    return _finish(arrays, sizes, n, len(sid_items), logical, dstar, tok, item)


def build_numpy(codes: Any, codebook_sizes: Sequence[int], item_ids: Any = None) -> SIDTrie:
    """numpy-vectorized build (``lexsort`` + ``diff``): the baseline of
    ``benchmarks/bench_trie.py``. Same output as :func:`build_trie`."""
    sizes = _check_codebook_sizes(codebook_sizes)
    codes = _check_codes(codes, "codes", len(sizes), exact_levels=True)
    L, n = len(sizes), codes.shape[0]
    if n == 0:
        raise ValueError("codes is empty")
    ok = (codes >= 0) & (codes < np.asarray(sizes))
    if not ok.all():
        r, l = map(int, np.argwhere(~ok)[0])
        raise ValueError(f"codes[{r}, {l}] = {codes[r, l]} is outside level {l}'s codebook")
    ids = None if item_ids is None else np.asarray(item_ids)
    bits, shift = level_layout(sizes)
    dstar = _chain_min_depth(shift)
    order = np.lexsort(codes.T[::-1])
    S = codes[order].astype(np.int64)
    neq = S[1:] != S[:-1]
    lcp = np.where(neq.any(axis=1), neq.argmax(axis=1), L)  # shared levels with the previous row
    starts = np.concatenate([[0], np.flatnonzero(lcp < L) + 1])
    U = starts.size
    sid_lcp = np.concatenate([[0], lcp[starts[1:] - 1]])
    nxt = np.concatenate([sid_lcp[1:], [0]])
    term = np.maximum(np.maximum(sid_lcp, nxt) + 1, dstar)
    first = np.where(np.arange(U) == 0, 1, sid_lcp + 1)
    keys = S[starts]
    ends = np.concatenate([starts[1:], [n]])
    counts = ends - starts
    item_of = order if ids is None else ids[order]

    edge_sel = [None] + [np.flatnonzero((first <= d) & (d <= term)) for d in range(1, L + 1)]
    int_sel = [None] + [np.flatnonzero((first <= d) & (d < term)) for d in range(1, L + 1)]
    edge_base = np.zeros(L + 2, dtype=np.int64)
    int_base = np.zeros(L + 2, dtype=np.int64)
    int_base[1] = 1
    for d in range(1, L + 1):
        edge_base[d + 1] = edge_base[d] + edge_sel[d].size
        int_base[d + 1] = int_base[d] + int_sel[d].size
    E, I = int(edge_base[L + 1]), int(int_base[L + 1])
    child_ptr = np.empty(I + 1, dtype=np.int64)
    child_ptr[0], child_ptr[I] = 0, E
    child_token = np.empty(E, dtype=np.int64)
    edge_word = np.empty(E, dtype=np.int64)
    edge_item = np.full(E, -1, dtype=np.int64)
    dup_j = np.flatnonzero(counts > 1)
    dup_of = np.full(U, -1, dtype=np.int64)
    dup_of[dup_j] = np.arange(dup_j.size)
    for d in range(1, L + 1):
        js = edge_sel[d]
        e = edge_base[d] + np.arange(js.size)
        child_token[e] = keys[js, d - 1]
        internal = d < term[js]
        node = int_base[d] + np.arange(int(internal.sum()))
        edge_word[e[internal]] = ~node
        if d < L and node.size:
            child_ptr[node] = edge_base[d + 1] + np.searchsorted(edge_sel[d + 1], js[internal])
        cj = js[~internal]
        word = np.zeros(cj.size, dtype=np.int64)
        for l in range(d, L):
            word |= keys[cj, l] << int(shift[l])
        ce = e[~internal]
        edge_word[ce] = word
        single = counts[cj] == 1
        edge_item[ce[single]] = item_of[starts[cj[single]]]
        edge_item[ce[~single]] = -(dup_of[cj[~single]] + 2)
    dup_ptr = np.concatenate([[0], np.cumsum(counts[dup_j])])
    dup_items = item_of[np.concatenate([np.arange(s, e) for s, e in zip(starts[dup_j], ends[dup_j])])] \
        if dup_j.size else np.empty(0, dtype=np.int64)
    logical = 1 + int((L - first + 1).sum())
    arrays = dict(child_ptr=child_ptr, child_token=child_token, edge_word=edge_word, edge_item=edge_item,
                  dup_ptr=dup_ptr, dup_items=dup_items, level_ptr=np.minimum(int_base[:L + 1], I),
                  edge_level_ptr=edge_base[1:L + 2])
    tok, item = _dtypes(sizes, ids, n)
    return _finish(arrays, sizes, n, U, logical, dstar, tok, item)
