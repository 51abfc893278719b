"""plum_kernels.hopper: sm_90 occupancy from a kernel's registers, shared memory and warps, against
occupancy worked out by hand from the CUDA programming guide's limits for compute capability 9.0."""
from __future__ import annotations

import pytest

from plum_kernels.hopper import SM90, blocks_per_sm, compiled_blocks_per_sm


@pytest.mark.parametrize("registers, shared, warps, want", [
    (32, 0, 4, 16),          # warps: 64 / 4 = 16 blocks (registers allow 16, shared 228 / 1 KiB reserved)
    (128, 0, 4, 4),          # registers: 65536 / (128 * 32 * 4) = 4
    (168, 0, 8, 1),          # 168 * 32 = 5376 per warp -> 12 warps of registers -> one block of 8
    (255, 0, 4, 2),          # 255 * 32 = 8160 -> 8192 per warp (units of 256): 8 warps -> 2 blocks
    (64, 100 * 1024, 4, 2),  # shared: 228 KiB / (100 KiB + 1 KiB reserved) = 2
    (64, 227 * 1024, 4, 1),  # the most one block may ask for
    (1, 0, 1, 32),           # the block limit per SM
])
def test_blocks_per_sm(registers, shared, warps, want):
    assert blocks_per_sm(registers, shared, warps) == want


def test_blocks_that_do_not_fit():
    assert blocks_per_sm(256, 0, 4) == 0  # above 255 registers a thread
    assert blocks_per_sm(32, SM90.shared_per_block + 1, 4) == 0
    assert blocks_per_sm(255, 0, 32) == 0  # 32 warps of 8192 registers exceed the 65536 of an SM


@pytest.mark.parametrize("bad", [dict(registers=-1, shared=0, num_warps=4), dict(registers=32, shared=-1, num_warps=4),
                                 dict(registers=32, shared=0, num_warps=0)])
def test_bad_resources_are_refused(bad):
    with pytest.raises(ValueError, match="num_warps >= 1"):
        blocks_per_sm(**bad)


def test_compiled_blocks_per_sm_reads_the_kernel_and_is_at_least_one():
    class Meta:
        shared = 0

    class Kernel:
        n_regs, metadata, loaded = 128, Meta(), False

        def _init_handles(self):
            self.loaded = True

    k = Kernel()
    assert compiled_blocks_per_sm(k, 4) == 4 and k.loaded
    k.n_regs = 255
    assert compiled_blocks_per_sm(k, 32) == 1  # nothing fits on paper: one block still runs
