"""The four kernel paths work in CI: the Triton interpreter, Triton AOT for
Hopper, Pallas TPU interpret mode and Pallas TPU lowering.

These tiny kernels exist only to prove the toolchain; remove them once real
kernels have tests of their own on all four paths.
"""
import functools

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from compile_checks import HOPPER_SMEM_LIMIT, compile_for_hopper, compile_in_clean_process, lower_for_tpu


@triton.jit
def _scaled_add_kernel(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, alpha * x + y, mask=mask)


@triton.jit
def _tiny_matmul_kernel(a_ptr, b_ptr, c_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    a = tl.load(a_ptr + rm[:, None] * BK + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * BN + rn[None, :])
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], tl.dot(a, b))


def test_triton_interpreter_runs_kernel():
    n = 1000  # not a multiple of the block
    x, y = torch.randn(n), torch.randn(n)
    out = torch.full((n,), float("nan"))
    _scaled_add_kernel[(triton.cdiv(n, 256),)](x, y, out, n, 0.5, BLOCK=256)
    torch.testing.assert_close(out.double(), 0.5 * x.double() + y.double(), rtol=1e-6, atol=1e-6)


def _hopper_builds() -> dict:
    """Runs in a clean process (``compile_in_clean_process``)."""
    add = compile_for_hopper(_scaled_add_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32",
                                                   "n": "i32", "alpha": "fp32"}, {"BLOCK": 1024})
    mm = compile_for_hopper(_tiny_matmul_kernel, {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32"},
                            {"BM": 128, "BN": 128, "BK": 64}, num_warps=4)
    return {name: {"shared": b.shared, "wgmma": b.uses_wgmma, "sm90": ".target sm_90" in b.ptx}
            for name, b in (("add", add), ("matmul", mm))}


def test_triton_aot_for_hopper():
    builds = compile_in_clean_process("test_toolchain", "_hopper_builds")
    for b in builds.values():
        assert b["sm90"] and b["shared"] <= HOPPER_SMEM_LIMIT
    assert builds["matmul"]["wgmma"] and builds["matmul"]["shared"] > 0
    assert not builds["add"]["wgmma"]


def _pallas_scaled_add(x, y, *, interpret, block=(8, 128)):
    import jax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    def kernel(x_ref, y_ref, o_ref):
        o_ref[...] = 0.5 * x_ref[...] + y_ref[...]

    spec = pl.BlockSpec(block, lambda i: (i, 0), memory_space=pltpu.VMEM)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(x.shape[0] // block[0],),
        in_specs=[spec, spec], out_specs=spec,
        interpret=pltpu.InterpretParams() if interpret else False)(x, y)


def test_pallas_tpu_interpret_mode():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((24, 128), dtype=np.float32), rng.standard_normal((24, 128), dtype=np.float32)
    out = np.asarray(_pallas_scaled_add(jnp.asarray(x), jnp.asarray(y), interpret=True))
    np.testing.assert_allclose(out, 0.5 * x.astype(np.float64) + y, rtol=1e-6, atol=1e-6)


def test_pallas_lowers_for_tpu():
    import jax
    import jax.numpy as jnp

    spec = jax.ShapeDtypeStruct((24, 128), jnp.float32)
    lower_for_tpu(functools.partial(_pallas_scaled_add, interpret=False), spec, spec)
    # Mosaic's rules are enforced: a block that is not (8, 128)-tiled is refused.
    bad = jax.ShapeDtypeStruct((24, 200), jnp.float32)
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        lower_for_tpu(functools.partial(_pallas_scaled_add, interpret=False, block=(3, 100)), bad, bad)
