"""Resource limits of one Hopper (sm_90) multiprocessor and the occupancy they allow.

The launchers use :func:`blocks_per_sm` with the registers and shared memory
of the kernel Triton actually compiled (``compiled_blocks_per_sm``) to size
grids that fill the GPU in whole waves; the ahead-of-time tests use it with
the facts of the sm_90 build compiled on a CPU machine.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SMLimits:
    """Per-multiprocessor limits (CUDA programming guide, compute capability 9.0)."""

    registers: int = 65536            # 32-bit registers per SM
    register_unit: int = 256          # registers are allocated per warp in units of 256
    max_registers_per_thread: int = 255
    max_warps: int = 64
    max_blocks: int = 32
    shared: int = 228 * 1024          # shared memory per SM (bytes)
    shared_per_block: int = 227 * 1024  # the most one block may ask for
    shared_reserved: int = 1024       # the runtime reserves 1 KiB per block
    shared_unit: int = 128            # allocation granularity (bytes)


SM90 = SMLimits()


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def blocks_per_sm(registers: int, shared: int, num_warps: int, limits: SMLimits = SM90) -> int:
    """Blocks of one kernel that fit on one multiprocessor at once.

    Args:
        registers: registers per thread of the compiled kernel.
        shared: dynamic shared memory per block, bytes.
        num_warps: warps per block.

    Returns 0 when one block does not fit (more shared memory than a block
    may have, or more registers than a thread may have).
    """
    if num_warps < 1 or registers < 0 or shared < 0:
        raise ValueError(f"need num_warps >= 1 and non-negative resources, got {registers=}, {shared=}, {num_warps=}")
    if registers > limits.max_registers_per_thread or shared > limits.shared_per_block:
        return 0
    by_warps = limits.max_warps // num_warps
    per_warp = _round_up(max(registers, 1) * 32, limits.register_unit)
    by_registers = (limits.registers // per_warp) // num_warps
    per_block = _round_up(shared + limits.shared_reserved, limits.shared_unit)
    by_shared = limits.shared // per_block
    return max(0, min(limits.max_blocks, by_warps, by_registers, by_shared))


def compiled_blocks_per_sm(kernel, num_warps: int) -> int:
    """:func:`blocks_per_sm` of a ``triton.compiler.CompiledKernel`` loaded on a GPU
    (its ``n_regs`` and ``metadata.shared``); at least 1."""
    init = getattr(kernel, "_init_handles", None)
    if init is not None:
        init()
    regs = int(getattr(kernel, "n_regs", 0) or 0)
    shared = int(getattr(kernel.metadata, "shared", 0) or 0)
    return max(1, blocks_per_sm(regs, shared, num_warps))
