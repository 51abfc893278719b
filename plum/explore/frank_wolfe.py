"""Frank-Wolfe over mixtures of top-K lists (Hazan, Kakade, Singh, Van Soest 2019, on the SID trie).

The iterate ``q`` (the users' expected exposures, :mod:`plumrec.explore.objective`) is a mixture of
vertices of ``Q_K^N``; a vertex is one top-K list per user, ``[N, K]``. Iteration ``t``:

1. the aggregate exposure ``d_t [M]`` of the mixture gives the exploration bias ``b_t [M]``
   (:func:`plumrec.explore.objective.exploration_bias`);
2. the linear oracle returns ``v_t``, every user's top-K items under ``s_u + b_t``
   (``oracle(b_t, d_t) -> lists [N, K]``: :func:`dense_oracle` over an explicit score matrix reads
   ``b_t``; :func:`plumrec.explore.trie.trie_oracle` or a biased beam search splits the bias of ``d_t``
   along the trie);
3. the duality gap ``g_t = <v_t - q_t, grad F(q_t)> >= F* - F(q_t)`` certifies the iterate;
4. ``q_{t+1} = (1 - gamma_t) q_t + gamma_t v_t`` with ``gamma_t = 2 / (t + 2)`` (``step="harmonic"``) or
   the exact line search on ``[0, 1]`` (``step="line"``: bisection on the concave objective's slope).

Nothing of size ``[N, M]`` is kept: the objective and the gap need only ``d_t``, the relevance
``(1/N) sum_u <q_u, s_u>`` (a scalar, mixed like ``q``) and the relevance of ``v_t``. The result is a
:class:`Mixture`: the distinct vertices, their weights ``alpha``, and the exposure and bias that produced
each (served as per-edge bias tables: :func:`plumrec.explore.trie.mixture_bias_tables`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from plumrec.explore.objective import Regulariser, check_k, check_lam, check_scores, exploration_bias

__all__ = ["Mixture", "frank_wolfe", "dense_oracle", "STEPS"]

STEPS = ("harmonic", "line")
Oracle = Callable[[np.ndarray, np.ndarray], "np.ndarray | tuple[np.ndarray, np.ndarray]"]


@dataclass
class Mixture:
    """A fitted mixture of top-K lists.

    ``lists [T, N, K]`` int64 (component ``t``: user ``u``'s list, best first under ``s_u + bias[t]``),
    ``weights [T]`` float64 (sum to 1), ``d [T, M]`` float64 (the aggregate exposure whose exploration bias
    first produced the component) and ``bias [T, M]`` float64 (that bias), ``gaps [S + 1]`` and
    ``objectives [S + 1]`` float64 (the duality gap and ``F`` of the iterate before each of the S steps,
    and of the returned one last), ``lam``, ``k``, ``regulariser``.
    """

    lists: np.ndarray
    weights: np.ndarray
    d: np.ndarray
    bias: np.ndarray
    gaps: np.ndarray
    objectives: np.ndarray
    lam: float
    k: int
    regulariser: Regulariser = field(default_factory=Regulariser.entropy)

    @property
    def num_users(self) -> int:
        return int(self.lists.shape[1])

    @property
    def num_items(self) -> int:
        return int(self.bias.shape[1])

    def exposure(self) -> np.ndarray:
        """``q [N, M]`` float64: each user's expected exposure (sums to K per user)."""
        T, N, K = self.lists.shape
        q = np.zeros((N, self.num_items))
        rows = np.broadcast_to(np.arange(N)[None, :, None], (T, N, K))
        np.add.at(q, (rows, self.lists), np.broadcast_to(self.weights[:, None, None], (T, N, K)))
        return q

    def aggregate(self) -> np.ndarray:
        """``d [M]``: the aggregate exposure (mean of ``q_u`` over users, divided by K; sums to 1)."""
        return _list_exposure(self.lists.reshape(len(self.weights), -1), self.num_items, self.weights)


def _list_exposure(flat_lists: np.ndarray, num_items: int, weights: np.ndarray | None = None) -> np.ndarray:
    """``[M]`` exposure of ``flat_lists [T, N * K]`` mixed with ``weights [T]``, normalised to sum 1."""
    w = np.ones(len(flat_lists)) if weights is None else weights
    d = np.bincount(flat_lists.ravel(), np.repeat(w, flat_lists.shape[1]), minlength=num_items)
    return d / (w.sum() * flat_lists.shape[1])


def dense_oracle(scores, k: int) -> Oracle:
    """The exact linear oracle over an explicit ``scores [N, M]``: ``(bias [M], d [M]) -> lists [N, K]``, each
    user's top-K of ``scores + bias``, best first, ties to the lower item index (``d`` is not read)."""
    s = check_scores(scores, k)

    def oracle(bias: np.ndarray, d: np.ndarray) -> np.ndarray:
        return np.argsort(-(s + bias[None, :]), axis=1, kind="stable")[:, :k]

    return oracle


def _line_search(delta_rel: float, d: np.ndarray, dv: np.ndarray, lam: float, reg: Regulariser) -> float:
    """The ``gamma`` in ``[0, 1]`` maximising ``F`` along ``q + gamma (v - q)``: bisection on the slope
    ``delta_rel + lam <dv - d, grad R(d + gamma (dv - d))>``, which falls with gamma (R is concave)."""
    delta = dv - d

    def slope(g: float) -> float:
        x = d + g * delta
        return delta_rel + (lam * float(np.dot(delta, reg.grad(x))) if lam else 0.0)

    if slope(1.0) >= 0:
        return 1.0
    if slope(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


def _call_oracle(oracle: Oracle, bias: np.ndarray, d: np.ndarray, scores: np.ndarray | None,
                 shape: tuple[int, int]):
    """``(lists [N, K], relevance of the lists)``: from the oracle's ``(lists, s of the lists [N, K])`` or
    from ``scores`` gathered at its plain ``lists``."""
    out = oracle(bias, d)
    lists, rel = (out if isinstance(out, tuple) else (out, None))
    lists = np.asarray(lists, dtype=np.int64)
    if lists.shape != shape:
        raise ValueError(f"the oracle returned lists of shape {lists.shape}, expected [N, K] = {shape}")
    if rel is None:
        if scores is None:
            raise ValueError("pass scores, or an oracle that returns (lists, scores of the lists)")
        rel = np.take_along_axis(scores, lists, axis=1)
    return lists, float(np.sum(rel) / shape[0])


def _check_args(num_users, num_items, k, lam, iters, step, regulariser):
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    if num_users is None or num_items is None:
        raise ValueError("pass scores [N, M], or num_users and num_items with an oracle")
    k = check_k(k, num_items)
    reg = Regulariser.entropy() if regulariser is None else regulariser
    if not isinstance(reg, Regulariser):
        raise ValueError(f"regulariser must be a Regulariser, got {type(reg).__name__}")
    lam = check_lam(lam)
    if lam > 0 and reg.smoothing == 0:
        raise ValueError("lam > 0 needs the regulariser's smoothing > 0 (the gradient is infinite where d = 0)")
    return k, lam, reg


def frank_wolfe(scores=None, *, k: int, lam: float, iters: int, oracle: Oracle | None = None,
                regulariser: Regulariser | None = None, step: str = "harmonic", tol: float = 0.0,
                num_users: int | None = None, num_items: int | None = None,
                callback: Callable[[int, float, float], None] | None = None) -> Mixture:
    """Maximise ``F`` (:mod:`plumrec.explore.objective`) by Frank-Wolfe; returns the :class:`Mixture`.

    ``scores [N, M]`` (float64 ``log p_LM(i | u)``; ``-inf``: never recommend) give the relevance of
    the oracle's lists and, without ``oracle``, the exact :func:`dense_oracle`. ``oracle(bias [M], d [M])``
    returns ``lists [N, K]`` or ``(lists, their scores [N, K])`` (then ``scores`` may be None and
    ``num_users``, ``num_items`` say the sizes). The first vertex is the oracle's answer at the uniform
    exposure (the plain top-K lists for the entropy). Stops after ``iters`` steps or once the gap is
    ``<= tol``; ``callback(t, gap, objective)`` sees every iterate. ``regulariser`` defaults to the entropy.
    The gaps are recorded as computed: an inexact oracle (a narrow beam) may give negative ones.
    """
    if scores is not None:
        scores = check_scores(scores, None)
        num_users, num_items = scores.shape
    k, lam, reg = _check_args(num_users, num_items, k, lam, iters, step, regulariser)
    if oracle is None:
        if scores is None:
            raise ValueError("pass scores, or an oracle")
        oracle = dense_oracle(scores, k)
    shape = (int(num_users), k)
    d = np.full(num_items, 1.0 / num_items)
    bias = exploration_bias(d, lam, k, reg)
    lists, rel = _call_oracle(oracle, bias, d, scores, shape)
    comps, weights, made, index = [lists], [1.0], [(d, bias)], {lists.tobytes(): 0}
    d = _list_exposure(lists.reshape(1, -1), num_items)
    gaps, objs = [], []
    for t in range(iters + 1):
        bias = exploration_bias(d, lam, k, reg)
        v, rel_v = _call_oracle(oracle, bias, d, scores, shape)
        dv = _list_exposure(v.reshape(1, -1), num_items)
        gaps.append(rel_v - rel + k * float(np.dot(dv - d, bias)))
        objs.append(rel + (lam * reg.value(d) if lam else 0.0))
        if callback is not None:
            callback(t, gaps[-1], objs[-1])
        if t == iters or gaps[-1] <= tol:
            break
        gamma = 2.0 / (t + 2.0) if step == "harmonic" else _line_search(rel_v - rel, d, dv, lam, reg)
        weights = [(1.0 - gamma) * w for w in weights]
        key = v.tobytes()
        if key not in index:
            index[key] = len(comps)
            comps.append(v), weights.append(0.0), made.append((d, bias))
        weights[index[key]] += gamma
        d = (1.0 - gamma) * d + gamma * dv
        rel = (1.0 - gamma) * rel + gamma * rel_v
    keep = [i for i, w in enumerate(weights) if w > 0]
    w = np.array([weights[i] for i in keep])
    return Mixture(np.stack([comps[i] for i in keep]), w / w.sum(), np.stack([made[i][0] for i in keep]),
                   np.stack([made[i][1] for i in keep]), np.array(gaps), np.array(objs), lam, k, reg)
