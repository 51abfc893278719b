"""Small exploration instances and an independent solver of the max-entropy objective.

An instance is a random SID trie (``plumrec.sid.build_trie``, collisions and chains included) with
explicit per-edge logits per user standing in for the model; each item's score is summed along its path
with ``SIDTrie.walk`` / ``children`` (not the explore package's path arrays). The solver maximises
``F(q) = (1/N) sum_u <q_u, s_u> + lam R(d)`` by accelerated projected gradient (FISTA with backtracking
and restarts) over each user's capped simplex, to a certified Frank-Wolfe gap, with its own objective.
"""
from __future__ import annotations

import numpy as np

from plumrec.sid import build_trie


def make_instance(seed: int, num_users: int = 8, sizes=(6, 5, 4), num_sids: int = 200, collisions: int = 20,
                  temperature: float = 1.5):
    """``(trie, codes [M, L], edge_logits [N, E], scores [N, M])``; items are the rows of ``codes``."""
    rng = np.random.default_rng(seed)
    codes = np.unique(np.stack([rng.integers(0, v, num_sids) for v in sizes], 1), axis=0)
    codes = np.concatenate([codes, codes[rng.choice(len(codes), collisions, replace=False)]])
    trie = build_trie(codes, sizes)
    logits = temperature * rng.standard_normal((num_users, trie.num_edges))
    return trie, codes, logits, leaf_scores(trie, codes, logits)


def leaf_scores(trie, codes: np.ndarray, edge_logits: np.ndarray) -> np.ndarray:
    """``[N, M]``: each item's sum over its levels of the log-softmax of the edge logits among the
    children of the node it passes (0 inside a compressed chain), found by walking prefixes."""
    N, (M, L) = edge_logits.shape[0], codes.shape
    out = np.zeros((N, M))
    for l in range(L):
        states = trie.walk(codes[:, :l])
        for i, st in enumerate(states):
            if st >= trie.num_internal:
                continue  # one child: probability 1
            lo = int(trie.child_ptr[st])
            kids = trie.children(int(st))
            e = lo + int(np.searchsorted(kids, codes[i, l]))
            x = edge_logits[:, lo:lo + len(kids)]
            top = x.max(1)
            out[:, i] += edge_logits[:, e] - top - np.log(np.exp(x - top[:, None]).sum(1))
    return out


def reg_value(d, sigma, log_target=None):
    x = d + sigma
    lt = 0.0 if log_target is None else log_target
    return -float(np.sum(x * (np.log(x) - lt)))


def value(scores, q, lam, k, sigma, log_target=None):
    """``F(q)`` for ``q [N, M]``."""
    N = scores.shape[0]
    return float(np.sum(q * scores) / N) + lam * reg_value(q.sum(0) / (N * k), sigma, log_target)


def gradient(scores, q, lam, k, sigma, log_target=None):
    N = scores.shape[0]
    d = q.sum(0) / (N * k)
    lt = 0.0 if log_target is None else log_target
    return scores / N + lam / (N * k) * (-(np.log(d + sigma) - lt) - 1.0)[None, :]


def gap(scores, q, lam, k, sigma, log_target=None):
    """The Frank-Wolfe gap ``max_v <v - q, grad F(q)>`` over per-user top-k vertices."""
    g = gradient(scores, q, lam, k, sigma, log_target)
    top = -np.sort(-g, axis=1)[:, :k].sum()
    return float(top - np.sum(g * q))


def project(y, k):
    """Euclidean projection of each row of ``y`` onto ``{0 <= x <= 1, sum x = k}``."""
    lo, hi = y.min(1) - 1.0, y.max(1)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        big = np.clip(y - mid[:, None], 0, 1).sum(1) > k
        lo, hi = np.where(big, mid, lo), np.where(big, hi, mid)
    tau = 0.5 * (lo + hi)
    x = np.clip(y - tau[:, None], 0, 1)
    free = (x > 0) & (x < 1)
    ones = (x >= 1).sum(1)
    nfree = free.sum(1)
    exact = np.where(nfree > 0, (np.where(free, y, 0).sum(1) - (k - ones)) / np.maximum(nfree, 1), tau)
    return np.clip(y - exact[:, None], 0, 1)


def solve(scores, lam, k, sigma, log_target=None, tol=1e-10, max_iters=200000):
    """``(q*, F(q*), gap)``: FISTA ascent with backtracking and function-value restarts, until the
    Frank-Wolfe gap (an upper bound on the suboptimality) is below ``tol``."""
    N, M = scores.shape
    x = np.full((N, M), k / M)
    f = value(scores, x, lam, k, sigma, log_target)
    y, x_prev, t_mom, eta = x.copy(), x.copy(), 1.0, 1.0
    for it in range(max_iters):
        gy = gradient(scores, y, lam, k, sigma, log_target)
        fy = value(scores, y, lam, k, sigma, log_target)
        while True:
            x_new = project(y + eta * gy, k)
            diff = x_new - y
            f_new = value(scores, x_new, lam, k, sigma, log_target)
            if f_new >= fy + np.sum(gy * diff) - np.sum(diff * diff) / (2 * eta) - 1e-15:
                break
            eta *= 0.5
        if f_new < f:  # restart the momentum
            y, t_mom = x.copy(), 1.0
            continue
        t_next = 0.5 * (1 + np.sqrt(1 + 4 * t_mom * t_mom))
        x_prev, x, f = x, x_new, f_new
        y = x + (t_mom - 1) / t_next * (x - x_prev)
        t_mom, eta = t_next, eta * 1.5
        if it % 20 == 0 and gap(scores, x, lam, k, sigma, log_target) < tol:
            break
    return x, f, gap(scores, x, lam, k, sigma, log_target)
