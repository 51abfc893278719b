"""Float64 oracle of the constrained beam step, built on the SIDTrie query API
(``walk``/``children``), independent of the kernels' CSR reading.

Beams are described by their prefixes, so that every state is the one
``SIDTrie.walk`` gives; the oracle ranks every (beam, child) candidate by
(score desc, parent asc, token asc) in float64.
"""
from __future__ import annotations

import numpy as np

from plumrec.sid import build_trie


def make_trie(kind: str, rng: np.random.Generator):
    """Small tries covering the physical format's cases."""
    if kind == "wide":          # wide first level, collisions, chains from depth 1
        sizes = (64, 16, 8, 4)
        codes = np.stack([rng.integers(0, v, 400) for v in sizes], 1)
        codes = np.concatenate([codes, codes[:40]])                   # collisions
    elif kind == "plum":        # PLUM's codebooks: chain_min_depth = 3, root with ~150 children
        sizes = (2048, 1024, 512, 256, 128, 64, 32, 16)
        base = np.stack([rng.integers(0, v, 60) for v in sizes], 1)
        codes = np.concatenate([np.repeat(base[:, :3], 3, 0),
                                np.stack([rng.integers(0, v, 180) for v in sizes[3:]], 1)], 1)
        codes = np.concatenate([codes, np.stack([rng.integers(0, v, 90) for v in sizes], 1)])
    elif kind == "single":      # one item: a chain right below the root
        sizes = (8, 8, 8)
        codes = np.array([[3, 5, 1]])
    elif kind == "dense":       # small codebooks, nearly every SID present
        sizes = (4, 3, 5)
        codes = np.stack([rng.integers(0, v, 80) for v in sizes], 1)
    else:
        raise ValueError(kind)
    return build_trie(codes, sizes), np.unique(codes, axis=0)


def beam_prefixes(sids: np.ndarray, level: int, B: int, W: int, rng: np.random.Generator):
    """Random live prefixes of existing SIDs (some beams dead), their scores."""
    prefixes = np.zeros((B, W, level), dtype=np.int64)
    scores = (-rng.random((B, W)) * 4).astype(np.float32)
    live = rng.random((B, W)) < 0.8
    live[:, 0] = True
    for b in range(B):
        rows = rng.integers(0, len(sids), W)
        prefixes[b] = sids[rows, :level]
    if level == 0:
        live[:] = False
        live[:, 0] = True
        scores[:] = 0.0
    scores = np.where(live, scores, -np.inf).astype(np.float32)
    dead_node = rng.random((B, W)) < 0.5     # dead beams: -1 node or -inf score
    return prefixes, scores, live, dead_node


def states(trie, prefixes: np.ndarray, live: np.ndarray, dead_node: np.ndarray) -> np.ndarray:
    B, W, level = prefixes.shape
    s = trie.walk(prefixes.reshape(B * W, level)).reshape(B, W)
    assert (s >= 0).all()
    return np.where(live | ~dead_node, s, -1)


def oracle_step(trie, logits: np.ndarray, scores: np.ndarray, prefixes: np.ndarray, nodes: np.ndarray,
                level: int, W: int, normalize: str, offset: int = 0, edge_bias: np.ndarray | None = None):
    """List per user of every candidate (score64, parent, token, next_state), best first. ``edge_bias [E]``:
    added to the candidate through edge ``child_ptr[s] + p`` (child ``p`` of internal state ``s``), 0 inside a
    chain."""
    V = trie.codebook_sizes[level]
    x = logits[..., offset:offset + V].astype(np.float64)
    out = []
    for b in range(logits.shape[0]):
        cands = []
        for w in range(logits.shape[1]):
            if nodes[b, w] < 0 or scores[b, w] == -np.inf:
                continue
            toks = trie.children(int(nodes[b, w]), level)
            row = x[b, w]
            if normalize == "codebook":
                m = row.max()
                lse = m + np.log(np.exp(row - m).sum())
            else:
                c = row[toks]
                lse = c.max() + np.log(np.exp(c - c.max()).sum())
            nxt = trie.walk(np.concatenate([np.repeat(prefixes[b, w][None], len(toks), 0),
                                            toks[:, None]], 1))
            s = int(nodes[b, w])
            for p, (t, n) in enumerate(zip(toks.tolist(), nxt.tolist())):
                sc = float(scores[b, w]) + row[t] - lse
                if edge_bias is not None and s < trie.num_internal:
                    sc += float(edge_bias[int(trie.child_ptr[s]) + p])
                if sc > -np.inf:
                    cands.append((sc, w, t, n))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        out.append(cands)
    return out


def assert_step_matches(out, oracle, W: int, *, rtol: float, exact: bool = False):
    """``out`` = numpy (scores, nodes, parent, token) [B, W]. Scores match the
    oracle slot by slot within ``rtol``; (parent, token, node) match exactly
    wherever the oracle's neighbours are separated by more than the tolerance
    (everywhere when ``exact``); every kept candidate is a real one with the
    right score; empty slots are -inf / -1 / 0 / -1."""
    scores, nodes, parent, token = out
    for b, full in enumerate(oracle):
        cands = full[:W]
        n = len(cands)
        assert np.all(np.isneginf(scores[b, n:])), (b, scores[b])
        assert np.all(nodes[b, n:] == -1) and np.all(parent[b, n:] == 0) and np.all(token[b, n:] == -1)
        ref = np.array([c[0] for c in cands])
        tol = rtol * np.maximum(np.abs(ref), 1.0)
        np.testing.assert_allclose(scores[b, :n], ref, rtol=0, atol=float(tol.max()) if n else 0)
        assert np.all(np.diff(scores[b, :n]) <= 0), "scores not best first"
        lookup = {(c[1], c[2]): c for c in full}
        allc = set()
        for i in range(n):
            key = (int(parent[b, i]), int(token[b, i]))
            assert key not in allc, f"duplicate candidate {key}"
            allc.add(key)
            above = i == 0 or ref[i - 1] - ref[i] > 2 * tol[i]
            below = i == n - 1 or ref[i] - ref[i + 1] > 2 * tol[i]
            sep = exact or (above and below)
            if sep:
                assert key == (cands[i][1], cands[i][2]), (b, i, key, cands[i])
                assert int(nodes[b, i]) == cands[i][3]
            elif key in lookup:
                assert int(nodes[b, i]) == lookup[key][3]
                assert abs(lookup[key][0] - ref[i]) <= 4 * tol[i]
            else:
                raise AssertionError(f"user {b} slot {i}: {key} is not among the oracle's best {W}")
