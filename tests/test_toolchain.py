"""The tools behind the kernel tests work and catch what they are for: the
Triton interpreter runs a kernel; the ahead-of-time Hopper build of a recorded
launch (``compile_checks``) specialises like Triton's run time, finds wgmma
in a matrix kernel and register spills in a kernel that spills; Pallas TPU
interpret mode runs a kernel and the TPU lowering refuses a bad block shape.
"""
import functools

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from compile_checks import check_facts, compile_in_clean_process, lower_for_tpu


@triton.jit
def _scaled_add_kernel(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, alpha * x + y, mask=mask)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One ``[BM, BN]`` tile of ``a [BM, K] @ b [K, BN]``."""
    rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(b_ptr + (k0 + rk)[:, None] * BN + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


def test_triton_interpreter_runs_kernel():
    n = 1000  # not a multiple of the block
    x, y = torch.randn(n), torch.randn(n)
    out = torch.full((n,), float("nan"))
    _scaled_add_kernel[(triton.cdiv(n, 256),)](x, y, out, n, 0.5, BLOCK=256)
    torch.testing.assert_close(out.double(), 0.5 * x.double() + y.double(), rtol=1e-6, atol=1e-6)


def _hopper_builds() -> dict:
    """Runs in a clean process (``compile_in_clean_process``): launches recorded
    from CPU tensors, compiled for sm_90."""
    from compile_checks import captured_launches, compile_launch

    x = torch.randn(4096)
    a, b = torch.randn(128, 256).bfloat16(), torch.randn(256, 128).bfloat16()
    with captured_launches() as launches:
        for n in (1000, 1024):   # n % 16 == 0 is specialised (divisibility) at run time, as on a GPU
            _scaled_add_kernel[(4,)](x, x, x, n, 0.5, BLOCK=1024)
        _matmul_kernel[(1,)](a, b, torch.empty(128, 128), 256, BM=128, BN=128, BK=64, num_warps=4)
        _matmul_kernel[(1,)](a.float(), b.float(), torch.empty(128, 128), 256, BM=128, BN=128, BK=64,
                             num_warps=4)
    builds = {"add_n1000": compile_launch(launches[0]), "add_n1024": compile_launch(launches[1]),
              "matmul_bf16": compile_launch(launches[2]),
              # 256 x 256 float32 accumulator over 4 warps: 512 values a thread, more than 255 registers
              "matmul_fp32_spills": compile_launch(launches[3], BM=256, BN=256, BK=32)}
    return {name: b.facts() for name, b in builds.items()}


def test_aot_build_of_a_recorded_launch():
    builds = compile_in_clean_process(__file__, "_hopper_builds")
    assert builds["add_n1000"]["divisible"] == ["x_ptr", "y_ptr", "out_ptr"]
    assert builds["add_n1024"]["divisible"] == ["x_ptr", "y_ptr", "out_ptr", "n"]
    check_facts("add_n1000", builds["add_n1000"], tensor_cores=False)
    check_facts("matmul_bf16", builds["matmul_bf16"], tensor_cores=True)
    assert not builds["add_n1000"]["wgmma"]
    assert builds["matmul_bf16"]["shared"] > 0
    assert builds["matmul_fp32_spills"]["stack"] > 0
    with pytest.raises(AssertionError, match="spills"):
        check_facts("matmul_fp32_spills", builds["matmul_fp32_spills"], tensor_cores=False)


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
