"""Every MoE Triton kernel at every configuration it ships with, compiled ahead of time for Hopper (sm_90)
from a recorded launch of its launcher (``moe_aot``, in a clean child process): no register spills,
shared memory within the limit, ``wgmma`` in the 16-bit matrix kernels, and the grouped GEMMs pipelined
at the run-time alignment; and every Pallas kernel lowered for TPU through Mosaic (``interpret=False``)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import moe_aot
import pytest
from compile_checks import check_facts, compile_in_clean_process, lower_for_tpu

from plum_kernels.moe import pallas_gmm as P
from plum_kernels.moe import triton_gmm as TG


@pytest.fixture(scope="module")
def hopper_builds():
    """Every shipped configuration compiled for sm_90 by ``moe_aot.build_everything``
    in a clean child process (see ``compile_in_clean_process``)."""
    return compile_in_clean_process("moe_aot", "build_everything")


@pytest.mark.parametrize("name", sorted(moe_aot.jobs()))
def test_kernel_compiles_for_hopper(hopper_builds, name):
    check_facts(name, hopper_builds[name], tensor_cores=moe_aot.jobs()[name][-1])


def test_every_shipped_gemm_config_is_built():
    jobs = moe_aot.jobs()
    for esize, dtype in ((2, "bf16"), (4, "fp32")):
        for kinds, space in ((("fwd", "dx"), TG.GMM_SPACES[esize]), (("dw",), TG.TGMM_SPACES[esize])):
            for cfg in space:
                want = dict(cfg.meta(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                for kind in kinds:
                    assert sum(j[0] == ("gemm", dtype) and j[1] == kind and j[2] == want
                               for j in jobs.values()) == 1, (kind, dtype, cfg)


def test_grouped_gemm_is_pipelined_at_run_time_alignment(hopper_builds):
    """With the run-time specialisation (16-byte-aligned pointers, strides and
    sizes divisible by 16) the 16-bit GEMMs are multi-buffered: shared memory
    holds ``num_stages`` copies of the A and B tiles (minus at most one)."""
    for name, (source, kind, tiles, _) in moe_aot.jobs().items():
        if source == ("gemm", "bf16"):
            if kind == "dw":   # x^T tile [BLOCK_K, BLOCK_M], dy tile [BLOCK_M, BLOCK_N]
                elems = tiles["BLOCK_M"] * (tiles["BLOCK_K"] + tiles["BLOCK_N"])
            else:              # x tile [BLOCK_M, BLOCK_K], w tile [BLOCK_K, BLOCK_N]
                elems = tiles["BLOCK_K"] * (tiles["BLOCK_M"] + tiles["BLOCK_N"])
            assert hopper_builds[name]["shared"] >= (tiles["num_stages"] - 1) * elems * 2, (name, hopper_builds[name])


# ----------------------------------------------------------------------------- TPU lowering (Mosaic)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_kernels_lower_for_tpu(dtype):
    """Shipped tiles (128, 128, 128), odd shapes (padding), both weight layouts."""
    sd = jax.ShapeDtypeStruct
    gs = sd((8,), jnp.int32)
    lower_for_tpu(functools.partial(P.gmm, interpret=False), sd((300, 200), dtype), sd((8, 200, 300), dtype), gs)
    lower_for_tpu(functools.partial(P.gmm, transpose_rhs=True, interpret=False),
                  sd((300, 200), dtype), sd((8, 300, 200), dtype), gs)
    lower_for_tpu(functools.partial(P.tgmm, interpret=False), sd((300, 200), dtype), sd((300, 250), dtype), gs)
