"""Pieces shared by the Triton attention kernels: block-size configs and the
flattened (sequence, block) schedule of the varlen kernels.

Schedule. A jagged batch with lengths from 1 to 64k would waste most programs of
a ``(max_seqlen / BLOCK, B, H)`` grid. Instead the launcher builds, on the
device and without a host sync, ``blk_cu[b] = sum_{b' < b} cdiv(len_b', BLOCK)``
(int32 ``[B+1]``) and launches ``cdiv(T, BLOCK) + B`` programs per head (an upper
bound of ``blk_cu[B]``); program ``pid`` finds its sequence by binary search
in ``blk_cu`` and its block as ``pid - blk_cu[b]``, and programs past
``blk_cu[B]`` (at most B of them) return at once.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_block(name: str, value: int, lo: int = 16) -> None:
    if value < lo or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {lo}, got {value}")


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    """Forward (and dQ) tiling: BLOCK_M query rows x BLOCK_N keys per step."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        _check_block("block_m", self.block_m, 64)
        _check_block("block_n", self.block_n)
        if self.num_warps not in (4, 8):
            raise ValueError(f"num_warps must be 4 or 8, got {self.num_warps}")


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    """Backward tiling. dK/dV kernel: BLOCK_N1 keys (rows of its products) x
    BLOCK_M1 queries per step; dQ kernel: BLOCK_M2 queries x BLOCK_N2 keys."""

    block_m1: int
    block_n1: int
    block_m2: int
    block_n2: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        _check_block("block_m1", self.block_m1)
        _check_block("block_n1", self.block_n1, 64)
        _check_block("block_m2", self.block_m2, 64)
        _check_block("block_n2", self.block_n2)
        if self.num_warps not in (4, 8):
            raise ValueError(f"num_warps must be 4 or 8, got {self.num_warps}")


# Shipped configurations, keyed by (head_dim, element size in bytes). Every one
# is compiled for sm_90 in tests/test_attention_aot.py (shared memory within the
# H100 limit, wgmma in the PTX for bf16/fp16). Chosen from the FlashAttention-2
# Triton defaults for H100 (128 x 64 forward tiles, 3 stages); not yet tuned on
# a GPU (none was available for this work).
FWD_CONFIGS: dict[tuple[int, int], FwdConfig] = {
    (64, 2): FwdConfig(128, 64, num_warps=4, num_stages=3),
    (128, 2): FwdConfig(128, 64, num_warps=8, num_stages=3),
    (64, 4): FwdConfig(64, 64, num_warps=4, num_stages=2),
    (128, 4): FwdConfig(64, 32, num_warps=4, num_stages=2),
}
BWD_CONFIGS: dict[tuple[int, int], BwdConfig] = {
    (64, 2): BwdConfig(64, 128, 128, 64, num_warps=8, num_stages=2),
    (128, 2): BwdConfig(32, 128, 128, 32, num_warps=8, num_stages=2),
    (64, 4): BwdConfig(32, 64, 64, 32, num_warps=4, num_stages=2),
    (128, 4): BwdConfig(32, 64, 64, 32, num_warps=4, num_stages=1),
}


def config_key(q: torch.Tensor) -> tuple[int, int]:
    return (q.shape[-1], q.element_size())


def block_schedule(cu_seqlens: torch.Tensor, total_tokens: int, block: int) -> tuple[torch.Tensor, int]:
    """``(blk_cu int32 [B+1], number of programs)`` of the flattened schedule,
    computed on the device without a host sync."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    blocks = torch.div(lens + (block - 1), block, rounding_mode="floor")
    blk_cu = torch.zeros_like(cu_seqlens)
    blk_cu[1:] = torch.cumsum(blocks, 0)
    num_seqs = cu_seqlens.shape[0] - 1
    return blk_cu, triton.cdiv(total_tokens, block) + num_seqs


@triton.jit
def find_block(blk_cu_ptr, pid, num_seqs):
    """Sequence ``b`` with ``blk_cu[b] <= pid < blk_cu[b+1]`` and the block
    index inside it; ``b = -1`` when ``pid >= blk_cu[num_seqs]``."""
    total = tl.load(blk_cu_ptr + num_seqs)
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(blk_cu_ptr + mid) <= pid:
            lo = mid
        else:
            hi = mid - 1
    seq = tl.where(pid < total, lo, -1)
    return seq, pid - tl.load(blk_cu_ptr + lo)


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
