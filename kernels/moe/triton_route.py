"""Triton router: scores, top-k with a selection-only bias, renormalisation,
and the per-block partial sums behind the auxiliary losses (forward and
backward). Semantics: ``kernels/moe/reference.py``.

One program owns ``BLOCK_T`` tokens and all ``E`` experts (``E`` padded to a
power of two, ``BLOCK_E``), so a token's softmax, top-k and renormalisation
never leave registers. Top-k is ``k`` rounds of ``argmax`` (ties go to the
lower expert id) over ``s + bias``, knocking the winner out each round. The
losses' reductions over tokens are deterministic: each program writes its
partial column sums of ``p`` into a ``[num_blocks, E]`` buffer, which torch
sums (no atomics); the expert counts come from the ids (integer counts,
exact in any order).

Tile rule (``RouteBlockSizes``): ``BLOCK_T = clamp(tile_elems // BLOCK_E,
1, 128)`` and ``num_warps = clamp(BLOCK_T * BLOCK_E // (32 *
values_per_thread), 4, 16)``: with the defaults (2048, 16) a program holds
128 tokens at ``E <= 16``, 8 at ``E = 256``, one at ``E >= 2048`` (8 warps at
4096), and every ``[BLOCK_T, BLOCK_E]`` float32 array of a program is at most
16 values per thread at any ``E``. The kernels keep a few such arrays live
(the scores and the knocked-out selection scores in the forward; the scores,
the scattered weight gradient and its products in the backward), so the
sm_90 builds need at most 160 registers per thread and never spill for
``E <= 256`` (``tests/support/moe_aot.py`` compiles one case per tile the rule gives
there, forward and backward). Twice the values per thread (4096-value tiles
over 4 warps) puts the backward at the 255-register cap.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .._autotune import wrapped
from .reference import RENORM_EPS
from .triton_gmm import cpu_interpreter, to_store

MAX_EXPERTS = 4096


def _check_pow2(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {value!r}")


@dataclasses.dataclass(frozen=True)
class RouteBlockSizes:
    """Register tile of the router kernels: a program holds ``BLOCK_T`` tokens
    by ``BLOCK_E`` (``E`` padded to a power of two) scores.

    ``tile_elems``: the target ``BLOCK_T * BLOCK_E``; ``BLOCK_T`` is
    ``tile_elems // BLOCK_E`` clamped to [1, 128] (at ``E > tile_elems`` a
    program holds one token, all its experts).
    ``values_per_thread``: float32 values of one ``[BLOCK_T, BLOCK_E]`` array
    per thread, which sets the warps (4 to 16). With 16 the sm_90 builds use
    at most 160 of the 255 registers a thread may have and never spill for
    ``E <= 256``, as ``tests/support/moe_aot.py`` verifies for every tile this rule
    gives there (see the module docstring). The router is memory-bound and
    small next to the expert GEMMs: these sizes are chosen to fit the
    register file, not by timing.
    """

    tile_elems: int = 2048
    values_per_thread: int = 16

    def __post_init__(self):
        _check_pow2("tile_elems", self.tile_elems, 16, MAX_EXPERTS)
        _check_pow2("values_per_thread", self.values_per_thread, 1, 64)

    def block_t(self, E: int) -> int:
        return max(1, min(128, self.tile_elems // triton.next_power_of_2(E)))

    def num_warps(self, E: int) -> int:
        tile = self.block_t(E) * triton.next_power_of_2(E)
        return max(4, min(16, tile // (32 * self.values_per_thread)))


DEFAULT_ROUTE_BLOCKS = RouteBlockSizes()


@triton.jit
def _scores(l, col_mask, SIGMOID: tl.constexpr):
    """-> (s: selection score, p: probability for the balance loss, q: softmax, lse)."""
    m = tl.max(l, axis=1)
    ex = tl.exp(l - m[:, None])
    ex = tl.where(col_mask, ex, 0.0)
    den = tl.sum(ex, axis=1)
    q = ex / den[:, None]
    lse = m + tl.log(den)
    if SIGMOID:
        s = tl.where(col_mask, 1.0 / (1.0 + tl.exp(-l)), 0.0)
        p = s / tl.sum(s, axis=1)[:, None]
    else:
        s = q
        p = q
    return s, p, q, lse


@triton.jit
def _route_fwd_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, lse_ptr, psum_ptr,
                      T, E, k, stride_lt,
                      HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr, RENORM: tl.constexpr,
                      EPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rt = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    re = tl.arange(0, BLOCK_E)
    rk = tl.arange(0, BLOCK_K)
    t_mask = rt < T
    e_mask = re < E
    col_mask = e_mask[None, :]
    l = tl.load(logits_ptr + rt.to(tl.int64)[:, None] * stride_lt + re[None, :],
                mask=t_mask[:, None] & col_mask, other=float("-inf")).to(tl.float32)
    l = tl.where(t_mask[:, None] & col_mask, l, tl.where(col_mask, 0.0, float("-inf")))
    s, p, q, lse = _scores(l, col_mask, SIGMOID)
    # the loss partials first: p is dead before the top-k loop
    tl.store(lse_ptr + rt, lse, mask=t_mask)
    tl.store(psum_ptr + pid * E + re, tl.sum(tl.where(t_mask[:, None], p, 0.0), axis=0), mask=e_mask)

    sel = s
    if HAS_BIAS:
        sel = sel + tl.load(bias_ptr + re, mask=e_mask, other=0.0).to(tl.float32)[None, :]
    sel = tl.where(col_mask, sel, float("-inf"))
    w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in range(k):
        # ties go to the lower expert id; without a bias sel is s on the real
        # experts, so the maximum is the winner's score exactly
        val, best = tl.max(sel, axis=1, return_indices=True, return_indices_tie_break_left=True)
        best = best.to(tl.int32)
        hit = re[None, :] == best[:, None]
        if HAS_BIAS:
            val = tl.sum(tl.where(hit, s, 0.0), axis=1)
        w = tl.where(rk[None, :] == j, val[:, None], w)
        ids = tl.where(rk[None, :] == j, best[:, None], ids)
        sel = tl.where(hit, float("-inf"), sel)
    if RENORM:
        w = w / (tl.sum(w, axis=1)[:, None] + EPS)
    out_mask = t_mask[:, None] & (rk[None, :] < k)
    out_off = rt.to(tl.int64)[:, None] * k + rk[None, :]
    tl.store(w_ptr + out_off, w, mask=out_mask)
    tl.store(ids_ptr + out_off, ids, mask=out_mask)


@triton.jit
def _route_bwd_kernel(logits_ptr, ids_ptr, gw_ptr, c_ptr, lse_ptr, dl_ptr,
                      T, E, k, stride_lt, stride_dt, gz_ptr,
                      SIGMOID: tl.constexpr, RENORM: tl.constexpr, EPS: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                      CPU_INTERP: tl.constexpr = False):
    """``dl = d/dlogits`` of ``<gw, weights> + g_lb * lb + g_z * z``; ``c[e] =
    g_lb * E * f_e / T`` (the balance loss's gradient w.r.t. ``p[t, e]``) and
    ``gz_ptr`` points to ``2 * g_z / T`` (a device scalar: no host sync)."""
    pid = tl.program_id(0)
    rt = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    re = tl.arange(0, BLOCK_E)
    rk = tl.arange(0, BLOCK_K)
    t_mask = rt < T
    e_mask = re < E
    col_mask = e_mask[None, :]
    l = tl.load(logits_ptr + rt.to(tl.int64)[:, None] * stride_lt + re[None, :],
                mask=t_mask[:, None] & col_mask, other=0.0).to(tl.float32)
    l = tl.where(col_mask, l, float("-inf"))
    s, p, q, _ = _scores(l, col_mask, SIGMOID)
    lse = tl.load(lse_ptr + rt, mask=t_mask, other=0.0)
    gz_scale = tl.load(gz_ptr)

    in_off = rt.to(tl.int64)[:, None] * k + rk[None, :]
    in_mask = t_mask[:, None] & (rk[None, :] < k)
    ids = tl.load(ids_ptr + in_off, mask=in_mask, other=-1)
    gw = tl.load(gw_ptr + in_off, mask=in_mask, other=0.0).to(tl.float32)
    g_dense = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)     # gw scattered to experts
    selected = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for j in range(k):
        id_j = tl.sum(tl.where(rk[None, :] == j, ids, 0), axis=1)
        g_j = tl.sum(tl.where(rk[None, :] == j, gw, 0.0), axis=1)
        hit = re[None, :] == id_j[:, None]
        g_dense += tl.where(hit, g_j[:, None], 0.0)
        selected += tl.where(hit, 1.0, 0.0)
    if RENORM:
        ssel = tl.sum(s * selected, axis=1) + EPS
        dot = tl.sum(g_dense * s * selected, axis=1) / ssel        # sum_m gw_m * w_m
        ds = selected * (g_dense - dot[:, None]) / ssel[:, None]
    else:
        ds = g_dense * selected

    c = tl.load(c_ptr + re, mask=e_mask, other=0.0)[None, :]
    if SIGMOID:
        ssum = tl.sum(s, axis=1)
        dp = (c - tl.sum(p * c, axis=1)[:, None]) / ssum[:, None]
        dl = s * (1.0 - s) * (ds + dp)
    else:
        d = ds + c
        dl = q * (d - tl.sum(q * d, axis=1)[:, None])
    dl += gz_scale * lse[:, None] * q
    tl.store(dl_ptr + rt.to(tl.int64)[:, None] * stride_dt + re[None, :],
             to_store(dl, dl_ptr.dtype.element_ty, CPU_INTERP), mask=t_mask[:, None] & col_mask)


# ----------------------------------------------------------------------------- launchers


def _route_meta(E: int, k: int, block_sizes: RouteBlockSizes | None):
    bs = block_sizes or DEFAULT_ROUTE_BLOCKS
    return bs.block_t(E), triton.next_power_of_2(E), triton.next_power_of_2(max(k, 1)), bs.num_warps(E)


def expert_counts(ids: torch.Tensor, E: int) -> torch.Tensor:
    """Copies routed to each expert, float32 ``[E]`` (integer counts: exact and
    the same in any summation order; device ops, no host sync)."""
    flat = ids.reshape(-1).long()
    counts = torch.zeros(E, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones(flat.shape, dtype=torch.int32, device=ids.device))
    return counts.float()


def launch_route_forward(logits: torch.Tensor, top_k: int, score: str, bias: torch.Tensor | None,
                         renormalize: bool, block_sizes: RouteBlockSizes | None = None):
    """The forward kernel alone -> ``(weights, ids, lse, psum [num_blocks, E])``."""
    T, E = logits.shape
    BT, BE, BK, warps = _route_meta(E, top_k, block_sizes)
    dev = logits.device
    w = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=dev)
    lse = torch.empty(T, dtype=torch.float32, device=dev)
    nb = triton.cdiv(T, BT)
    psum = torch.empty(nb, E, dtype=torch.float32, device=dev)
    if T > 0:
        wrapped(_route_fwd_kernel)[(nb,)](logits, bias if bias is not None else logits, w, ids, lse, psum,
                                 T, E, top_k, logits.stride(0),
                                 HAS_BIAS=bias is not None, SIGMOID=score == "sigmoid", RENORM=renormalize,
                                 EPS=RENORM_EPS, BLOCK_T=BT, BLOCK_E=BE, BLOCK_K=BK, num_warps=warps)
    return w, ids, lse, psum


def route_forward(logits: torch.Tensor, top_k: int, score: str, bias: torch.Tensor | None,
                  renormalize: bool, *, block_sizes: RouteBlockSizes | None = None):
    """-> ``(weights [T, k] f32, ids [T, k] int32, lse [T] f32, load_balance, z_loss)``."""
    T, E = logits.shape
    logits = logits.contiguous() if logits.stride(1) != 1 else logits
    w, ids, lse, psum = launch_route_forward(logits, top_k, score, bias, renormalize, block_sizes)
    f = expert_counts(ids, E) / (T * top_k)
    lb = E * (f * psum.sum(0) / T).sum()
    z = lse.square().mean()
    return w, ids, lse, lb, z


def route_backward(logits: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, score: str,
                   renormalize: bool, grad_weights: torch.Tensor, grad_lb: torch.Tensor,
                   grad_z: torch.Tensor, *, block_sizes: RouteBlockSizes | None = None) -> torch.Tensor:
    T, E = logits.shape
    k = ids.shape[1]
    BT, BE, BK, warps = _route_meta(E, k, block_sizes)
    logits = logits.contiguous() if logits.stride(1) != 1 else logits
    c = (grad_lb.float() * E / T) * (expert_counts(ids, E) / (T * k))
    gz_scale = (grad_z.float() * 2.0 / T).reshape(1)
    dl = torch.empty(T, E, dtype=logits.dtype, device=logits.device)
    if T > 0:
        wrapped(_route_bwd_kernel)[(triton.cdiv(T, BT),)](
            logits, ids.contiguous(), grad_weights.float().contiguous(), c, lse, dl,
            T, E, k, logits.stride(0), dl.stride(0), gz_scale,
            SIGMOID=score == "sigmoid", RENORM=renormalize, EPS=RENORM_EPS,
            BLOCK_T=BT, BLOCK_E=BE, BLOCK_K=BK, CPU_INTERP=cpu_interpreter(logits), num_warps=warps)
    return dl
