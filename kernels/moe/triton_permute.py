"""Triton data movement of the MoE layer: gather token copies into expert
order, and the weighted combine back to token order (forward and backward).

The sort itself is ``torch.sort(stable=True)`` on the device
(``reference.permute_indices``); these kernels move the rows:

- ``gather_rows``: ``out[p] = x[permutation[p] // k]`` (``moe_permute``).
- ``combine``: ``out[t] = sum_j w[t, j] * y[inverse[t*k + j]]`` with float32
  accumulation (``moe_unpermute``; with ``w = None`` it is the backward of
  ``moe_permute``: each token sums the gradients of its ``k`` copies, a gather,
  so no atomics and a deterministic result).
- ``unpermute_backward``: per sorted row ``p`` (copy ``a = permutation[p]``,
  token ``t = a // k``): ``dy[p] = w[a] * dout[t]`` and
  ``dw[a] = <dout[t], y[p]>``, both in one pass.

All are memory-bound row copies: ``BLOCK_R`` rows per program, the feature
dimension in ``BLOCK_D`` chunks. Every row index read from ``permutation`` /
``inverse`` is clamped into ``[0, T*k)`` before it forms an address, so
unchecked bad indices (``validate=False``) give undefined values but never an
access outside the tensors.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .._autotune import wrapped
from .triton_gmm import cpu_interpreter, to_store


@dataclasses.dataclass(frozen=True)
class RowBlockSizes:
    """Rows per program and feature chunk of the row-moving kernels: a program
    moves ``block_rows`` rows, ``block_d`` features at a time, over
    ``num_warps`` warps. The defaults, 16 rows x 256 features over 4 warps,
    give each thread 32 values per chunk (four 16-byte vectors of bf16).
    These kernels are memory-bound copies; the sm_90 builds of the defaults
    with bf16 rows (fp16 is the same code), compiled from recorded launches by
    ``tests/support/moe_aot.py``, have no register spills (at most 90 registers per
    thread) and no shared-memory staging. The sizes are chosen to move whole
    16-byte vectors, not by timing."""

    block_rows: int = 16
    block_d: int = 256
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_rows", "block_d"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1) or v > 4096:
                raise ValueError(f"{name} must be a power of two in [1, 4096], got {v!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps!r}")


DEFAULT_ROW_BLOCKS = RowBlockSizes()


@triton.jit
def _gather_rows_kernel(x_ptr, out_ptr, perm_ptr, M, D, k, stride_x, stride_o,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rp = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rp < M
    # the address is clamped (perm in [0, M), M = T * k): any permutation value reads a row of x
    src = (tl.minimum(tl.maximum(tl.load(perm_ptr + rp, mask=r_mask, other=0), 0), M - 1) // k).to(tl.int64)
    rd = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        mask = r_mask[:, None] & (d0 + rd < D)[None, :]
        v = tl.load(x_ptr + src[:, None] * stride_x + (d0 + rd)[None, :], mask=mask)
        tl.store(out_ptr + rp.to(tl.int64)[:, None] * stride_o + (d0 + rd)[None, :], v, mask=mask)


@triton.jit
def _combine_kernel(y_ptr, w_ptr, inv_ptr, out_ptr, T, D, k, stride_y, stride_o,
                    HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                    CPU_INTERP: tl.constexpr = False):
    rt = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_mask = rt < T
    mask = t_mask[:, None] & (rd < D)[None, :]
    rt64 = rt.to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for j in range(k):
        row = tl.load(inv_ptr + rt64 * k + j, mask=t_mask, other=0)
        row = tl.minimum(tl.maximum(row, 0), T * k - 1).to(tl.int64)   # a row of y whatever inverse holds
        v = tl.load(y_ptr + row[:, None] * stride_y + rd[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            v *= tl.load(w_ptr + rt64 * k + j, mask=t_mask, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(out_ptr + rt64[:, None] * stride_o + rd[None, :], to_store(acc, out_ptr.dtype.element_ty, CPU_INTERP),
             mask=mask)


@triton.jit
def _unpermute_bwd_kernel(dout_ptr, y_ptr, w_ptr, perm_ptr, dy_ptr, dw_ptr, M, D, k,
                          stride_do, stride_y, stride_dy,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, CPU_INTERP: tl.constexpr = False):
    rp = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rp < M
    a = tl.minimum(tl.maximum(tl.load(perm_ptr + rp, mask=r_mask, other=0), 0), M - 1)   # a copy in [0, T*k)
    t = (a // k).to(tl.int64)
    w = tl.load(w_ptr + a, mask=r_mask, other=0.0).to(tl.float32)
    rp64 = rp.to(tl.int64)
    rd = tl.arange(0, BLOCK_D)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask = r_mask[:, None] & (d0 + rd < D)[None, :]
        g = tl.load(dout_ptr + t[:, None] * stride_do + (d0 + rd)[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rp64[:, None] * stride_y + (d0 + rd)[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(g * y, axis=1)
        tl.store(dy_ptr + rp64[:, None] * stride_dy + (d0 + rd)[None, :],
                 to_store(g * w[:, None], dy_ptr.dtype.element_ty, CPU_INTERP), mask=mask)
    tl.store(dw_ptr + a, to_store(dot, dw_ptr.dtype.element_ty, CPU_INTERP), mask=r_mask)


# ----------------------------------------------------------------------------- launchers


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def gather_rows(x: torch.Tensor, permutation: torch.Tensor, k: int, *,
                block_sizes: RowBlockSizes | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    bs = block_sizes or DEFAULT_ROW_BLOCKS
    x = _rows(x)
    M, D = permutation.shape[0], x.shape[1]
    if out is None:
        out = torch.empty(M, D, dtype=x.dtype, device=x.device)
    if M and D:
        wrapped(_gather_rows_kernel)[(triton.cdiv(M, bs.block_rows),)](
            x, out, permutation, M, D, k, x.stride(0), out.stride(0),
            BLOCK_R=bs.block_rows, BLOCK_D=bs.block_d, num_warps=bs.num_warps)
    return out


def combine(y: torch.Tensor, weights: torch.Tensor | None, inverse: torch.Tensor, k: int, *,
            block_sizes: RowBlockSizes | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    bs = block_sizes or DEFAULT_ROW_BLOCKS
    y = _rows(y)
    T, D = inverse.shape[0] // k, y.shape[1]
    if out is None:
        out = torch.empty(T, D, dtype=y.dtype, device=y.device)
    if T and D:
        w = weights.contiguous() if weights is not None else y
        grid = (triton.cdiv(T, bs.block_rows), triton.cdiv(D, bs.block_d))
        wrapped(_combine_kernel)[grid](y, w, inverse, out, T, D, k, y.stride(0), out.stride(0),
                              HAS_W=weights is not None, BLOCK_R=bs.block_rows, BLOCK_D=bs.block_d,
                              CPU_INTERP=cpu_interpreter(y), num_warps=bs.num_warps)
    return out


def unpermute_backward(grad_out: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                       permutation: torch.Tensor, *, block_sizes: RowBlockSizes | None = None):
    """-> ``(grad_y [M, D] in y.dtype, grad_weights [T, k] in weights.dtype)``."""
    bs = block_sizes or DEFAULT_ROW_BLOCKS
    grad_out, y, weights = _rows(grad_out), _rows(y), weights.contiguous()
    M, D = y.shape
    k = weights.shape[1]
    dy = torch.empty_like(y)
    dw = torch.empty_like(weights)
    if M:
        wrapped(_unpermute_bwd_kernel)[(triton.cdiv(M, bs.block_rows),)](
            grad_out, y, weights, permutation, dy, dw, M, D, k,
            grad_out.stride(0), y.stride(0), dy.stride(0),
            BLOCK_R=bs.block_rows, BLOCK_D=bs.block_d, CPU_INTERP=cpu_interpreter(y), num_warps=bs.num_warps)
    return dy, dw
