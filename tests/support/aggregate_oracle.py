"""Float64 oracle of ``trie_aggregate``, built on the SIDTrie query API (``walk``, ``items``), independent
of the kernels' bottom-up reading of the CSR: every SID's mass is the sum of its items' masses, every
logical prefix's the sum over the SIDs below it, and each edge is found by walking each SID's prefixes.
Also the tries the aggregate and biased-search tests share (chains, collision groups, 64- and 128-bit
keys)."""
from __future__ import annotations

import numpy as np

from plumrec.sid import build_trie

# (codebook sizes, key bits): 33 bits, 60 bits (PLUM's codebooks, 64-bit keys), 67 bits (128-bit keys,
# int32 edge tokens)
KINDS = {"small": (8, 4, 6, 5), "plum": (2048, 1024, 512, 256, 128, 64, 32, 16),
         "wide128": (40000, 40000, 40000, 40000, 8)}


def make_items(kind: str, rng: np.random.Generator, n: int = 150, sparse_ids: bool = False):
    """``(trie, codes [N, L], item_ids [N])``: random SIDs sharing prefixes (internal nodes several levels
    deep), collisions (several items on one SID) and single-SID chains. ``sparse_ids``: item ids with gaps
    (ids no SID holds) in shuffled order."""
    sizes = KINDS[kind]
    L = len(sizes)
    base = np.stack([rng.integers(0, v, n) for v in sizes], 1)
    for d in range(1, L):   # shared prefixes of every depth
        k = n // (2 * L)
        base[d * k:(d + 1) * k, :d] = base[0, :d]
    codes = np.concatenate([base, base[: n // 6], base[: n // 20]])    # collision groups of 2 and 3 items
    N = len(codes)
    ids = rng.permutation(3 * N)[:N] if sparse_ids else np.arange(N)
    return build_trie(codes, sizes, item_ids=ids if sparse_ids else None), codes, ids


def oracle_aggregate(trie, codes: np.ndarray, item_ids: np.ndarray, mass: np.ndarray, eps: float):
    """float64 ``(node_mass [I], edge_mass [E], edge_bias [E], paths)``: ``paths`` maps each SID (tuple)
    to the list of edges on its root-to-leaf path and its smoothed ``log d(sid)``."""
    sids, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    sid_mass = np.zeros(len(sids))
    np.add.at(sid_mass, inverse, mass.astype(np.float64)[item_ids])
    I, E, L, S = trie.num_internal, trie.num_edges, trie.num_levels, len(sids)
    node_mass, node_cnt = np.zeros(I), np.zeros(I)
    edge_mass, edge_cnt, parent = np.zeros(E), np.zeros(E), np.full(E, -1)
    into = {int(~w): e for e, w in enumerate(trie.edge_word.tolist()) if w < 0}
    states = [trie.walk(sids[:, :l]) for l in range(L + 1)]
    edges = [[] for _ in range(S)]
    for l in range(L):
        for k in np.flatnonzero(states[l] < I):   # prefix at an internal node: the next code takes an edge
            p, s = int(states[l][k]), int(states[l + 1][k])
            e = s - I if s >= I else into[s]
            node_mass[p] += sid_mass[k]
            node_cnt[p] += 1
            edge_mass[e] += sid_mass[k]
            edge_cnt[e] += 1
            parent[e] = p
            edges[k].append(e)
    assert (parent >= 0).all(), "every edge lies on some SID's path"
    bias = np.log(edge_mass + eps * edge_cnt) - np.log(node_mass[parent] + eps * node_cnt[parent])
    total = sid_mass.sum() + eps * S
    paths = {tuple(s): (edges[k], np.log((sid_mass[k] + eps) / total)) for k, s in enumerate(sids.tolist())}
    return node_mass, edge_mass, bias, paths
