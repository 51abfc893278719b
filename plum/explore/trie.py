"""The exploration bias on the SID trie: a per-item bias split into per-edge biases for the beam step.

Frank-Wolfe's linear oracle ranks each user's items by ``s_u(i) + b(i)``
(:mod:`plumrec.explore.objective`), with the user-independent bias
``b(i) = c (log t(i) - log(d(i) + sigma))``, ``c = lam / K`` (``t = 1`` for the entropy). On the trie
``log`` of a positive mass is additive along the path: with ``m(n)`` the sum of the masses of the SIDs
below node ``n`` (the subtree sums of ``trie_aggregate``),

    log m(sid) = log m(root) + sum_{edges (p -> c) on the path} log(m(c) / m(p)),

so ``-c log(d + sigma)`` becomes the per-edge bias ``-c log(m(c) / m(p))`` (the share of the parent's
exposure that goes down each edge), which the beam step adds to the model's log-probabilities: one
gather-add per level. The target's part ``c log t`` is split the same way over the subtree sums of ``t``.
Below the entry edge of a compressed chain the subtree holds one SID, so the chain's further levels add 0
and one value per physical edge ``[E]`` is the whole table.

**Collision groups.** Items sharing one SID cannot be told apart by the beam: the beam scores the SID,
and the SID's items come out together. The rule: a SID stands for its *best* item, the one of its group
with the highest ``b(i)`` (the least exposed relative to the target; the first in the group's order on
ties): the SID's mass in the split is that item's ``d(i) + sigma`` (and ``t(i)``), so the biased beam
scores the SID ``s_u(sid) + max_{i in group} b(i)``. Every item keeps a residual
``item[i] = b(i) - max_{j in its group} b(j) <= 0`` (0 for single items and for each group's best),
which is added to its SID's beam score when the beams are expanded into items (:func:`expand_beams`);
items are then ranked by that score. Because a SID's beam score equals its best item's score and the
residuals are never positive, W beams holding the W best SIDs contain the K best items for any
``W >= K``: the biased beam search followed by the expansion is the item-level linear oracle.

Items are ``0 .. M-1`` (``M = trie.num_items``), each once in the trie (build it without ``item_ids``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import plum_kernels.torch as K
from plumrec.explore.frank_wolfe import Mixture
from plumrec.explore.objective import Regulariser, check_k, check_lam, exploration_bias
from plumrec.sid.trie import SIDTrie

__all__ = ["TriePaths", "EdgeBias", "BiasTables", "subtree_mass", "path_log_ratios", "exposure_edge_bias",
           "bias_split", "mixture_bias_tables", "edge_log_softmax", "trie_oracle", "rank_beam_items", "expand_beams"]


class TriePaths:
    """Each item's SID and path of physical edges, read from the trie's arrays.

    ``parent [E]`` int64: the internal node each edge leaves; ``sid_ptr [E + 1]``, ``sid_items [M]`` int64:
    the items of the SID entered through chain edge ``e`` are ``sid_items[sid_ptr[e]:sid_ptr[e + 1]]``
    (the collision group's order; internal edges hold none); ``item_edge [M]`` int64: each item's chain
    edge (its SID); ``item_pos [M]`` int64: its position in its group; ``paths [M, L]`` int64: the edges
    from the root to the item, padded with ``-1``; ``arrays``: ``trie.to_torch("cpu")`` for the kernels.
    """

    def __init__(self, trie: SIDTrie):
        if not isinstance(trie, SIDTrie):
            raise ValueError(f"trie must be a SIDTrie, got {type(trie).__name__}")
        self.trie, self.arrays = trie, trie.to_torch("cpu")
        ptr, word = np.asarray(trie.child_ptr, np.int64), np.asarray(trie.edge_word, np.int64)
        eitem, dup_ptr = np.asarray(trie.edge_item, np.int64), np.asarray(trie.dup_ptr, np.int64)
        dup_items = np.asarray(trie.dup_items, np.int64)
        I, E, M = trie.num_internal, trie.num_edges, trie.num_items
        self.num_edges, self.num_items = E, M
        self.parent = np.repeat(np.arange(I), np.diff(ptr))
        group = np.where(eitem <= -2, -eitem - 2, 0)
        counts = (eitem >= 0).astype(np.int64)
        counts[eitem <= -2] = np.diff(dup_ptr)[group[eitem <= -2]]
        self.sid_ptr = np.concatenate([[0], np.cumsum(counts)])
        row = np.repeat(np.arange(E), counts)
        pos = np.arange(len(row)) - self.sid_ptr[row]
        single = eitem[row] >= 0
        items = eitem[row].copy()
        if (~single).any():
            items[~single] = dup_items[dup_ptr[group[row[~single]]] + pos[~single]]
        if len(items) != M or not np.array_equal(np.sort(items), np.arange(M)):
            raise ValueError(f"trie: its items must be 0 .. {M - 1}, each once (build it without item_ids)")
        self.sid_items = items
        self.item_edge, self.item_pos = np.empty(M, np.int64), np.empty(M, np.int64)
        self.item_edge[items], self.item_pos[items] = row, pos
        incoming = np.full(I, -1, np.int64)
        inner = np.flatnonzero(word < 0)
        incoming[~word[inner]] = inner
        steps = [self.item_edge]
        for _ in range(trie.num_levels - 1):
            up = steps[-1]
            steps.append(np.where(up >= 0, incoming[self.parent[np.maximum(up, 0)]], -1))
        self.paths = np.stack(steps[::-1], 1)

    def sums(self, edge_values) -> np.ndarray:
        """``[..., M]`` float64: the sum of ``edge_values [..., E]`` along each item's path."""
        v = np.asarray(edge_values, np.float64)
        if v.shape[-1:] != (self.num_edges,):
            raise ValueError(f"edge_values must end in E = {self.num_edges} edges, got shape {v.shape}")
        padded = np.concatenate([v, np.zeros(v.shape[:-1] + (1,))], -1)  # index -1 reads the padding, 0
        return padded[..., self.paths].sum(-1)

    def group_best(self, item_value: np.ndarray) -> np.ndarray:
        """int64 ``[E]``: for each chain edge (SID) the item of its group with the highest ``item_value [M]``
        (the first in the group's order on ties); ``-1`` on internal edges."""
        order = np.lexsort((self.item_pos, -item_value, self.item_edge))
        first = order[np.r_[True, np.diff(self.item_edge[order]) != 0]]
        best = np.full(self.num_edges, -1, np.int64)
        best[self.item_edge[first]] = first
        return best


def _paths(trie_or_paths) -> TriePaths:
    return trie_or_paths if isinstance(trie_or_paths, TriePaths) else TriePaths(trie_or_paths)


@dataclass(frozen=True)
class EdgeBias:
    """A per-item bias split along the trie: ``b(i) = root + sum(edge[paths[i]]) + item[i]``.

    ``edge [E]`` float64 (the beam step's per-edge bias), ``item [M]`` float64 (``<= 0``: the residual
    within collision groups, added when beams are expanded into items), ``root`` (a constant: it changes
    no ranking)."""

    edge: np.ndarray
    item: np.ndarray
    root: float

    def tensor(self, device="cpu") -> torch.Tensor:
        """``edge`` as the float32 ``[E]`` tensor ``constrained_beam_search(..., edge_bias=)`` takes."""
        return torch.as_tensor(self.edge, dtype=torch.float32, device=device)

    def values(self, paths: TriePaths) -> np.ndarray:
        """``[M]`` float64: the per-item bias the split stands for."""
        return self.root + paths.sums(self.edge) + self.item


@dataclass(frozen=True)
class BiasTables:
    """A fitted mixture as served: ``edge [T, E]`` float32 per-edge bias tables, ``item [T, M]`` float64
    residuals within collision groups, ``weights [T]`` float64 (sum to 1): a request draws component ``t``
    with probability ``weights[t]`` and runs one beam search with ``edge_bias=edge[t]``."""

    edge: np.ndarray
    item: np.ndarray
    weights: np.ndarray


def subtree_mass(trie_or_paths, item_mass) -> tuple[np.ndarray, np.ndarray]:
    """``(node_mass [I], edge_mass [E])`` float64: the sum of ``item_mass [M]`` (float64, ``>= 0``) below each
    internal node and each edge, by the kernel ``plum_kernels.torch.trie_aggregate`` (float64 reference)."""
    paths = _paths(trie_or_paths)
    m = np.asarray(item_mass, np.float64)
    if m.shape != (paths.num_items,) or not np.isfinite(m).all() or (m < 0).any():
        raise ValueError(f"item_mass must be [{paths.num_items}] finite masses >= 0, got shape {m.shape}")
    out = K.trie_aggregate(torch.from_numpy(m), paths.arrays, paths.trie, impl="reference")
    return out.node_mass.numpy(), out.edge_mass.numpy()


def path_log_ratios(trie_or_paths, item_mass) -> tuple[np.ndarray, float]:
    """``(edge [E], root)``: ``edge[e] = log(m(child) / m(parent))`` over the subtree sums ``m`` of
    ``item_mass [M]`` and ``root = log m(root)``, so that ``root + sum(edge[path(sid)]) = log m(sid)``.
    Every SID's mass must be positive. The kernel's own ``edge_bias`` smooths per SID (``+ eps`` per SID
    below a node); the exploration bias smooths per item (``d(i) + sigma``), so the ratios are taken here
    from the raw subtree masses of the already smoothed item masses."""
    paths = _paths(trie_or_paths)
    node, edge = subtree_mass(paths, item_mass)
    if not (edge > 0).all():
        raise ValueError(f"item_mass: every SID needs a positive mass, edge {int(np.argmin(edge > 0))} has none")
    return np.log(edge) - np.log(node[paths.parent]), float(np.log(node[0]))


def exposure_edge_bias(trie_or_paths, d, lam: float, k: int, reg: Regulariser) -> EdgeBias:
    """The exploration bias of the aggregate exposure ``d [M]`` (float64, ``>= 0``) split along the trie
    (the module docstring: ratios of ``d + sigma`` and of the target, a SID standing for its group's best
    item). ``lam = 0`` gives zeros; ``lam > 0`` needs ``reg.smoothing > 0`` where ``d`` is 0."""
    paths = _paths(trie_or_paths)
    lam, k = check_lam(lam), check_k(k, paths.num_items)
    if not isinstance(reg, Regulariser):
        raise ValueError(f"reg must be a Regulariser, got {type(reg).__name__}")
    d = np.asarray(d, np.float64)
    if d.shape != (paths.num_items,) or not np.isfinite(d).all() or (d < 0).any():
        raise ValueError(f"d must be [{paths.num_items}] finite exposures >= 0, got shape {d.shape}")
    if lam == 0:
        return EdgeBias(np.zeros(paths.num_edges), np.zeros(paths.num_items), 0.0)
    if reg.smoothing == 0 and (d == 0).any():
        raise ValueError("d holds zeros and the regulariser's smoothing is 0: the bias is infinite there")
    b = exploration_bias(d, lam, k, reg)
    best = paths.group_best(b)
    keep = np.zeros(paths.num_items, bool)
    keep[best[best >= 0]] = True
    c = lam / k
    ratio, root = path_log_ratios(paths, np.where(keep, d + reg.smoothing, 0.0))
    edge, root = -c * ratio, -c * root
    if reg.log_target is not None:
        ratio, troot = path_log_ratios(paths, np.where(keep, np.exp(reg.log_target), 0.0))
        edge, root = edge + c * ratio, root + c * troot
    return EdgeBias(edge, b - b[best[paths.item_edge]], root)


def bias_split(trie_or_paths, bias, d, lam: float, k: int, reg: Regulariser) -> EdgeBias:
    """The split a search runs with for the oracle's call ``(bias [M], d [M])``: zeros when ``bias`` is
    constant (the plain search: a constant changes no item's rank, while a non-zero split of it would change
    which prefixes the beam keeps), else :func:`exposure_edge_bias` of ``d``, which must stand for ``bias``
    (the same ``lam``, ``k`` and regulariser as the fit, else ``ValueError``). The fit's oracles and the
    served tables (:func:`mixture_bias_tables`) both take it, so a fitted user is served the lists the fit
    ranked."""
    paths = _paths(trie_or_paths)
    b = np.asarray(bias, np.float64)
    if b.shape != (paths.num_items,) or not np.isfinite(b).all():
        raise ValueError(f"bias must be [M] = [{paths.num_items}] finite values, got shape {b.shape}")
    if b.max() == b.min():
        return EdgeBias(np.zeros(paths.num_edges), np.zeros(paths.num_items), float(b[0]))
    split = exposure_edge_bias(paths, d, lam, k, reg)
    if not np.allclose(split.values(paths), b, rtol=1e-9, atol=1e-9):
        raise ValueError("the split of d differs from bias: the oracle's lam, k and regulariser must be the fit's")
    return split


def mixture_bias_tables(trie_or_paths, mixture: Mixture) -> BiasTables:
    """The :class:`BiasTables` of a fitted ``mixture``: component ``t``'s tables are the :func:`bias_split`
    the oracle searched with when it produced it."""
    paths = _paths(trie_or_paths)
    if not isinstance(mixture, Mixture) or mixture.num_items != paths.num_items:
        raise ValueError(f"mixture must be a Mixture over the trie's {paths.num_items} items")
    splits = [bias_split(paths, b, d, mixture.lam, mixture.k, mixture.regulariser)
              for b, d in zip(mixture.bias, mixture.d)]
    return BiasTables(np.stack([s.edge for s in splits]).astype(np.float32), np.stack([s.item for s in splits]),
                      mixture.weights.copy())


def edge_log_softmax(trie_or_paths, edge_logits) -> np.ndarray:
    """The constrained next-code log-probabilities ``[N, E]`` float64 from per-edge logits ``[N, E]``: a
    log-softmax over each internal node's children (a chain's further levels have one child: 0)."""
    paths = _paths(trie_or_paths)
    x = np.asarray(edge_logits, np.float64)
    if x.ndim != 2 or x.shape[1] != paths.num_edges:
        raise ValueError(f"edge_logits must be [N, E = {paths.num_edges}], got shape {x.shape}")
    ptr = np.asarray(paths.trie.child_ptr, np.int64)[:-1]
    top = np.maximum.reduceat(x, ptr, axis=1)
    z = np.log(np.add.reduceat(np.exp(x - top[:, paths.parent]), ptr, axis=1)) + top
    return x - z[:, paths.parent]


def trie_oracle(trie_or_paths, edge_logprobs, k: int, lam: float, reg: Regulariser):
    """Frank-Wolfe's linear oracle through the trie: ``(bias [M], d [M]) -> (lists [N, K], s of the lists)``.

    Every item scores ``sum over its path of (edge_logprobs[u] + edge) + item`` with the split
    :func:`bias_split` of ``(bias, d)`` (what the biased beam search and :func:`expand_beams` compute,
    in float64 and over every item), lists are the top ``k``, ties to the lower item index.
    ``edge_logprobs [N, E]`` (:func:`edge_log_softmax`)."""
    paths = _paths(trie_or_paths)
    lp = np.asarray(edge_logprobs, np.float64)
    if lp.ndim != 2 or lp.shape[1] != paths.num_edges or np.isnan(lp).any():
        raise ValueError(f"edge_logprobs must be [N, E = {paths.num_edges}] without NaN, got shape {lp.shape}")
    k, lam = check_k(k, paths.num_items), check_lam(lam)
    s = paths.sums(lp)

    def oracle(bias: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        split = bias_split(paths, bias, d, lam, k, reg)
        total = paths.sums(lp + split.edge[None, :]) + split.item
        lists = np.argsort(-total, axis=1, kind="stable")[:, :k]
        return lists, np.take_along_axis(s, lists, axis=1)

    return oracle


def rank_beam_items(trie_or_paths, codes, scores, item_bias=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Beams to items under the collision rule, per user: ``(items [n] int64, their beams [n] int64)``.

    ``codes [B, W, L]`` and ``scores [B, W]`` are a (biased) beam search's output; every live beam
    (finite score) gives each item of its SID the score ``scores[b, w] + item_bias[item]`` (``item_bias
    [M]``: :attr:`EdgeBias.item`; None: zeros, the order of a plain search's items); a user's items are
    ranked by that score, then beam, then position in the group."""
    paths = _paths(trie_or_paths)
    c, sc = np.asarray(codes, np.int64), np.asarray(scores, np.float64)
    L = paths.trie.num_levels
    if c.ndim != 3 or c.shape[2] != L or sc.shape != c.shape[:2]:
        raise ValueError(f"codes must be [B, W, L = {L}] and scores [B, W], got {c.shape} and {sc.shape}")
    ib = np.zeros(paths.num_items) if item_bias is None else np.asarray(item_bias, np.float64)
    if ib.shape != (paths.num_items,):
        raise ValueError(f"item_bias must be [{paths.num_items}], got shape {ib.shape}")
    B, W = sc.shape
    live = np.isfinite(sc)
    states = paths.trie.walk(np.where(live[..., None], c, 0).reshape(-1, L)).reshape(B, W)
    live &= states >= paths.trie.num_internal
    e = np.where(live, states - paths.trie.num_internal, 0)
    counts = np.where(live, paths.sid_ptr[e + 1] - paths.sid_ptr[e], 0).reshape(-1)
    slot = np.repeat(np.arange(B * W), counts)
    pos = np.arange(len(slot)) - np.concatenate([[0], np.cumsum(counts)[:-1]])[slot]
    items = paths.sid_items[paths.sid_ptr[e.reshape(-1)[slot]] + pos]
    user, score = slot // W, sc.reshape(-1)[slot] + ib[items]
    order = np.lexsort((pos, slot, -score, user))
    items, slot = items[order], slot[order]
    bounds = np.searchsorted(user[order], np.arange(B + 1))
    return [(items[a:b], slot[a:b] % W) for a, b in zip(bounds[:-1], bounds[1:])]


def expand_beams(trie_or_paths, codes, scores, item_bias, k: int) -> np.ndarray:
    """``lists [B, k]`` int64 (``-1`` past a user's items): each user's first ``k`` items of
    :func:`rank_beam_items` (same arguments)."""
    paths = _paths(trie_or_paths)
    ranked = rank_beam_items(paths, codes, scores, item_bias)
    k = check_k(k, paths.num_items)
    out = np.full((len(ranked), k), -1, np.int64)
    for u, (items, _) in enumerate(ranked):
        out[u, :min(k, len(items))] = items[:k]
    return out
