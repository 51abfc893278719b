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
the table (int32 ``[max_tiles, 3]``, one row per tile: expert, first row, end
row) is sized for the smallest ``BLOCK_M`` of the space and filled for the
``BLOCK_M`` that runs (by a pre-hook of each autotuned config). The launch
grid is the static upper bound ``cdiv(M, BLOCK_M) + E`` tiles times the
N-tiles; the programs past the last real tile return at once. N-tiles are
the fastest grid axis so that the programs running together share one block
of ``x`` rows and sweep one expert's weight (which stays in L2 for the
expert's next M-tiles).

Tiles: ``GMM_SPACES`` / ``TGMM_SPACES`` below. On CUDA tensors the 16-bit
kernels are autotuned over their space (``plum_kernels._autotune``), keyed by N,
K, the weight's transposition, the dtype and M rounded up to a power of two
(``tune_m``, an argument the kernel ignores and Triton does not specialise
on), so a training run tunes once per projection, not once per step; under
the interpreter, with ``set_autotune(False)`` or with explicit
``block_sizes``, one configuration runs (the space's first by default).

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

from plum_kernels._autotune import launch


def _check_pow2(name: str, value: int, lo: int, hi: int) -> None:
    if not isinstance(value, int) or value < lo or value > hi or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {value!r}")


@dataclasses.dataclass(frozen=True)
class GmmBlockSizes:
    """Tiles of the forward / dx kernel: a program owns ``block_m`` rows of
    one expert by ``block_n`` output columns and steps over the reduction
    ``block_k`` at a time, ``num_stages`` of those steps in flight (the
    shared-memory ring that hides global-memory latency behind wgmma). The
    field defaults are the 16-bit default, ``GMM_SPACES[2][0]``."""

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

    def meta(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}


@dataclasses.dataclass(frozen=True)
class TgmmBlockSizes:
    """Tiles of the weight-gradient kernel: a program owns one ``block_k x
    block_n`` tile of ``dw[e]`` and steps over the expert's rows ``block_m``
    at a time (the reduction), ``num_stages`` steps in flight. The field
    defaults are the 16-bit default, ``TGMM_SPACES[2][0]``."""

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

    def meta(self) -> dict:
        return {"BLOCK_K": self.block_k, "BLOCK_N": self.block_n, "BLOCK_M": self.block_m}


G, TG = GmmBlockSizes, TgmmBlockSizes
# Keyed by element size. 2 (bf16 and fp16: one code path) is autotuned over
# its space on a GPU, the first entry being the default; 4 (fp32, exact
# "ieee" products on the FMA units, no tensor cores) runs its single default.
# Every entry is compiled for sm_90 by tests/support/moe_aot.py from a recorded launch
# with Triton's run-time specialisation (the pipelined build that runs), for
# plain and transposed weights: no register spills, shared memory within the
# limit, wgmma for 16-bit inputs. The spaces hold the configurations that
# pass; the autotuner picks among them on the GPU. The sm_90
# facts, fwd / dx: registers per thread, shared memory, blocks per SM.
GMM_SPACES: dict[int, tuple[GmmBlockSizes, ...]] = {
    2: (G(128, 128, 64, 8, 3),    # 104 / 102 regs,  96 KiB, 2 blocks: the standard Hopper tile
        G(128, 256, 64, 8, 3),    # 190 / 188 regs, 144 KiB, 1 block: wide N, half the x re-reads
        G(128, 128, 64, 8, 4),    # 102 / 102 regs, 128 KiB, 1 block: one more stage in flight
        G(64, 128, 64, 4, 3)),    # 126 / 124 regs,  72 KiB, 3 blocks: small groups waste less
    4: (G(128, 64, 32, 8, 3),),   # 128 / 154 regs,  48 KiB, 2 / 1 blocks (128x128x32 spills in dx)
}
TGMM_SPACES: dict[int, tuple[TgmmBlockSizes, ...]] = {
    2: (TG(128, 128, 64, 8, 3),   #  99 regs,  96 KiB, 2 blocks
        TG(128, 256, 64, 8, 3),   # 170 regs, 144 KiB, 1 block
        TG(128, 128, 64, 8, 4),   #  99 regs, 128 KiB, 1 block
        TG(64, 128, 64, 4, 3)),   #  96 regs,  72 KiB, 3 blocks: more programs for few experts
    4: (TG(128, 128, 32, 8, 3),),  # 123 regs,  64 KiB, 2 blocks
}
del G, TG
DEFAULT_GMM_BLOCKS = GMM_SPACES[2][0]
DEFAULT_TGMM_BLOCKS = TGMM_SPACES[2][0]


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



@triton.jit(do_not_specialize=["tune_m"])
def _gmm_kernel(x_ptr, w_ptr, out_ptr, sched_ptr, group_sizes_ptr, N, K, tune_m,
                stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om, stride_on,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                TRANS_W: tl.constexpr, PRECISION: tl.constexpr, CPU_INTERP: tl.constexpr = False):
    """One (M-tile, N-tile) of ``out = x_e @ w[e]``; ``sched`` is ``int32
    [max_tiles, 3]`` (per M-tile: expert or -1, first row, end row).
    ``group_sizes_ptr`` (read by the schedule's pre-hook), ``tune_m`` and
    ``TRANS_W`` (the weight's layout is in its strides) are autotuning inputs
    the kernel itself does not read."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    tile = pid // num_n
    pid_n = pid % num_n
    expert = tl.load(sched_ptr + 3 * tile)
    if expert < 0:
        return
    row_start = tl.load(sched_ptr + 3 * tile + 1)
    row_end = tl.load(sched_ptr + 3 * tile + 2)

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


@triton.jit(do_not_specialize=["tune_m"])
def _tgmm_kernel(x_ptr, dy_ptr, dw_ptr, offsets_ptr, K, N, tune_m,
                 stride_xm, stride_xk, stride_dym, stride_dyn, stride_we, stride_wk, stride_wn,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                 PRECISION: tl.constexpr, CPU_INTERP: tl.constexpr = False):
    """One ``BLOCK_K x BLOCK_N`` tile of ``dw[e] = x_e^T dy_e``; ``offsets`` is
    ``int32 [E + 1]``. An empty group stores zeros. ``tune_m`` is an
    autotuning input the kernel does not read."""
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


def gmm_space(dtype: torch.dtype) -> tuple[GmmBlockSizes, ...]:
    """The forward / dx tiles of ``dtype`` (its default first)."""
    return GMM_SPACES[torch.empty((), dtype=dtype).element_size()]


def tgmm_space(dtype: torch.dtype) -> tuple[TgmmBlockSizes, ...]:
    """The weight-gradient tiles of ``dtype`` (its default first)."""
    return TGMM_SPACES[torch.empty((), dtype=dtype).element_size()]


def tune_bucket(m: int) -> int:
    """Autotuning key of a row count: rounded up to a power of two (a batch's
    routed rows vary a little from step to step; that must not re-tune)."""
    return triton.next_power_of_2(max(int(m), 1))


def num_tiles(M: int, E: int, block_m: int) -> int:
    """Upper bound of the M-tiles of ``M`` rows in ``E`` groups (each group's
    last tile may be partial)."""
    return triton.cdiv(M, block_m) + E


def tile_schedule(group_sizes: torch.Tensor, M: int, block_m: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``int32 [num_tiles(M, E, block_m), 3]``: per M-tile its expert (-1 past the
    last tile), first row and end row. Device ops only, no host sync. With
    ``out`` (int32 ``[rows >= num_tiles, 3]``, sized for a smaller ``block_m``)
    it fills ``out``'s first rows and returns ``out``."""
    E = group_sizes.shape[0]
    # Row ranges clamped into [0, M) (negative sizes count as 0, rows past M
    # are dropped): whatever the (unchecked) sizes, every tile addresses rows
    # of x and out only, and the tiles still fit in num_tiles.
    sizes = group_sizes.to(torch.int64).clamp(min=0)
    cum = torch.cumsum(sizes, 0)
    starts, ends = (cum - sizes).clamp(max=M), cum.clamp(max=M)
    gs = ends - starts
    tiles = (gs + block_m - 1) // block_m
    tile_ends = torch.cumsum(tiles, 0)
    n = num_tiles(M, E, block_m)
    i = torch.arange(n, device=gs.device)
    e = torch.searchsorted(tile_ends, i, right=True)
    valid = e < E
    ec = e.clamp(max=E - 1)
    row_start = starts[ec] + (i - (tile_ends[ec] - tiles[ec])) * block_m
    sched = torch.stack([torch.where(valid, e, -1), torch.where(valid, row_start, 0),
                         torch.where(valid, ends[ec], 0)], dim=1).to(torch.int32)
    if out is None:
        return sched
    out[:n].copy_(sched)
    return out


def _refill_schedule(nargs: dict) -> None:
    """Pre-hook of every autotuned gmm config: the schedule for its BLOCK_M."""
    tile_schedule(nargs["group_sizes_ptr"], nargs["x_ptr"].shape[0], nargs["BLOCK_M"], out=nargs["sched_ptr"])


def gmm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor, *, transpose_w: bool = False,
        block_sizes: GmmBlockSizes | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ w[e]`` per group -> ``[M, N]``; ``w [E, K, N]``, or ``[E, N, K]``
    read transposed when ``transpose_w``. Inputs are assumed validated
    (``plum_kernels.moe.ops_torch`` does it).

    ``block_sizes`` fixes the tiles; otherwise they are autotuned on a GPU
    over the dtype's space (keyed by N, K, the transposition, the dtype and
    M rounded up to a power of two) or its default runs."""
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
    space = gmm_space(x.dtype)
    smallest = min(c.block_m for c in ((block_sizes,) if block_sizes else space))
    sched = torch.empty(num_tiles(M, E, smallest), 3, dtype=torch.int32, device=x.device)
    launch(_gmm_kernel, name="moe_gmm", space=space, config=block_sizes, device=x.device,
            grid=lambda m: (num_tiles(M, E, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),),
            args=(x, w, out, sched, group_sizes, N, K, tune_bucket(M),
                  x.stride(0), x.stride(1), s_we, s_wk, s_wn, out.stride(0), out.stride(1)),
            meta=dict(TRANS_W=bool(transpose_w), PRECISION=_precision(x.dtype), CPU_INTERP=cpu_interpreter(x)),
            key=("N", "K", "tune_m", "TRANS_W"), pre_hook=_refill_schedule)
    return out


def tgmm(x: torch.Tensor, dy: torch.Tensor, group_sizes: torch.Tensor, *,
         block_sizes: TgmmBlockSizes | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Weight gradient ``dw[e] = x_e^T dy_e``: ``x [M, K]``, ``dy [M, N]`` ->
    ``[E, K, N]`` in ``x.dtype`` (zeros for empty groups). Tiles as ``gmm``
    (autotuned keyed by K, N, the dtype and M's power-of-two bucket)."""
    M, K = x.shape
    N = dy.shape[1]
    E = group_sizes.shape[0]
    if out is None:
        out = torch.empty(E, K, N, dtype=x.dtype, device=x.device)
    if E == 0 or K == 0 or N == 0:
        return out
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=x.device)
    offsets[1:] = torch.cumsum(group_sizes.clamp(min=0), 0).clamp(max=M)   # row ranges within [0, M)
    launch(_tgmm_kernel, name="moe_tgmm", space=tgmm_space(x.dtype), config=block_sizes, device=x.device,
            grid=lambda m: (triton.cdiv(K, m["BLOCK_K"]) * triton.cdiv(N, m["BLOCK_N"]), E),
            args=(x, dy, out, offsets, K, N, tune_bucket(M),
                  x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), out.stride(0), out.stride(1), out.stride(2)),
            meta=dict(PRECISION=_precision(x.dtype), CPU_INTERP=cpu_interpreter(x)),
            key=("K", "N", "tune_m"))
    return out
