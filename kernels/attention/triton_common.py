"""Pieces shared by the Triton attention kernels: tile configurations and their
autotuning spaces, the longest-first (sequence, block) schedule of the varlen
kernels, the launch helper and ``mma``.

Schedule. A jagged batch with lengths from 1 to 64k would waste most programs of
a ``(max_seqlen / BLOCK, B, H)`` grid. Instead the launcher sorts the
sequences by length, longest first, and builds on the device, without a host
sync, ``seq_order`` (int32 ``[B]``: sequence of each rank) and ``blk_cu[r] =
sum_{r' < r} cdiv(len(seq_order[r']), BLOCK)`` (int32 ``[B+1]``); it launches
``cdiv(T, BLOCK) + B`` programs per head (an upper bound of ``blk_cu[B]``).
Program ``pid`` finds its rank by binary search in ``blk_cu`` and its block
inside the sequence; programs past ``blk_cu[B]`` (at most B of them) return
at once. Programs start roughly in ``pid`` order, so the longest sequences,
and inside a sequence the most expensive blocks (``REVERSE``: the last query
blocks of a causal forward / dQ pass; the first key blocks of the dK/dV pass),
start first and the short ones fill the tail of the last wave.

Tiles. Each kernel has a default ``TileConfig`` per (head dim, element size)
and, for 16-bit inputs, an autotuning space (``plum_kernels._autotune``). Every
entry is compiled for sm_90 by the test suite from a recorded launch
(``tests/kernels/attention/test_aot.py``): no register spills, shared memory within
the limit, wgmma for bf16/fp16. The spaces hold only configurations that
pass; on a GPU the autotuner picks among them, and the device suite
(``benchmarks/device_suite.sh``) records its choices.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from plum_kernels._autotune import launch as tuned_launch

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_block(name: str, value: int, lo: int = 16) -> None:
    if not isinstance(value, int) or value < lo or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {lo}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One program's tiles: ``block_m`` query rows by ``block_n`` keys.

    Forward and dQ programs own ``block_m`` query rows and step over keys
    ``block_n`` at a time; a dK/dV program owns ``block_n`` keys and steps
    over queries ``block_m`` at a time. The rows a program owns are the rows
    of its products, so for 16-bit inputs they are >= 64, what Hopper's wgmma
    takes (checked on the tables below)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        _check_block("block_m", self.block_m)
        _check_block("block_n", self.block_n)
        if self.num_warps not in (4, 8):
            raise ValueError(f"num_warps must be 4 or 8, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 5:
            raise ValueError(f"num_stages must be an int in [1, 5], got {self.num_stages!r}")

    def meta(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}


T = TileConfig
# Spaces, keyed by (head_dim, element size in bytes); the first entry is the
# default. 16-bit inputs: FlashAttention-2's Triton tiles for Hopper (128 x 64
# forward tiles, 2-3 stages) and their neighbours, kept where the sm_90 build
# of the run-time specialisation does not spill (registers <= 252, stack 0).
# The dK/dV pass holds K, V, dK and dV of its keys in registers: at D = 128
# only 16-query steps with 8 warps fit without spilling. fp32 runs one
# configuration, small: each of its dots is three tf32 products (``tf32x3``)
# whose split operands take three times the registers, and it runs on
# mma.sync rather than wgmma.
FWD_SPACES: dict[tuple[int, int], tuple[TileConfig, ...]] = {
    (64, 2): (T(128, 64, 4, 3), T(128, 64, 8, 3), T(128, 128, 8, 3), T(64, 64, 4, 3), T(128, 32, 4, 3)),
    (128, 2): (T(128, 64, 8, 3), T(128, 64, 8, 2), T(64, 64, 4, 3), T(128, 32, 8, 3), T(64, 128, 8, 2)),
    (64, 4): (T(64, 32, 4, 2),),
    (128, 4): (T(16, 32, 4, 2),),
}
DKDV_SPACES: dict[tuple[int, int], tuple[TileConfig, ...]] = {
    (64, 2): (T(64, 128, 8, 2), T(32, 128, 8, 2), T(32, 64, 4, 2), T(64, 64, 8, 2), T(16, 128, 8, 2)),
    (128, 2): (T(16, 128, 8, 2), T(16, 64, 8, 2), T(16, 128, 8, 3), T(16, 64, 8, 3)),
    (64, 4): (T(16, 32, 4, 2),),
    (128, 4): (T(16, 16, 4, 2),),
}
# The dK/dV pass with dQ by atomics (``deterministic=False``) holds one more
# [BLOCK_M, D] float32 block.
DKDV_ATOMIC_SPACES: dict[tuple[int, int], tuple[TileConfig, ...]] = {
    (64, 2): (T(64, 128, 8, 2), T(32, 128, 8, 2), T(32, 64, 8, 2), T(64, 64, 8, 2), T(16, 128, 8, 2)),
    (128, 2): (T(16, 128, 8, 2), T(16, 64, 8, 2)),
    (64, 4): (T(16, 32, 4, 2),),
    (128, 4): (T(16, 16, 8, 2),),
}
DQ_SPACES: dict[tuple[int, int], tuple[TileConfig, ...]] = {
    (64, 2): (T(128, 64, 8, 2), T(128, 32, 4, 3), T(64, 64, 4, 2), T(128, 64, 8, 3), T(64, 32, 4, 3)),
    (128, 2): (T(128, 32, 8, 2), T(64, 64, 4, 2), T(128, 64, 8, 2), T(64, 32, 4, 3), T(128, 16, 8, 3)),
    (64, 4): (T(64, 16, 4, 2),),
    (128, 4): (T(16, 16, 4, 2),),
}
del T


def _check_tables() -> None:
    for name, spaces, rows in (("FWD", FWD_SPACES, "block_m"), ("DKDV", DKDV_SPACES, "block_n"),
                               ("DKDV_ATOMIC", DKDV_ATOMIC_SPACES, "block_n"), ("DQ", DQ_SPACES, "block_m")):
        for key, space in spaces.items():
            for cfg in space:
                if key[1] == 2 and getattr(cfg, rows) < 64:
                    raise ValueError(f"{name}_SPACES[{key}]: {rows} must be >= 64 (wgmma rows), got {cfg}")


_check_tables()


def config_key(q: torch.Tensor) -> tuple[int, int]:
    return (q.shape[-1], q.element_size())


# ----------------------------------------------------------------------------- schedule


def schedule_buffers(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised ``(blk_cu int32 [B+1], seq_order int32 [B])`` for :func:`fill_schedule`."""
    B = cu_seqlens.shape[0] - 1
    return (torch.empty(B + 1, dtype=torch.int32, device=cu_seqlens.device),
            torch.empty(B, dtype=torch.int32, device=cu_seqlens.device))


def fill_schedule(cu_seqlens: torch.Tensor, block: int, blk_cu: torch.Tensor, seq_order: torch.Tensor,
                  total_tokens: int | None = None) -> None:
    """Write the longest-first schedule of ``block``-sized blocks into
    ``blk_cu`` / ``seq_order`` (device ops only, no host sync). With
    ``total_tokens`` the lengths are those :func:`seq_bounds` gives the
    kernels (``cu_seqlens`` clamped into ``[0, T]``, never negative), so that
    no block index is negative whatever ``cu_seqlens`` holds."""
    if total_tokens is not None:
        cu = cu_seqlens.clamp(0, total_tokens)
        lens = (cu[1:] - cu[:-1]).clamp(min=0)
    else:
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
    lens, order = torch.sort(lens, descending=True, stable=True)
    blk_cu[:1].zero_()
    torch.cumsum(torch.div(lens + (block - 1), block, rounding_mode="floor"), 0, dtype=torch.int32,
                 out=blk_cu[1:])
    seq_order.copy_(order)


def num_programs(total_tokens: int, num_seqs: int, block: int) -> int:
    return triton.cdiv(total_tokens, block) + num_seqs


@triton.jit
def seq_bounds(cu_seqlens, seq, total_tokens):
    """``(first token, length)`` of sequence ``seq``, clamped so that its
    tokens lie in ``[0, total_tokens)`` whatever ``cu_seqlens`` holds (with
    checked ``cu_seqlens`` the clamps change nothing): the kernels address
    q, k, v, their gradients and the log-sum-exp only through these."""
    start = tl.minimum(tl.maximum(tl.load(cu_seqlens + seq), 0), total_tokens)
    end = tl.minimum(tl.maximum(tl.load(cu_seqlens + seq + 1), start), total_tokens)
    return start, end - start


@triton.jit
def find_block(blk_cu_ptr, seq_order_ptr, pid, num_seqs, REVERSE: tl.constexpr):
    """Sequence ``seq`` and block index of program ``pid`` in the longest-first
    schedule (``seq = -1`` past the last block). ``REVERSE`` numbers a
    sequence's blocks from its end (its first program takes its last block)."""
    total = tl.load(blk_cu_ptr + num_seqs)
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(blk_cu_ptr + mid) <= pid:
            lo = mid
        else:
            hi = mid - 1
    if REVERSE:
        blk = tl.load(blk_cu_ptr + lo + 1) - 1 - pid
    else:
        blk = pid - tl.load(blk_cu_ptr + lo)
    seq = tl.where(pid < total, tl.load(seq_order_ptr + lo), -1)
    return seq, blk


# ----------------------------------------------------------------------------- launch


def launch(kernel, *, name: str, space: Sequence[TileConfig], config: TileConfig | None, schedule_on: str,
           cu_seqlens: torch.Tensor, grid: Callable[[int], tuple], args: tuple, meta: dict,
           tune_key: Sequence[str], reset_to_zero: Sequence[str] = ()) -> None:
    """Launch a varlen kernel (``plum_kernels._autotune.launch``) whose programs
    are counted in ``schedule_on`` blocks (``"BLOCK_M"`` or ``"BLOCK_N"``):
    the longest-first schedule (the kernel's ``blk_cu`` / ``seq_order``
    arguments) is refilled for the block of each configuration that runs, and
    ``grid(block)`` gives the programs."""
    def refill(nargs: dict) -> None:
        fill_schedule(nargs["cu_seqlens"], nargs[schedule_on], nargs["blk_cu"], nargs["seq_order"],
                      nargs["total_tokens"])

    tuned_launch(kernel, name=name, space=space, config=config, device=cu_seqlens.device,
                 grid=lambda m: grid(m[schedule_on]), args=args, meta=meta, key=tune_key, pre_hook=refill,
                 reset_to_zero=reset_to_zero)


def tune_bucket(max_seqlen: int) -> int:
    """Autotuning key of a batch: its longest sequence rounded up to a power of two."""
    return triton.next_power_of_2(max(int(max_seqlen), 1))


@triton.jit
def mma(a, b, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot(a, b)`` with fp32 accumulation. ``UPCAST`` (set by the
    launchers only for bf16 CPU tensors, i.e. under the Triton interpreter,
    whose ``dot`` multiplies the raw uint16 storage of bf16 as integers in
    triton 3.9) widens the operands to fp32 first: the same products the tensor
    cores form from bf16 inputs. Compiled GPU kernels always have it False."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=INPUT_PRECISION)


def needs_upcast(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.bfloat16
