"""PyTorch reference of the MoE ops: the contract (docs/design.md, 'moe_route' .. 'moe_mlp').

Plain torch ops, float32 accumulation (float64 when given float64), no host
synchronisation and no data-dependent shapes, so that every function here also
traces under ``torch.compile(fullgraph=True)``. Readable before fast: the
grouped matmul multiplies every row by every expert and keeps its own (``E``
times the FLOPs), fine for tests, and what the kernels beat. The
``*_segments`` variants compute the same with one product per expert (host
read of the group sizes): what the ops run on CPU tensors.

Notation: ``T`` tokens, ``E`` experts, ``k`` experts per token, ``M = T * k``
token copies after the permutation, ``group_sizes [E]`` rows per expert in
expert order (the rows of expert ``e`` are ``offsets[e] : offsets[e + 1]`` with
``offsets = [0, cumsum(group_sizes)]``).

Routing semantics (shared by every implementation):

- scores ``s = softmax(logits)`` (``score="softmax"``) or ``sigmoid(logits)``
  (``score="sigmoid"``), computed in float32;
- the ``k`` experts with the largest ``s + bias`` are selected (``bias [E]`` is
  for selection only: auxiliary-loss-free balancing, DeepSeek-V3 style), in
  descending order of ``s + bias``;
- the weights are the selected ``s`` (never the bias), divided by their sum
  when ``renormalize`` (plus ``1e-20`` against a zero sum);
- load-balancing loss (Switch / GShard): ``E * sum_e f_e * P_e`` with
  ``f_e = count_e / (T * k)`` the fraction of copies routed to ``e`` (no
  gradient) and ``P_e`` the mean over tokens of the router probability
  ``p = softmax(logits)``, or ``p = s / sum(s)`` for sigmoid scores. It equals
  1 for a perfectly uniform router;
- router z-loss (ST-MoE): ``mean_t logsumexp(logits_t) ** 2``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

RENORM_EPS = 1e-20


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- routing


def route(logits: torch.Tensor, top_k: int, score: str = "softmax",
          bias: torch.Tensor | None = None, renormalize: bool = True):
    """``logits [T, E]`` -> ``(weights [T, k] f32, expert_ids [T, k] int32,
    load_balance_loss [] f32, z_loss [] f32)``; differentiable in ``logits``."""
    T, E = logits.shape
    l = logits.to(_acc_dtype(logits.dtype))
    if score == "softmax":
        s = torch.softmax(l, dim=-1)
        p = s
    else:
        s = torch.sigmoid(l)
        p = s / s.sum(dim=-1, keepdim=True)
    sel = s if bias is None else s + bias.to(s.dtype)
    ids = torch.topk(sel.detach(), top_k, dim=-1, sorted=True).indices
    w = s.gather(-1, ids)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + RENORM_EPS)
    counts = torch.zeros(E, dtype=l.dtype, device=l.device).scatter_add_(
        0, ids.reshape(-1), torch.ones(ids.numel(), dtype=l.dtype, device=l.device))
    f = counts / (T * top_k)
    lb = E * (f * p.mean(dim=0)).sum()
    z = torch.logsumexp(l, dim=-1).square().mean()
    return w, ids.to(torch.int32), lb, z


def route_backward(logits, ids, score, renormalize, grad_weights, grad_lb, grad_z):
    """Gradient of ``route`` w.r.t. ``logits`` given the forward's ``ids``
    (closed form; the selection is not differentiated and ``f_e`` carries no
    gradient):

    - weights: ``dL/ds`` is ``gw`` scattered to the selected experts, through
      the renormalisation ``(gw_i - <gw, w>) / sum_sel(s)`` when on;
    - balance loss: ``dL/dp[t, e] = g_lb * E * f_e / T``, through ``p``
      (softmax, or ``s / sum(s)`` for sigmoid);
    - z-loss: ``dL/dlogits = g_z * 2 * lse_t / T * softmax(logits_t)``;
    - scores: softmax ``q * (g - <q, g>)``; sigmoid ``s * (1 - s) * g``.
    """
    T, E = logits.shape
    k = ids.shape[1]
    l = logits.to(_acc_dtype(logits.dtype))
    q = torch.softmax(l, dim=-1)
    ids = ids.long()
    onehot = torch.zeros(T, E, dtype=l.dtype, device=l.device)
    sel = onehot.scatter(1, ids, 1.0)
    gdense = onehot.scatter_add(1, ids, grad_weights.to(l.dtype))
    s = q if score == "softmax" else torch.sigmoid(l)
    if renormalize:
        ssel = (s * sel).sum(-1, keepdim=True) + RENORM_EPS
        dot = (gdense * s * sel).sum(-1, keepdim=True) / ssel
        ds = sel * (gdense - dot) / ssel
    else:
        ds = gdense * sel
    counts = torch.zeros(E, dtype=l.dtype, device=l.device).scatter_add_(
        0, ids.reshape(-1), torch.ones(ids.numel(), dtype=l.dtype, device=l.device))
    c = (grad_lb.to(l.dtype) * E / T) * counts / (T * k)
    if score == "softmax":
        g = ds + c
        dl = q * (g - (q * g).sum(-1, keepdim=True))
    else:
        ssum = s.sum(-1, keepdim=True)
        p = s / ssum
        dl = s * (1 - s) * (ds + (c - (p * c).sum(-1, keepdim=True)) / ssum)
    lse = torch.logsumexp(l, dim=-1, keepdim=True)
    dl = dl + grad_z.to(l.dtype) * 2.0 / T * lse * q
    return dl.to(logits.dtype)


# ----------------------------------------------------------------------------- permutation


def permute_indices(expert_ids: torch.Tensor, num_experts: int):
    """Stable sort of the ``M = T * k`` copies by expert.

    Returns ``(group_sizes [E] int32, permutation [M] int32, inverse [M] int32)``:
    sorted row ``p`` is the copy ``permutation[p] = t * k + j`` (token ``t``,
    slot ``j``); ``inverse[t * k + j]`` is its sorted row. Copies of one expert
    keep token order (stable)."""
    flat = expert_ids.reshape(-1).to(torch.int64)
    sorted_ids, perm = torch.sort(flat, stable=True)
    ends = torch.searchsorted(sorted_ids, torch.arange(num_experts, device=flat.device), right=True)
    group_sizes = torch.diff(ends, prepend=ends.new_zeros(1))
    inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
    return group_sizes.to(torch.int32), perm.to(torch.int32), inverse.to(torch.int32)


def permute(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int):
    """``x [T, d]`` -> ``(x_sorted [T*k, d], group_sizes [E], permutation, inverse)``."""
    k = expert_ids.shape[1]
    group_sizes, perm, inverse = permute_indices(expert_ids, num_experts)
    return x[perm.long() // k], group_sizes, perm, inverse


def gather_rows(x: torch.Tensor, permutation: torch.Tensor, k: int) -> torch.Tensor:
    """``out[p] = x[permutation[p] // k]`` (the data movement of ``permute``)."""
    return x[permutation.long() // k]


def combine(y: torch.Tensor, weights: torch.Tensor | None, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * y[inverse[t*k + j]]`` in float32
    (weights ``None`` means 1: the backward of ``permute``)."""
    acc = _acc_dtype(y.dtype)
    rows = y[inverse.long()].to(acc).reshape(-1, k, y.shape[1])
    if weights is not None:
        rows = rows * weights.to(acc).unsqueeze(-1)
    return rows.sum(dim=1).to(y.dtype)


def unpermute(y, weights, permutation, inverse):
    """``y [M, d]`` sorted by expert -> ``[T, d]``, weighted by ``weights [T, k]``."""
    return combine(y, weights, inverse, weights.shape[1])


def unpermute_backward(grad_out, y, weights, permutation):
    """-> ``(grad_y [M, d], grad_weights [T, k])``."""
    k = weights.shape[1]
    acc = _acc_dtype(y.dtype)
    perm = permutation.long()
    g = grad_out.to(acc)[perm // k]                                # [M, d]
    w = weights.to(acc).reshape(-1)[perm]                          # [M]
    grad_y = (g * w[:, None]).to(y.dtype)
    dots = (g * y.to(acc)).sum(dim=-1)                             # [M] in sorted order
    grad_w = torch.empty_like(dots).scatter_(0, perm, dots).reshape(weights.shape)
    return grad_y, grad_w.to(weights.dtype)


# ----------------------------------------------------------------------------- grouped matmul


def _row_experts(group_sizes: torch.Tensor, M: int) -> torch.Tensor:
    E = group_sizes.shape[0]
    return torch.repeat_interleave(torch.arange(E, device=group_sizes.device), group_sizes.long(),
                                   output_size=M)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor,
                   transpose_w: bool = False) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e]`` (``w[e].T`` when ``transpose_w``).

    ``x [M, K]``, ``w [E, K, N]`` (``[E, N, K]`` when ``transpose_w``) -> ``[M, N]``.
    Every row is multiplied by every expert in one ``[M, K] @ [K, E*N]``
    product and keeps its own expert's slice: ``E`` times the FLOPs and an
    ``[M, E, N]`` temporary, one op, no data-dependent shapes."""
    acc = _acc_dtype(x.dtype)
    M, K = x.shape
    wa = w.to(acc)
    if transpose_w:
        wa = wa.transpose(1, 2)
    E, N = wa.shape[0], wa.shape[2]
    all_experts = (x.to(acc) @ wa.permute(1, 0, 2).reshape(K, E * N)).view(M, E, N)
    row_e = _row_experts(group_sizes, M)
    out = all_experts.gather(1, row_e.view(M, 1, 1).expand(M, 1, N)).squeeze(1)
    return out.to(x.dtype)


def grouped_matmul_dw(x: torch.Tensor, dy: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """Weight gradient: ``dw[e] = x[rows of e].T @ dy[rows of e]`` -> ``[E, K, N]``
    (zero for an empty group), as one batched product over ``x`` masked per
    expert (an ``[E, M, K]`` temporary)."""
    acc = _acc_dtype(x.dtype)
    E = group_sizes.shape[0]
    row_e = _row_experts(group_sizes, x.shape[0])
    mask = (row_e[None, :] == torch.arange(E, device=x.device)[:, None]).to(acc)   # [E, M]
    xm = mask[:, :, None] * x.to(acc)[None]                                        # [E, M, K]
    return (xm.transpose(1, 2) @ dy.to(acc)).to(x.dtype)


def _segments(group_sizes: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(expert, start, stop)`` of every non-empty group (reads the sizes on the host)."""
    sizes = group_sizes.tolist()
    out, start = [], 0
    for e, n in enumerate(sizes):
        if n:
            out.append((e, start, start + n))
        start += n
    return out


def grouped_matmul_segments(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor,
                            transpose_w: bool = False) -> torch.Tensor:
    """:func:`grouped_matmul` as one product per non-empty expert over its rows.

    Same result (float32 accumulation, float64 when given float64), ``1/E``
    of the FLOPs and no ``[M, E, N]`` temporary, but it reads ``group_sizes``
    on the host and slices by it (data-dependent shapes): the CPU path of the
    ``plum_kernels::grouped_matmul`` op, whose body ``torch.compile`` does not trace."""
    acc = _acc_dtype(x.dtype)
    N = w.shape[1] if transpose_w else w.shape[2]
    out = torch.zeros(x.shape[0], N, dtype=acc, device=x.device)
    xa = x.to(acc)
    for e, a, b in _segments(group_sizes):
        we = w[e].to(acc)
        out[a:b] = xa[a:b] @ (we.T if transpose_w else we)
    return out.to(x.dtype)


def grouped_matmul_dw_segments(x: torch.Tensor, dy: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_matmul_dw` as one product per non-empty expert (host-read sizes,
    ``1/E`` of the FLOPs, no ``[E, M, K]`` temporary): the CPU path of its op."""
    acc = _acc_dtype(x.dtype)
    E = group_sizes.shape[0]
    dw = torch.zeros(E, x.shape[1], dy.shape[1], dtype=acc, device=x.device)
    for e, a, b in _segments(group_sizes):
        dw[e] = x[a:b].to(acc).T @ dy[a:b].to(acc)
    return dw.to(x.dtype)


# ----------------------------------------------------------------------------- SwiGLU expert layer


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``h [M, 2f]`` (gate half, then up half) -> ``silu(gate) * up`` in float32."""
    f = h.shape[-1] // 2
    hf = h.float() if h.dtype != torch.float64 else h
    return (F.silu(hf[:, :f]) * hf[:, f:]).to(h.dtype)
