"""Maximum-entropy exploration served by the generative retriever (the method: :mod:`plumrec.explore`).

- :class:`ModelOracle` is Frank-Wolfe's linear oracle backed by the LM. Called with the exploration bias
  ``b [M]`` of the current aggregate exposure ``d [M]``, it splits the bias along the SID trie
  (:func:`plumrec.explore.bias_split`: a per-edge bias ``[E]`` and a per-item residual ``[M]``
  inside collision groups), runs one constrained beam search with the per-edge bias (``plum_kernels``'
  beam step adds ``edge_bias[e]`` to every candidate through edge ``e``), ranks each user's beam items by
  biased beam score plus residual (history dropped if asked) and returns the first K with their
  *unbiased* model log-probabilities (the beam score minus the bias summed along the SID's path). A
  constant bias (``lam = 0``, and the uniform exposure Frank-Wolfe starts from) runs plain beam search.
  The prompts' forward (prefill and its KV cache) is computed once and reused by every call, up to
  ``cache_bytes``; a batch past that budget is prefilled again at each call.
- :func:`fit_exploration` runs :func:`plumrec.explore.frank_wolfe` with that oracle over a set of users
  (a tqdm bar shows the duality gap and the objective per iteration) and returns an
  :class:`ExplorationPolicy`: the per-edge bias tables ``[T, E]`` float32 of the mixture's T components,
  their residuals ``[T, M]`` and weights ``[T]`` (:func:`plumrec.explore.mixture_bias_tables`: the very
  splits the oracle searched with, zeros for a constant bias).
- Serving (``GenerativeRetriever(..., explore=policy)``): user ``u`` (its index in the request) gets
  component ``t`` drawn with the weights by ``numpy.random.default_rng([seed, u])`` (the draw of
  :func:`plumrec.explore.sample_list`) and the items of one beam search biased by table ``t``, ranked as
  the oracle ranks them, so a fitted user is served its list of the drawn component. A batch is one
  search: the beam step reads the ``[T, E]`` tables with each user's component as its row; the bias
  costs one gather-add per candidate and level.
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from plumrec.explore import (
    EdgeBias,
    Mixture,
    Regulariser,
    TriePaths,
    bias_split,
    frank_wolfe,
    mixture_bias_tables,
    rank_beam_items,
)
from plumrec.io import read_tagged, read_tensors, write_tagged
from plumrec.retrieval.generative import GenerativeRetriever, nonfinite_users
from plumrec.sequences import check_histories
from plumrec.sid.trie import SIDTrie

__all__ = ["ModelOracle", "ExplorationPolicy", "fit_exploration", "trie_signature",
           "edge_path_sums", "DEFAULT_CACHE_BYTES"]

DEFAULT_CACHE_BYTES = 2 << 30   # prefills kept across Frank-Wolfe iterations (bytes of logits + KV cache)
POLICY_FORMAT, POLICY_VERSION = "plum-exploration-policy", 1
_TRIE_ARRAYS = ("child_ptr", "child_token", "edge_word", "edge_item", "dup_ptr", "dup_items", "level_ptr",
                "edge_level_ptr")


def trie_signature(trie: SIDTrie) -> dict:
    """The trie's sizes and the SHA-256 of its arrays: what a policy records to refuse another trie."""
    h = hashlib.sha256(repr(tuple(trie.codebook_sizes)).encode())
    for name in _TRIE_ARRAYS:
        a = np.ascontiguousarray(getattr(trie, name))
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return {"sha256": h.hexdigest(), "num_items": int(trie.num_items), "num_sids": int(trie.num_sids),
            "num_edges": int(trie.num_edges), "codebook_sizes": [int(v) for v in trie.codebook_sizes]}


def edge_path_sums(trie: SIDTrie, edge_values: np.ndarray) -> np.ndarray:
    """``[E]`` float64: for every edge, the sum of ``edge_values [E]`` over the edges from the root down to it
    (for a chain edge: the whole SID's path, as the biased beam step accumulates it)."""
    v = np.asarray(edge_values, np.float64)
    if v.shape != (trie.num_edges,):
        raise ValueError(f"edge_values must have shape [E] = [{trie.num_edges}], got {v.shape}")
    ptr, word = np.asarray(trie.child_ptr, np.int64), np.asarray(trie.edge_word, np.int64)
    parent = np.repeat(np.arange(trie.num_internal), np.diff(ptr))
    incoming = np.full(trie.num_internal, -1, np.int64)
    incoming[~word[word < 0]] = np.flatnonzero(word < 0)
    elp = np.asarray(trie.edge_level_ptr, np.int64)
    out = v.copy()
    for level in range(1, trie.num_levels):  # edges are numbered by depth: a parent's edge is already summed
        lo, hi = elp[level], elp[level + 1]
        out[lo:hi] += out[incoming[parent[lo:hi]]]
    return out


def _sid_edges(trie: SIDTrie, codes: np.ndarray, live: np.ndarray) -> np.ndarray:
    """``[B, W]`` int64: the chain edge of each beam's SID ``codes [B, W, L]`` (-1 where not ``live`` or absent)."""
    flat = np.where(live[..., None], codes, 0).reshape(-1, codes.shape[-1]).astype(np.int64)
    states = trie.walk(flat)
    edge = np.where(states >= trie.num_internal, states - trie.num_internal, -1)
    return np.where(live.reshape(-1), edge, -1).reshape(live.shape)


def _unbias(trie: SIDTrie, codes: np.ndarray, scores: np.ndarray, path_bias: np.ndarray) -> np.ndarray:
    """``scores [B, W]`` (float64) less the bias summed along each beam's path (``path_bias [E]``:
    :func:`edge_path_sums`); empty slots stay ``-inf``, NaN stays NaN."""
    s = np.asarray(scores, np.float64)
    edge = _sid_edges(trie, codes, s != -np.inf)
    return np.where(edge >= 0, s - path_bias[np.maximum(edge, 0)], s)


def _check_k(k, retriever: GenerativeRetriever) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= retriever.beam_width:
        raise ValueError(f"k must be an int in [1, beam_width = {retriever.beam_width}], got {k!r}")
    return int(k)


def _tensor_bytes(first: torch.Tensor, cache) -> int:
    tensors = [first, cache.prefix_lens, *cache.k_prefix, *cache.v_prefix, *cache.k_suffix, *cache.v_suffix]
    return int(sum(t.numel() * t.element_size() for t in tensors))


class ModelOracle:
    """Frank-Wolfe's linear oracle through the LM: ``oracle(bias [M], d [M]) -> (lists [N, K] int64, scores
    [N, K] float64)``: every user's first ``k`` beam items under the split of ``bias``, with the unbiased
    model log-probability of each item's SID.

    ``histories``: the users (item-index arrays, non-empty); ``lam``, ``regulariser``: the fit's (the
    split of ``d`` must stand for ``bias``); ``exclude_history``: drop each user's history items before
    the cut to ``k`` (a user left with fewer than ``k`` items raises: raise ``beam_width``);
    ``cache_bytes``: keep the prompts' prefill across calls while the kept ones fit (0: never).
    ``calls`` / ``seconds`` count the searches and their time; ``cached`` the batches kept.
    """

    def __init__(self, retriever: GenerativeRetriever, histories: Sequence[np.ndarray], k: int, *, lam: float,
                 regulariser: Regulariser | None = None, exclude_history: bool = False,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        if not isinstance(retriever, GenerativeRetriever):
            raise ValueError(f"retriever must be a GenerativeRetriever, got {type(retriever).__name__}")
        histories = [np.asarray(h) for h in histories]
        if not histories:
            raise ValueError("histories must hold at least one user")
        check_histories(histories, retriever.num_items, "histories")
        if any(len(h) == 0 for h in histories):
            raise ValueError("every history needs at least one item")
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, (int, np.integer)) or cache_bytes < 0:
            raise ValueError(f"cache_bytes must be an int >= 0, got {cache_bytes!r}")
        self.retriever, self.histories, self.k = retriever, histories, _check_k(k, retriever)
        self.lam, self.reg = lam, Regulariser.entropy() if regulariser is None else regulariser
        self.exclude_history, self.cache_bytes = bool(exclude_history), int(cache_bytes)
        self.trie = retriever.trie
        self.paths = TriePaths(self.trie)
        self._prefills: dict[int, tuple] = {}
        self._kept_bytes = 0
        self.calls, self.seconds = 0, 0.0

    @property
    def cached(self) -> int:
        return len(self._prefills)

    def split(self, bias, d) -> EdgeBias | None:
        """:func:`plumrec.explore.bias_split` of ``(bias [M], d [M])``; None for a zero split (a constant
        ``bias``): the plain search."""
        split = bias_split(self.paths, bias, d, self.lam, self.k, self.reg)
        return split if split.edge.any() or split.item.any() else None

    def _prefill(self, i: int, batch: list) -> tuple:
        if i in self._prefills:
            return self._prefills[i]
        first, cache = self.retriever._prefill(batch)
        size = _tensor_bytes(first, cache)
        if self._kept_bytes + size <= self.cache_bytes:
            self._prefills[i] = (first, cache)
            self._kept_bytes += size
        return first, cache

    def search(self, edge_bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Every user's beams with ``edge_bias [E]`` (None: plain): ``(codes [N, W, L], scores [N, W] float64)``,
        the scores with the bias, beams best first under it."""
        r, t0 = self.retriever, time.perf_counter()
        eb = None if edge_bias is None else torch.as_tensor(edge_bias, dtype=torch.float32, device=r._device())
        was_training = r.model.training
        r.model.eval()
        codes, scores = [], []
        try:
            for i, s in enumerate(range(0, len(self.histories), r.batch_size)):
                c, sc = r._decode(*self._prefill(i, self.histories[s:s + r.batch_size]), edge_bias=eb)
                sc = sc.cpu().numpy().astype(np.float64)
                bad = nonfinite_users(sc)
                if len(bad):
                    raise ValueError(f"the model's scores are not finite (NaN or inf) for histories "
                                     f"{(bad + s)[:10].tolist()}: the oracle needs finite scores")
                codes.append(c.cpu().numpy())
                scores.append(sc)
        finally:
            r.model.train(was_training)
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return np.concatenate(codes), np.concatenate(scores)

    def lists(self, codes: np.ndarray, scores: np.ndarray, split: EdgeBias | None) -> tuple[np.ndarray, np.ndarray]:
        """``(lists [N, K], unbiased scores [N, K])`` from the beams of :meth:`search` under ``split``."""
        k, out, out_s = self.k, [], []
        if split is None:
            unbiased, ranked = scores, rank_beam_items(self.paths, codes, scores)
        else:
            eb = split.edge.astype(np.float32)  # the values the beam step added
            unbiased = _unbias(self.trie, codes, scores, edge_path_sums(self.trie, eb))
            ranked = rank_beam_items(self.paths, codes, scores, split.item)
        for u, ((items, beams), h) in enumerate(zip(ranked, self.histories)):
            if self.exclude_history:
                keep = ~np.isin(items, h)
                items, beams = items[keep], beams[keep]
            if len(items) < k:
                raise ValueError(f"history {u}: its {self.retriever.beam_width} beams hold {len(items)} items "
                                 f"{'outside its history ' if self.exclude_history else ''}, fewer than k = {k}: "
                                 "raise beam_width")
            out.append(items[:k])
            out_s.append(unbiased[u, beams[:k]])
        return np.stack(out), np.stack(out_s)

    def __call__(self, bias, d) -> tuple[np.ndarray, np.ndarray]:
        split = self.split(bias, d)
        codes, scores = self.search(None if split is None else split.edge)
        return self.lists(codes, scores, split)


def _regulariser_info(reg: Regulariser) -> dict:
    return {"kind": "entropy" if reg.log_target is None else "kl", "smoothing": float(reg.smoothing)}


def _is_count(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, np.integer)) and x >= 0


@dataclass
class ExplorationPolicy:
    """A fitted exploration mixture, as the beam search serves it.

    ``edge_bias [T, E]`` float32 (component ``t``'s per-edge bias; with an all-zero ``item_bias`` row an
    all-zero row is plain beam search), ``item_bias [T, M]`` float64 (residuals within collision groups,
    ``<= 0``), ``weights [T]`` float64 (positive, sum 1), ``lam`` and ``k`` of the fit, ``trie``
    (:func:`trie_signature` of the trie it was fitted on), ``gaps`` / ``objectives`` ``[S + 1]`` (the
    Frank-Wolfe duality gap and objective per iteration), ``regulariser`` (``{"kind", "smoothing"}``),
    ``exclude_history`` of the fit, ``users`` (how many it was fitted on) and, right after a fit, the
    :class:`~plumrec.explore.Mixture` (its lists; not saved).
    """

    edge_bias: np.ndarray
    item_bias: np.ndarray
    weights: np.ndarray
    lam: float
    k: int
    trie: dict
    gaps: np.ndarray
    objectives: np.ndarray
    regulariser: dict = field(default_factory=lambda: {"kind": "entropy", "smoothing": 1e-6})
    exclude_history: bool = False
    users: int = 0
    mixture: Mixture | None = field(default=None, repr=False, compare=False)
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.edge_bias = np.ascontiguousarray(self.edge_bias, np.float32)
        self.item_bias = np.ascontiguousarray(self.item_bias, np.float64)
        self.weights = np.asarray(self.weights, np.float64)
        self.gaps, self.objectives = np.asarray(self.gaps, np.float64), np.asarray(self.objectives, np.float64)
        E, M = (int(self.trie.get(n, -1)) for n in ("num_edges", "num_items")) if isinstance(self.trie, dict) \
            else (-1, -1)
        T = len(self.edge_bias)
        if self.edge_bias.ndim != 2 or self.edge_bias.shape[1] != E or not T:
            raise ValueError(f"edge_bias must be [T >= 1, E = {E}] (E: the trie's edges), got {self.edge_bias.shape}")
        if self.item_bias.shape != (T, M):
            raise ValueError(f"item_bias must be [T, M] = [{T}, {M}], got {self.item_bias.shape}")
        if not (np.isfinite(self.edge_bias).all() and np.isfinite(self.item_bias).all()):
            raise ValueError("edge_bias and item_bias must be finite")
        w = self.weights
        if w.shape != (T,) or not np.isfinite(w).all() or (w <= 0).any() or abs(w.sum() - 1) > 1e-6:
            raise ValueError(f"weights must be [T = {T}] positive numbers that sum to 1, got {w}")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if not _is_count(self.k) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")

    @property
    def num_components(self) -> int:
        return len(self.weights)

    def check_trie(self, trie: SIDTrie) -> None:
        """``ValueError`` unless ``trie`` is the trie the policy was fitted on (sizes, then array digest)."""
        sig = trie_signature(trie)
        for key in ("num_items", "num_sids", "num_edges", "codebook_sizes", "sha256"):
            if sig[key] != self.trie.get(key):
                raise ValueError(f"the exploration policy was fitted on another SID trie: its {key} is "
                                 f"{self.trie.get(key)!r}, this trie's {sig[key]!r}; fit it again on this trie")

    def components(self, users, seed: int = 0) -> np.ndarray:
        """``[N]`` int64: the component of each user index of ``users [N]``, drawn with ``weights`` by
        ``numpy.random.default_rng([seed, user])`` (the same pair always draws the same component)."""
        u = np.asarray(users)
        if u.ndim != 1 or (u.size and (u.dtype.kind not in "iu" or u.min() < 0)):
            raise ValueError("users must be a 1-D array of user indices >= 0")
        if not _is_count(seed):
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if self.num_components == 1:
            return np.zeros(len(u), np.int64)
        T, w = self.num_components, self.weights
        return np.array([np.random.default_rng([int(seed), int(x)]).choice(T, p=w) for x in u], np.int64)

    def _device_table(self, device) -> torch.Tensor:
        """``edge_bias [T, E]`` float32 on ``device`` (kept for later calls)."""
        key = ("table", str(device))
        if key not in self._tables:
            self._tables[key] = torch.from_numpy(self.edge_bias).to(device)
        return self._tables[key]

    def _path_sums(self, t: int, trie: SIDTrie) -> np.ndarray | None:
        """Component ``t``'s path sums ``[E]`` float64 (:func:`edge_path_sums`; None for a zero table)."""
        key = ("path", int(t))
        if key not in self._tables:
            row = self.edge_bias[t]
            self._tables[key] = edge_path_sums(trie, row) if row.any() else None
        return self._tables[key]

    def search(self, retriever: GenerativeRetriever, histories: Sequence[np.ndarray], users, seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
        """The beams of ``histories`` (user indices ``users``) under their drawn components, one search for
        all of them (``edge_bias [T, E]`` with each user's component as its row; plain when every drawn
        table is zero): ``(codes [B, W, L] int64, unbiased scores [B, W] float32, ranked items per user)``
        (codes in the biased order; items ranked by :func:`rank_beam_items` with the residuals)."""
        comps = self.components(users, seed)
        if len(comps) != len(histories):
            raise ValueError(f"users has {len(comps)} entries for {len(histories)} histories")
        dev = retriever._device()
        if self.edge_bias[comps].any():
            c, s = retriever._search(histories, self._device_table(dev), torch.from_numpy(comps).to(dev))
        else:
            c, s = retriever._search(histories)
        c, s = c.cpu().numpy(), s.cpu().numpy()
        ranked: list[np.ndarray] = [np.zeros(0, np.int64)] * len(comps)
        paths = self._paths(retriever.trie)
        for t in np.unique(comps):
            idx = np.flatnonzero(comps == t)
            for i, (items, _) in zip(idx, rank_beam_items(paths, c[idx], s[idx], self.item_bias[t])):
                ranked[i] = items
            path = self._path_sums(t, retriever.trie)
            if path is not None:
                s[idx] = _unbias(retriever.trie, c[idx], s[idx], path).astype(np.float32)
        return torch.from_numpy(c), torch.from_numpy(s), ranked

    def _paths(self, trie: SIDTrie) -> TriePaths:
        if self._tables.get("paths") is None or self._tables["paths"].trie is not trie:
            self._tables["paths"] = TriePaths(trie)
        return self._tables["paths"]

    def save(self, path) -> Path:
        """Write the policy to the folder ``path`` atomically: ``policy.json`` (everything but the arrays) and
        ``policy.safetensors`` (``edge_bias``, ``item_bias``, ``weights``, ``gaps``, ``objectives``), which
        records the JSON's SHA-256. Returns ``path``."""
        meta = {"format": POLICY_FORMAT, "version": POLICY_VERSION, "lam": float(self.lam), "k": int(self.k),
                "components": self.num_components, "iterations": int(len(self.gaps)), "trie": self.trie,
                "regulariser": self.regulariser, "exclude_history": bool(self.exclude_history),
                "users": int(self.users)}
        tensors = {"edge_bias": self.edge_bias, "item_bias": self.item_bias, "weights": self.weights,
                   "gaps": self.gaps, "objectives": self.objectives}
        return write_tagged(path, meta, {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in tensors.items()},
                            meta_name="policy.json", tensors_name="policy.safetensors")

    @classmethod
    def load(cls, path, trie: SIDTrie | None = None) -> "ExplorationPolicy":
        """The policy saved in the folder ``path`` (``ValueError`` naming the file for a damaged or foreign
        one); with ``trie``, also refuse a policy fitted on another trie (:meth:`check_trie`)."""
        folder, meta = read_tagged(path, meta_name="policy.json", tensors_name="policy.safetensors",
                                   fmt=POLICY_FORMAT, version=POLICY_VERSION, what="an exploration policy",
                                   noun="exploration policy",
                                   missing="the folder of an exploration policy holds it")
        try:
            T, S = int(meta["components"]), int(meta["iterations"])
            E, M = int(meta["trie"]["num_edges"]), int(meta["trie"]["num_items"])
            lam, k = float(meta["lam"]), int(meta["k"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{folder / 'policy.json'}: missing or malformed field ({e})") from None
        t = read_tensors(folder / "policy.safetensors", config=str(folder / "policy.json"),
                         expected={"edge_bias": (T, E), "item_bias": (T, M), "weights": (T,), "gaps": (S,),
                                   "objectives": (S,)})
        try:
            policy = cls(t["edge_bias"].numpy(), t["item_bias"].numpy(), t["weights"].numpy(), lam, k, meta["trie"],
                         t["gaps"].numpy(), t["objectives"].numpy(), meta.get("regulariser", {}),
                         bool(meta.get("exclude_history", False)), int(meta.get("users", 0)))
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from None
        if trie is not None:
            policy.check_trie(trie)
        return policy


def fit_exploration(retriever: GenerativeRetriever, histories: Sequence[np.ndarray], *, lam: float, k: int,
                    iters: int, regulariser: Regulariser | None = None, step: str = "harmonic", tol: float = 0.0,
                    exclude_history: bool = False, progress: bool = True,
                    cache_bytes: int = DEFAULT_CACHE_BYTES) -> ExplorationPolicy:
    """Fit the maximum-entropy mixture of top-``k`` lists for the users ``histories`` with the model-backed
    :class:`ModelOracle` (``iters`` Frank-Wolfe steps, :func:`plumrec.explore.frank_wolfe`; ``regulariser``
    defaults to the smoothed entropy). ``progress``: a tqdm bar with the duality gap and the objective, and
    one line per iteration, on stderr. Returns the :class:`ExplorationPolicy` (with its ``mixture``)."""
    reg = Regulariser.entropy() if regulariser is None else regulariser
    oracle = ModelOracle(retriever, histories, k, lam=lam, regulariser=reg, exclude_history=exclude_history,
                         cache_bytes=cache_bytes)
    if not _is_count(iters):
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    bar = tqdm(total=int(iters) + 1, desc=f"maxent Frank-Wolfe (lam {lam})", disable=not progress)

    def show(t: int, gap: float, obj: float) -> None:
        bar.set_postfix(gap=f"{gap:.3e}", F=f"{obj:.5f}")
        bar.update(1)
        if progress:
            bar.write(f"iteration {t}: duality gap {gap:.4e}, objective {obj:.6f}", file=sys.stderr)

    try:
        mix = frank_wolfe(None, k=oracle.k, lam=lam, iters=iters, oracle=oracle, regulariser=reg, step=step,
                          tol=tol, num_users=len(oracle.histories), num_items=retriever.num_items, callback=show)
    finally:
        bar.close()
    tables = mixture_bias_tables(oracle.paths, mix)     # the splits the oracle searched with
    return ExplorationPolicy(tables.edge, tables.item, tables.weights, float(mix.lam), int(mix.k),
                             trie_signature(retriever.trie),
                             mix.gaps, mix.objectives, _regulariser_info(reg), bool(exclude_history),
                             len(oracle.histories), mixture=mix)
