"""The maximum-entropy exploration objective over a catalogue of M items, for a batch of N users.

Each user ``u`` gets an expected exposure ``q_u [M]`` in the capped simplex
``Q_K = {q : sum_i q(i) = K, 0 <= q(i) <= 1}`` (a top-K list is a vertex, a mixture of lists a point
inside). With ``s_u(i) = log p_LM(i | u)`` (the sum of the constrained next-code log-probabilities along
item ``i``'s path in the SID trie) and the aggregate exposure ``d = (1 / (N K)) sum_u q_u`` (a
distribution over items: ``sum_i d(i) = 1``, ``0 <= d(i) <= 1/K``):

    F(q) = (1/N) sum_u <q_u, s_u> + lam * R(d)

R is concave: :class:`Regulariser` is ``R(d) = -sum_i (d(i) + sigma) (log(d(i) + sigma) - log t(i))``;
with ``t = 1`` it is the entropy ``H(d)`` (``sigma = 0``) smoothed by ``sigma >= 0``; with a target
exposure ``t`` (a distribution, :func:`target_exposure`) it is ``-KL(d || t)`` smoothed the same way.
``sigma > 0`` bounds the gradient where ``d(i) = 0`` (plain entropy's is infinite there), which keeps the
Frank-Wolfe gap finite and its O(1/t) rate; ``R''(d(i)) = -1 / (d(i) + sigma)``.

Gradient (derivation). ``dd(i) / dq_u(i) = 1 / (N K)`` and ``dR/dd(i) = -(log(d(i) + sigma) - log t(i)) - 1``, so

    dF / dq_u(i) = (1/N) s_u(i) + lam / (N K) * dR/dd(i)
                 = (1/N) [ s_u(i) + b(i) - lam / K ],   b(i) = (lam / K) (log t(i) - log(d(i) + sigma)).

The factor ``1/N`` and the constant ``-lam/K`` change neither the linear oracle over ``Q_K`` (every vertex
holds exactly K items, so a constant adds ``K c`` to every vertex's value) nor the duality gap
(``sum_i (v_u(i) - q_u(i)) = 0``): the oracle ranks each user's items by ``s_u(i) + b(i)``, the model's
log-probability plus one **user-independent exploration bias** :func:`exploration_bias` (log-additive
along the trie path, see :mod:`plumrec.explore.trie`). The Frank-Wolfe gap of ``q`` against the vertex
``v`` (the per-user top-K under that reward) is

    g(q) = <v - q, grad F(q)> = (1/N) sum_u sum_i (v_u(i) - q_u(i)) (s_u(i) + b(i)) >= F* - F(q).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Regulariser", "target_exposure", "exploration_bias", "objective", "relevance", "check_scores",
           "check_lam", "check_k"]


def check_lam(lam) -> float:
    """``lam`` as a float; ``ValueError`` unless it is finite and ``>= 0``."""
    try:
        value = float(lam)
    except (TypeError, ValueError) as e:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}") from e
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    return value


def check_k(k, num_items: int) -> int:
    """``k`` as an int; ``ValueError`` unless ``1 <= k <= num_items``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= num_items:
        raise ValueError(f"k must be an int in [1, {num_items}] (the catalogue's items), got {k!r}")
    return int(k)


def check_scores(scores, k: int | None = None) -> np.ndarray:
    """``scores [N, M]`` as float64; ``ValueError`` on another shape, a NaN or ``+inf``, or (with ``k``) a
    user with fewer than ``k`` finite scores (``-inf`` marks an item the user must not get)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1:
        raise ValueError(f"scores must be 2-D [N users, M items] and non-empty, got shape {s.shape}")
    bad = np.isnan(s) | np.isposinf(s)
    if bad.any():
        raise ValueError(f"scores hold NaN or +inf in rows {np.flatnonzero(bad.any(1))[:10].tolist()}")
    if k is not None:
        short = np.flatnonzero(np.isfinite(s).sum(1) < k)
        if short.size:
            raise ValueError(f"scores: users {short[:10].tolist()} have fewer than k = {k} finite scores")
    return s


@dataclass(frozen=True, eq=False)
class Regulariser:
    """``R(d) = -sum_i (d(i) + smoothing) * (log(d(i) + smoothing) - log_target(i))`` over ``d [M]``.

    ``log_target=None`` is the (smoothed) entropy; a ``log_target [M]`` (log of a distribution) makes it
    the (smoothed) ``-KL(d || target)``. Build with :meth:`entropy` / :meth:`kl`.
    """

    smoothing: float = 1e-6
    log_target: np.ndarray | None = None

    def __post_init__(self):
        if not (math.isfinite(self.smoothing) and self.smoothing >= 0):
            raise ValueError(f"smoothing must be a finite number >= 0, got {self.smoothing!r}")

    @classmethod
    def entropy(cls, smoothing: float = 1e-6) -> "Regulariser":
        """The smoothed entropy ``-sum_i (d(i) + smoothing) log(d(i) + smoothing)``."""
        return cls(float(smoothing), None)

    @classmethod
    def kl(cls, target, smoothing: float = 1e-6) -> "Regulariser":
        """The smoothed ``-KL(d || target)``; ``target [M]`` positive, normalised here."""
        t = np.asarray(target, dtype=np.float64)
        if t.ndim != 1 or not len(t) or not np.isfinite(t).all() or (t <= 0).any():
            raise ValueError("target must be a 1-D array [M] of positive finite exposures")
        return cls(float(smoothing), np.log(t / t.sum()))

    def _log_target(self, m: int) -> np.ndarray | float:
        if self.log_target is None:
            return 0.0
        if len(self.log_target) != m:
            raise ValueError(f"the regulariser's target has {len(self.log_target)} items, the exposure {m}")
        return self.log_target

    def value(self, d: np.ndarray) -> float:
        """``R(d)`` for ``d [M]``."""
        x = d + self.smoothing
        logx = np.log(np.where(x > 0, x, 1.0))
        return float(-np.sum(np.where(x > 0, x * (logx - self._log_target(len(d))), 0.0)))

    def log_ratio(self, d: np.ndarray) -> np.ndarray:
        """``[M]``: ``log(d(i) + smoothing) - log_target(i)`` (``dR/dd(i) = -log_ratio(i) - 1``)."""
        with np.errstate(divide="ignore"):
            return np.log(d + self.smoothing) - self._log_target(len(d))

    def grad(self, d: np.ndarray) -> np.ndarray:
        """``dR/dd [M]`` (``+inf`` where ``d(i) + smoothing = 0``)."""
        return -self.log_ratio(d) - 1.0


def target_exposure(kind: str, num_items: int, popularity=None, alpha: float = 1.0) -> np.ndarray:
    """A target exposure ``[num_items]`` (sums to 1): ``"uniform"``, or ``"popularity"``: ``popularity ** alpha``
    normalised (``popularity [num_items]`` positive; ``alpha < 0`` favours the tail)."""
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    if kind == "uniform":
        return np.full(num_items, 1.0 / num_items)
    if kind != "popularity":
        raise ValueError(f"kind must be 'uniform' or 'popularity', got {kind!r}")
    if popularity is None:
        raise ValueError("popularity is required for kind='popularity'")
    p = np.asarray(popularity, dtype=np.float64)
    if p.shape != (num_items,) or not np.isfinite(p).all() or (p <= 0).any():
        raise ValueError(f"popularity must be [{num_items}] positive finite counts (add 1 to zero counts), "
                         f"got shape {p.shape}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    t = p ** float(alpha)
    return t / t.sum()


def exploration_bias(d: np.ndarray, lam: float, k: int, reg: Regulariser) -> np.ndarray:
    """``b [M] = (lam / k) (log t(i) - log(d(i) + smoothing))``: the per-item reward the linear oracle adds
    to every user's ``s_u`` (zero when ``lam == 0``)."""
    if lam == 0:
        return np.zeros(len(d))
    return -(lam / k) * reg.log_ratio(d)


def relevance(scores: np.ndarray, q: np.ndarray) -> float:
    """``(1/N) sum_u <q_u, s_u>`` for ``scores, q [N, M]`` (``0 * -inf = 0``)."""
    on = q > 0
    return float(np.sum(q[on] * scores[on]) / scores.shape[0])


def objective(scores: np.ndarray, q: np.ndarray, lam: float, k: int, reg: Regulariser) -> float:
    """``F(q)`` for ``scores, q [N, M]`` (see the module docstring)."""
    d = q.sum(0) / (q.shape[0] * k)
    return relevance(scores, q) + (lam * reg.value(d) if lam else 0.0)
