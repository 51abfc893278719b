"""Triton grouped matmul for the MoE expert layer (forward, dx and dw).

``gmm(x[M, K], w[E, K, N], group_sizes[E])``: the rows of ``x`` are sorted by
expert (``group_sizes[e]`` rows for expert ``e``, in order); each row is
multiplied by its expert's weight. The backward uses the same kernel with the
weight read transposed through its strides (``dx = gmm(dy, w^T)``, no copy of
``w``) and a second kernel for the weight gradient (``tgmm``:
``dw[e] = x_e^T dy_e``).

Tile schedule (vLLM ``moe_align_block_size`` idea, computed with a handful of
torch ops on the device, no host synchronisation): every expert's rows are cut
into ``ceil(group_sizes[e] / BLOCK_M)`` M-tiles, so no tile mixes two experts;
the table holds, for each tile, its expert and row range. The launch grid is
the static upper bound ``cdiv(M, BLOCK_M) + E`` tiles times the N-tiles; the
programs past the last real tile return at once. N-tiles are the fastest grid
axis so that the programs running together share one block of ``x`` rows and
sweep one expert's weight (which stays in L2 for the expert's next M-tiles).

Precision: bf16/fp16 inputs go to ``tl.dot`` (wgmma on Hopper) with float32
accumulation; float32 inputs use ``input_precision="ieee"`` (exact float32
products, no tf32), matching torch's default for float32 matmuls. Every load
is masked on M, N and K, so no dimension has to be a multiple of its tile (the
maxtext #1183 bug class: K not a multiple of the tile).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl


def _check_pow2(name: str, value: int, lo: int, hi: int) -> None:
    if not isinstance(value, int) or value < lo or value > hi or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {value!r}")


@dataclasses.dataclass(frozen=True)
class GmmBlockSizes:
    """Tiles of the forward / dx kernel (``BLOCK_M`` rows of one expert, ``BLOCK_N``
    output columns, ``BLOCK_K`` reduction step).

    Defaults: the standard Hopper bf16 GEMM tile (128 x 128 x 64, 8 warps,
    3 stages: 96 KiB of shared memory). Not yet tuned on a GPU (no GPU was
    available when this was written); benchmarks/bench_moe.py is the harness."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        _check_pow2("block_m", self.block_m, 16, 256)
        _check_pow2("block_n", self.block_n, 16, 256)
        _check_pow2("block_k", self.block_k, 16, 256)
        _check_pow2("num_warps", self.num_warps, 1, 16)
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages must be an int in [1, 8], got {self.num_stages!r}")


@dataclasses.dataclass(frozen=True)
class TgmmBlockSizes:
    """Tiles of the weight-gradient kernel: each program owns one
    ``BLOCK_K x BLOCK_N`` tile of ``dw[e]`` and loops over the expert's rows
    ``BLOCK_M`` at a time. Defaults: 128 x 128 output tile, 64-row steps,
    8 warps, 3 stages (96 KiB of shared memory); untuned (no GPU here)."""

    block_k: int = 128
    block_n: int = 128
    block_m: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        _check_pow2("block_k", self.block_k, 16, 256)
        _check_pow2("block_n", self.block_n, 16, 256)
        _check_pow2("block_m", self.block_m, 16, 256)
        _check_pow2("num_warps", self.num_warps, 1, 16)
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages must be an int in [1, 8], got {self.num_stages!r}")


DEFAULT_GMM_BLOCKS = GmmBlockSizes()
DEFAULT_TGMM_BLOCKS = TgmmBlockSizes()


# ----------------------------------------------------------------------------- kernels


def cpu_interpreter(t: torch.Tensor) -> bool:
    """True for CPU tensors, which only reach a Triton kernel through the
    interpreter. Two interpreter defects (Triton 3.9) are worked around there,
    and only there (CUDA tensors never take these paths):

    - ``tl.dot`` multiplies bfloat16 operands as their raw uint16 bits: 16-bit
      operands are widened to float32 first (exact; the products are
      accumulated in float32 as on the GPU);
    - float32 -> bfloat16 casts truncate (the GPU rounds to nearest even):
      ``to_store`` rounds to nearest even by hand first.
    """
    return t.device.type == "cpu"


@triton.jit
def to_store(x, dtype: tl.constexpr, CPU_INTERP: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest even (see ``cpu_interpreter``)."""
    if CPU_INTERP and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)



@triton.jit
def _gmm_kernel(x_ptr, w_ptr, out_ptr, sched_ptr, num_tiles, N, K,
                stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om, stride_on,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr, CPU_INTERP: tl.constexpr = False):
    """One (M-tile, N-tile) of ``out = x_e @ w[e]``; ``sched`` is ``int32 [3, num_tiles]``
    (expert or -1, first row, end row)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    tile = pid // num_n
    pid_n = pid % num_n
    expert = tl.load(sched_ptr + tile)
    if expert < 0:
        return
    row_start = tl.load(sched_ptr + num_tiles + tile)
    row_end = tl.load(sched_ptr + 2 * num_tiles + tile)

    rm = row_start + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < row_end
    n_mask = rn < N
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
              + rk[:, None] * stride_wk + rn[None, :] * stride_wn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = rk < K - k0
        a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if CPU_INTERP:  # see cpu_interpreter()
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, to_store(acc, out_ptr.dtype.element_ty, CPU_INTERP), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _tgmm_kernel(x_ptr, dy_ptr, dw_ptr, offsets_ptr, K, N,
                 stride_xm, stride_xk, stride_dym, stride_dyn, stride_we, stride_wk, stride_wn,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                 PRECISION: tl.constexpr, CPU_INTERP: tl.constexpr = False):
    """One ``BLOCK_K x BLOCK_N`` tile of ``dw[e] = x_e^T dy_e``; ``offsets`` is
    ``int32 [E + 1]``. An empty group stores zeros."""
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_k = pid // num_n
    pid_n = pid % num_n
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)

    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    k_mask = rk < K
    n_mask = rn < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + rm
        m_mask = rows < end
        rows64 = rows.to(tl.int64)
        a = tl.load(x_ptr + rows64[None, :] * stride_xm + rk[:, None] * stride_xk,
                    mask=k_mask[:, None] & m_mask[None, :], other=0.0)          # [BLOCK_K, BLOCK_M]
        b = tl.load(dy_ptr + rows64[:, None] * stride_dym + rn[None, :] * stride_dyn,
                    mask=m_mask[:, None] & n_mask[None, :], other=0.0)          # [BLOCK_M, BLOCK_N]
        if CPU_INTERP:  # see cpu_interpreter()
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    dw_ptrs = (dw_ptr + expert.to(tl.int64) * stride_we
               + rk[:, None] * stride_wk + rn[None, :] * stride_wn)
    tl.store(dw_ptrs, to_store(acc, dw_ptr.dtype.element_ty, CPU_INTERP), mask=k_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------- launchers


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def tile_schedule(group_sizes: torch.Tensor, M: int, block_m: int) -> torch.Tensor:
    """``int32 [3, cdiv(M, block_m) + E]``: per M-tile its expert (-1 past the last
    tile), first row and end row. Device ops only, no host sync."""
    E = group_sizes.shape[0]
    gs = group_sizes.to(torch.int64)
    ends = torch.cumsum(gs, 0)
    starts = ends - gs
    tiles = (gs + block_m - 1) // block_m
    tile_ends = torch.cumsum(tiles, 0)
    max_tiles = triton.cdiv(M, block_m) + E
    i = torch.arange(max_tiles, device=gs.device)
    e = torch.searchsorted(tile_ends, i, right=True)
    valid = e < E
    ec = e.clamp(max=E - 1)
    row_start = starts[ec] + (i - (tile_ends[ec] - tiles[ec])) * block_m
    sched = torch.stack([torch.where(valid, e, -1), torch.where(valid, row_start, 0),
                         torch.where(valid, ends[ec], 0)])
    return sched.to(torch.int32).contiguous()


def gmm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor, *, transpose_w: bool = False,
        block_sizes: GmmBlockSizes | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ w[e]`` per group -> ``[M, N]``; ``w [E, K, N]``, or ``[E, N, K]``
    read transposed when ``transpose_w``. Inputs are assumed validated
    (``kernels.moe.ops_torch`` does it)."""
    bs = block_sizes or DEFAULT_GMM_BLOCKS
    M, K = x.shape
    E = w.shape[0]
    if transpose_w:
        N = w.shape[1]
        s_we, s_wk, s_wn = w.stride(0), w.stride(2), w.stride(1)
    else:
        N = w.shape[2]
        s_we, s_wk, s_wn = w.stride(0), w.stride(1), w.stride(2)
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    sched = tile_schedule(group_sizes, M, bs.block_m)
    num_tiles = sched.shape[1]
    grid = (num_tiles * triton.cdiv(N, bs.block_n),)
    _gmm_kernel[grid](x, w, out, sched, num_tiles, N, K,
                      x.stride(0), x.stride(1), s_we, s_wk, s_wn, out.stride(0), out.stride(1),
                      BLOCK_M=bs.block_m, BLOCK_N=bs.block_n, BLOCK_K=bs.block_k,
                      PRECISION=_precision(x.dtype), CPU_INTERP=cpu_interpreter(x),
                      num_warps=bs.num_warps, num_stages=bs.num_stages)
    return out


def tgmm(x: torch.Tensor, dy: torch.Tensor, group_sizes: torch.Tensor, *,
         block_sizes: TgmmBlockSizes | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Weight gradient ``dw[e] = x_e^T dy_e``: ``x [M, K]``, ``dy [M, N]`` ->
    ``[E, K, N]`` in ``x.dtype`` (zeros for empty groups)."""
    bs = block_sizes or DEFAULT_TGMM_BLOCKS
    M, K = x.shape
    N = dy.shape[1]
    E = group_sizes.shape[0]
    if out is None:
        out = torch.empty(E, K, N, dtype=x.dtype, device=x.device)
    if E == 0 or K == 0 or N == 0:
        return out
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=x.device)
    offsets[1:] = torch.cumsum(group_sizes, 0)
    grid = (triton.cdiv(K, bs.block_k) * triton.cdiv(N, bs.block_n), E)
    _tgmm_kernel[grid](x, dy, out, offsets, K, N,
                       x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
                       out.stride(0), out.stride(1), out.stride(2),
                       BLOCK_K=bs.block_k, BLOCK_N=bs.block_n, BLOCK_M=bs.block_m,
                       PRECISION=_precision(x.dtype), CPU_INTERP=cpu_interpreter(x),
                      num_warps=bs.num_warps, num_stages=bs.num_stages)
    return out
