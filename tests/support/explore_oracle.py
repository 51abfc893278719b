"""Small exploration instances and independent oracles of the max-entropy objective.

An instance is a random SID trie (``plumrec.sid.build_trie``: shared prefixes of every depth, compressed
chains entered above the last level, collision groups) with explicit per-edge logits per user standing in
for the model; each item's score is summed along its path with ``SIDTrie.walk`` / ``children`` (not the
explore package's path arrays). The solver maximises ``F(q) = (1/N) sum_u <q_u, s_u> + lam R(d)`` by
spectral projected gradient over each user's capped simplex (exact projection), to a certified
Frank-Wolfe gap, with its own objective and gradient. :func:`beam_lists` runs the kernels' constrained
beam search driven by the explicit logits and expands the beams into items with ``SIDTrie.items``.
"""
from __future__ import annotations

import numpy as np
import torch

import plum_kernels.torch as K
from plumrec.sid import build_trie


def make_instance(seed: int, num_users: int = 6, sizes=(12, 6, 5, 4), num_sids: int = 120, collisions: int = 24,
                  temperature: float = 1.5):
    """``(trie, codes [M, L], edge_logits [N, E], scores [N, M])``; items are the rows of ``codes``."""
    rng = np.random.default_rng(seed)
    L = len(sizes)   # at least 2 levels, sizes[1:] >= 3
    base = np.stack([rng.integers(0, v, num_sids) for v in sizes], 1)
    share = num_sids // 4
    base[:share, :2] = base[0, :2]                       # a dense subtree two levels deep
    base[share:2 * share, :1] = base[1, :1]
    codes = np.unique(base, axis=0)
    # first code V0 - 1: three SIDs apart from the second level on (chains entered at level 1); V0 - 2: one
    # SID (a chain entered at level 0)
    sparse = rng.integers(0, min(sizes[1:]), (4, L))
    sparse[:, 0], sparse[:3, 1] = [sizes[0] - 1] * 3 + [sizes[0] - 2], np.arange(3)
    codes = np.unique(np.concatenate([codes[codes[:, 0] < sizes[0] - 2], sparse]), axis=0)
    dup = rng.choice(len(codes), collisions, replace=False)
    codes = np.concatenate([codes, codes[dup], codes[dup[: collisions // 3]]])   # groups of 2 and 3 items
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


def edge_paths(trie, codes: np.ndarray) -> list[list[int]]:
    """Each item's physical edges from the root, found by walking its prefixes (a chain's levels below its
    entry edge take none)."""
    out = [[] for _ in range(len(codes))]
    for l in range(codes.shape[1]):
        states = trie.walk(codes[:, :l])
        for i, st in enumerate(states):
            if st < trie.num_internal:
                lo = int(trie.child_ptr[st])
                out[i].append(lo + int(np.searchsorted(trie.children(int(st)), codes[i, l])))
    return out


# ----------------------------------------------------------------------------- the objective and its solver


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
    """Euclidean projection of each row of ``y [N, M]`` onto ``{0 <= x <= 1, sum x = k}``: ``x = clip(y - tau,
    0, 1)`` with ``tau`` found exactly among the breakpoints of the piecewise-linear ``sum_i clip(y_i - tau, 0,
    1)``."""
    bp = np.sort(np.concatenate([y, y - 1.0], 1), 1)                        # [N, 2M], rising
    f = np.clip(y[:, None, :] - bp[:, :, None], 0.0, 1.0).sum(2)           # falls with tau
    j = np.clip((f >= k).sum(1) - 1, 0, bp.shape[1] - 2)                   # f(bp[j]) >= k > f(bp[j + 1])
    r = np.arange(len(y))
    f0, f1, b0, b1 = f[r, j], f[r, j + 1], bp[r, j], bp[r, j + 1]
    tau = np.where(f0 > f1, b0 + (f0 - k) / np.where(f0 > f1, f0 - f1, 1.0) * (b1 - b0), b0)
    return np.clip(y - tau[:, None], 0.0, 1.0)


def solve(scores, lam, k, sigma, log_target=None, tol=1e-9, max_iters=20000):
    """``(q*, F(q*), gap)``: spectral projected gradient ascent (Barzilai-Borwein steps, non-monotone Armijo
    search, Birgin-Martinez-Raydan) over every user's capped simplex, from the uniform exposure, then Newton
    steps on the face of its fractional entries (``polish``), until the Frank-Wolfe gap (an upper bound on
    ``F* - F(q)``) is below ``tol``. Projected gradient alone stalls near a gap of 1e-8: F depends on q only
    through the linear term and the aggregate, so it is flat along exchanges between users and badly scaled
    across the small exposures of a collision group's items."""
    N, M = scores.shape

    def f(q):
        return value(scores, q, lam, k, sigma, log_target)

    x = np.full((N, M), k / M)
    fx, g, alpha, recent = f(x), gradient(scores, x, lam, k, sigma, log_target), 1.0, []
    for it in range(max_iters):
        if it % 10 == 0 and gap(scores, x, lam, k, sigma, log_target) < tol:
            break
        p = project(x + alpha * g, k) - x
        slope = float(np.sum(g * p))
        if slope <= 0:
            break
        recent = (recent + [fx])[-10:]
        t = 1.0
        while f(x + t * p) < max(recent) + 1e-4 * t * slope and t > 1e-12:
            t *= 0.5
        x_new = np.clip(x + t * p, 0.0, 1.0)
        g_new = gradient(scores, x_new, lam, k, sigma, log_target)
        s_, y_ = x_new - x, g_new - g
        curv = -float(np.sum(s_ * y_))
        alpha = float(np.clip(np.sum(s_ * s_) / curv, 1e-10, 1e10)) if curv > 0 else 1e10
        x, g, fx = x_new, g_new, f(x_new)
    x = polish(scores, x, lam, k, sigma, log_target)
    return x, f(x), gap(scores, x, lam, k, sigma, log_target)


def polish(scores, q, lam, k, sigma, log_target=None, steps=8, eps=1e-9):
    """Newton steps for ``F`` restricted to the face where ``q``'s fractional entries (in ``(eps, 1 - eps)``)
    move and the rest stay at 0 or 1, each user's sum fixed: the KKT system solved by least squares (the
    face's Hessian is singular along exchanges between users), the step shortened to stay in the box and kept
    only while it lowers the Frank-Wolfe gap."""
    N = scores.shape[0]
    for _ in range(steps):
        uu, ii = np.nonzero((q > eps) & (q < 1 - eps))
        n, d = len(uu), q.sum(0) / (N * k)
        g = gradient(scores, q, lam, k, sigma, log_target)[uu, ii]
        # d2F / dq_ui dq_vj = -lam / (N k)^2 / (d_i + sigma) when i == j, else 0
        H = np.where(ii[:, None] == ii[None, :], -lam / (N * k) ** 2 / (d[ii] + sigma)[:, None], 0.0)
        C = (uu[None, :] == np.arange(N)[:, None]).astype(float)                 # [N, n]: per-user sums
        kkt = np.block([[H, C.T], [C, np.zeros((N, N))]])
        dx = np.linalg.lstsq(kkt, np.concatenate([-g, np.zeros(N)]), rcond=None)[0][:n]
        x0 = q[uu, ii]
        with np.errstate(divide="ignore", invalid="ignore"):
            room = np.where(dx < 0, -x0 / dx, np.where(dx > 0, (1 - x0) / dx, np.inf))
        t = 1.0 if room.min() >= 1 else 0.999 * room.min()
        y = q.copy()
        y[uu, ii] = np.clip(x0 + t * dx, 0.0, 1.0)
        if gap(scores, y, lam, k, sigma, log_target) >= gap(scores, q, lam, k, sigma, log_target):
            break
        q = y
    return q


# ----------------------------------------------------------------------------- beam search over explicit logits


def step_fn(trie, edge_logits: np.ndarray):
    """A ``constrained_beam_search`` step function: for each beam, the logits of its node's children at their
    codes (``edge_logits [B, E]``), 0 elsewhere; meant for ``normalize="children"``."""
    child_ptr, child_token = np.asarray(trie.child_ptr), np.asarray(trie.child_token, np.int64)

    def step(level, tokens, parent):
        B, W = tokens.shape[:2]
        out = np.zeros((B, W, trie.codebook_sizes[level]), np.float32)
        pre = np.maximum(tokens.numpy(), 0).reshape(B * W, level)   # dead beams: any prefix, never read
        states = trie.walk(pre)
        for r in np.flatnonzero((states >= 0) & (states < trie.num_internal)):
            lo, hi = child_ptr[states[r]], child_ptr[states[r] + 1]
            out[r // W, r % W, child_token[lo:hi]] = edge_logits[r // W, lo:hi]
        return torch.from_numpy(out)

    return step


def beam_lists(trie, edge_logits: np.ndarray, k: int, width: int, edge_bias: np.ndarray | None = None,
               item_bias: np.ndarray | None = None, impl: str = "reference") -> np.ndarray:
    """``[B, k]``: beam search with ``edge_bias [E]`` (float32 on the kernel), each live beam's SID expanded
    into its items (``SIDTrie.items``), an item scoring its beam's score plus ``item_bias [M]``, ranked by
    score, then beam, then group order."""
    bias = None if edge_bias is None else torch.as_tensor(edge_bias, dtype=torch.float32)
    codes, scores = K.constrained_beam_search(step_fn(trie, edge_logits), trie.to_torch("cpu"),
                                              batch_size=len(edge_logits), beam_width=width,
                                              normalize="children", edge_bias=bias, impl=impl)
    codes, scores = codes.numpy(), scores.numpy().astype(np.float64)
    out = []
    for u in range(len(codes)):
        cand = []
        for w in np.flatnonzero(np.isfinite(scores[u])):
            for p, item in enumerate(trie.items(codes[u, w][None])[0].tolist()):
                cand.append((-(scores[u, w] + (0.0 if item_bias is None else item_bias[item])), w, p, item))
        out.append([c[3] for c in sorted(cand)[:k]])
    return np.array(out, np.int64)
