"""The Python entry of maximum-entropy exploration: fit a mixture over a set of users, serve lists from it.

:func:`fit_maxent` runs :func:`plumrec.explore.frank_wolfe.frank_wolfe` over either an explicit score matrix
(the exact oracle) or a SID trie with per-user constrained next-code log-probabilities per edge (the trie
oracle), with a progress bar that shows the duality gap; :func:`sample_list` serves one user a list of the
fitted mixture, seeded per (seed, user).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from plumrec.explore.frank_wolfe import Mixture, frank_wolfe
from plumrec.explore.objective import Regulariser
from plumrec.explore.trie import TriePaths, trie_oracle
from plumrec.sid.trie import SIDTrie

__all__ = ["fit_maxent", "sample_list"]


def _select(rows: np.ndarray, users: Sequence[int] | None, name: str) -> np.ndarray:
    if users is None:
        return rows
    u = np.asarray(users, np.int64)
    if u.ndim != 1 or not len(u) or (u < 0).any() or (u >= len(rows)).any():
        raise ValueError(f"users must be a non-empty 1-D list of row indices of {name} in [0, {len(rows)})")
    return rows[u]


def fit_maxent(scores=None, *, lam: float, k: int, iters: int, users: Sequence[int] | None = None,
               trie: SIDTrie | None = None, edge_logprobs=None, regulariser: Regulariser | None = None,
               step: str = "harmonic", tol: float = 0.0, progress: bool = True) -> Mixture:
    """Fit the maximum-entropy mixture of top-``k`` lists for a batch of users.

    Either ``scores [N, M]`` (``log p_LM(i | u)``, exact oracle) or ``trie`` with ``edge_logprobs [N, E]``
    (:func:`plumrec.explore.trie.edge_log_softmax` of the model's logits; trie oracle). ``users`` picks rows
    (default all); the mixture's user ``j`` is ``users[j]``. ``progress`` shows a tqdm bar with the
    duality gap and the objective per iteration. Returns the :class:`~plumrec.explore.frank_wolfe.Mixture`.
    """
    if (scores is None) == (trie is None):
        raise ValueError("pass either scores [N, M] or trie with edge_logprobs [N, E]")
    if trie is not None:
        if not isinstance(trie, SIDTrie):
            raise ValueError(f"trie must be a SIDTrie, got {type(trie).__name__}")
        if edge_logprobs is None:
            raise ValueError("edge_logprobs [N, E] is required with trie")
        lp = np.asarray(edge_logprobs, np.float64)
        if lp.ndim != 2 or lp.shape[1] != trie.num_edges:
            raise ValueError(f"edge_logprobs must be [N, E = {trie.num_edges}], got shape {lp.shape}")
        lp = _select(lp, users, "edge_logprobs")
        oracle = trie_oracle(TriePaths(trie), lp, k, lam, Regulariser.entropy() if regulariser is None else regulariser)
        sizes = {"num_users": len(lp), "num_items": trie.num_items}
    else:
        s = np.asarray(scores, np.float64)
        if s.ndim != 2:
            raise ValueError(f"scores must be 2-D [N users, M items], got shape {s.shape}")
        scores, oracle, sizes = _select(s, users, "scores"), None, {}
    counted = isinstance(iters, (int, np.integer)) and not isinstance(iters, bool)
    bar = tqdm(total=iters + 1 if counted else None, desc="maxent Frank-Wolfe", disable=not progress)

    def show(t: int, gap: float, obj: float) -> None:
        bar.set_postfix(gap=f"{gap:.3e}", F=f"{obj:.6f}")
        bar.update(1)

    try:
        return frank_wolfe(scores, k=k, lam=lam, iters=iters, oracle=oracle, regulariser=regulariser,
                           step=step, tol=tol, callback=show, **sizes)
    finally:
        bar.close()


def sample_list(mixture: Mixture, user: int, seed: int = 0) -> np.ndarray:
    """``[K]`` int64: the list of ``user`` (a row of the fit) in a component drawn with the mixture's weights,
    by a generator seeded with ``(seed, user)`` (the same call returns the same list)."""
    if isinstance(user, bool) or not isinstance(user, (int, np.integer)) or not 0 <= user < mixture.num_users:
        raise ValueError(f"user must be an int in [0, {mixture.num_users}), got {user!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    rng = np.random.default_rng([int(seed), int(user)])
    t = int(rng.choice(len(mixture.weights), p=mixture.weights))
    return mixture.lists[t, int(user)].copy()
