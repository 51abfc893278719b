"""Every Triton attention kernel, at every configuration it ships with (each
default and each entry of the autotuning spaces), compiled ahead of time for
Hopper (sm_90) from a launch of the real launcher, specialised as Triton
specialises it at run time: no register spills, shared memory within the
limit, wgmma tensor-core instructions in the bf16 matrix kernels. And the
decode split grid sized from the blocks per SM the compiled kernel reaches.
Every Pallas kernel lowered for TPU through Mosaic (``interpret=False``).

The builds run in a subprocess without TRITON_INTERPRET (see
``compile_checks.compile_in_clean_process``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from compile_checks import (
    build_all,
    captured_launches,
    check_facts,
    compile_in_clean_process,
    compile_launch,
    lower_for_tpu,
)

import plum_kernels.jax as KJ

# A jagged batch as training sees it: no length a multiple of a block, GQA 4.
LENS = [1000, 2048, 777, 300, 1]
HQ, HKV = 8, 2
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def _history_launches(d: int, dtype: str, deterministic: bool) -> dict:
    """Recorded launches of the forward and backward launchers (default tiles)."""
    import torch

    from plum_kernels.attention.triton_bwd import history_attention_bwd
    from plum_kernels.attention.triton_fwd import history_attention_fwd

    dt = getattr(torch, DTYPES[dtype])
    cu = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()], dtype=torch.int32)
    T = int(cu[-1])
    q, do = torch.randn(T, HQ, d).to(dt), torch.randn(T, HQ, d).to(dt)
    k, v = torch.randn(T, HKV, d).to(dt), torch.randn(T, HKV, d).to(dt)
    out, lse = torch.randn(T, HQ, d).to(dt), torch.randn(HQ, T)
    with captured_launches() as launches:
        history_attention_fwd(q, k, v, cu, causal=True, scale=d ** -0.5, max_seqlen=max(LENS))
        history_attention_bwd(do, q, k, v, out, lse, None, cu, causal=True, scale=d ** -0.5,
                              max_seqlen=max(LENS), deterministic=deterministic)
    return {launch.name: launch for launch in launches}


def _decode_launches(d: int, dtype: str, rows: int) -> dict:
    import torch

    from plum_kernels.attention.triton_decode import beam_decode_attention_fwd

    dt = getattr(torch, DTYPES[dtype])
    B, W, S, s = 2, rows // 4, 1000, 8
    q = torch.randn(B, W, HQ, d).to(dt)
    kp, vp = torch.randn(B, S, HKV, d).to(dt), torch.randn(B, S, HKV, d).to(dt)
    ks, vs = torch.randn(B, W, s, HKV, d).to(dt), torch.randn(B, W, s, HKV, d).to(dt)
    with captured_launches() as launches:
        beam_decode_attention_fwd(q, kp, vp, torch.tensor([S, 17], dtype=torch.int32), ks, vs, 3,
                                  scale=d ** -0.5)
    return {launch.name: launch for launch in launches}


def jobs() -> dict[str, tuple]:
    """name -> (launch source, kernel name, overrides, needs wgmma)."""
    from plum_kernels.attention.triton_common import DKDV_ATOMIC_SPACES, DKDV_SPACES, DQ_SPACES, FWD_SPACES
    from plum_kernels.attention.triton_decode import DECODE_CONFIGS

    out = {}
    for d in (64, 128):
        for dtype, esize in (("bf16", 2), ("fp32", 4)):
            for kind, spaces, kernel, deterministic in (
                    ("fwd", FWD_SPACES, "history_attention_fwd_kernel", True),
                    ("dkdv", DKDV_SPACES, "history_attention_bwd_dkdv_kernel", True),
                    ("dkdv", DKDV_ATOMIC_SPACES, "history_attention_bwd_dkdv_kernel", False),
                    ("dq", DQ_SPACES, "history_attention_bwd_dq_kernel", True)):
                for cfg in spaces[(d, esize)]:
                    tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                                 num_stages=cfg.num_stages)
                    tag = f"{cfg.block_m}x{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}"
                    name = f"{kind}{'' if deterministic else '-atomic'}-d{d}-{dtype}-{tag}"
                    out[name] = (("history", d, dtype, deterministic), kernel, tiles, dtype == "bf16")
        out[f"bwd-preprocess-d{d}"] = (("history", d, "bf16", True), "_bwd_preprocess_kernel", {}, False)
        for (dd, esize, rows), cfg in DECODE_CONFIGS.items():
            if dd == d:
                dtype = "bf16" if esize == 2 else "fp32"
                out[f"decode-prefix-d{d}-{dtype}-r{rows}"] = (("decode", d, dtype, rows), "beam_decode_prefix_kernel",
                                                             {}, dtype == "bf16")
        out[f"decode-merge-d{d}"] = (("decode", d, "bf16", 64), "beam_decode_merge_kernel", {}, False)
    return out


def build(name: str):
    """Compile one job (runs in a worker of ``build_all``)."""
    (source, *spec), kernel, overrides, _ = jobs()[name]
    launches = _history_launches(*spec) if source == "history" else _decode_launches(*spec)
    return compile_launch(launches[kernel], **overrides)


def build_everything() -> dict:
    """Run in the clean subprocess: every job's facts."""
    return build_all(__file__, list(jobs()))


@pytest.fixture(scope="module")
def hopper_builds():
    return compile_in_clean_process(__file__, "build_everything")


@pytest.mark.parametrize("name", sorted(jobs()))
def test_kernel_compiles_for_hopper(hopper_builds, name):
    check_facts(name, hopper_builds[name], tensor_cores=jobs()[name][-1])


def test_default_is_first_of_each_space():
    """The interpreter and ``set_autotune(False)`` run a space's first entry:
    each space is non-empty and its entries distinct."""
    from plum_kernels.attention.triton_common import DKDV_ATOMIC_SPACES, DKDV_SPACES, DQ_SPACES, FWD_SPACES

    for spaces in (FWD_SPACES, DKDV_SPACES, DKDV_ATOMIC_SPACES, DQ_SPACES):
        for key, space in spaces.items():
            assert space and len(set(space)) == len(space), key
            assert (len(space) > 1) == (key[1] == 2), key   # 16-bit inputs are tuned, fp32 runs its default


def test_decode_split_grid_fills_the_compiled_kernels_wave(hopper_builds):
    """The split count of the decode launcher comes from the blocks per SM
    that the compiled kernel reaches (registers and shared memory of the sm_90
    build), not a fixed guess: with one user and one KV head the grid is one
    full wave of 132 SMs x those blocks."""
    from plum_kernels.attention.triton_decode import DECODE_CONFIGS, choose_splits

    for (d, esize, rows), cfg in DECODE_CONFIGS.items():
        facts = hopper_builds[f"decode-prefix-d{d}-{'bf16' if esize == 2 else 'fp32'}-r{rows}"]
        assert facts["blocks_per_sm"] >= 1, (d, esize, rows, facts)
        wave = 132 * facts["blocks_per_sm"]
        splits, split_size = choose_splits(1, 1, 1, wave * cfg.block_n * 4, cfg.block_n, wave)
        assert (splits, split_size) == (wave, cfg.block_n * 4)


def test_decode_launcher_reads_the_wave_off_the_compiled_kernel(monkeypatch):
    """On CUDA the launcher compiles the prefix kernel once (``warmup``) and
    sizes the split grid from its registers and shared memory: here a fake
    compiled kernel that fits 1 block per SM (and 2 when it needs half the
    registers) on a fake 132-SM device."""
    import types

    import torch

    from plum_kernels.attention import triton_decode as TD
    from plum_kernels.hopper import blocks_per_sm

    cfg = TD.DECODE_CONFIGS[(128, 2, 128)]
    for regs, want in ((200, 1), (96, 2)):
        assert blocks_per_sm(regs, 65536, cfg.num_warps) == want
        fake = types.SimpleNamespace(n_regs=regs, metadata=types.SimpleNamespace(shared=65536))
        monkeypatch.setattr(TD.beam_decode_prefix_kernel, "warmup", lambda *a, **k: fake, raising=False)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: types.SimpleNamespace(
            multi_processor_count=132))
        TD._waves.clear()
        assert TD.prefix_wave(torch.device("cuda", 0), cfg, (), {}) == 132 * want


# ----------------------------------------------------------------------------- TPU lowering (Mosaic)

S_ = jax.ShapeDtypeStruct


@pytest.mark.parametrize("dtype, d", [(jnp.bfloat16, 128), (jnp.float32, 64)])
def test_history_attention_pallas_lowers_for_tpu(dtype, d):
    """Forward, dK/dV and dQ kernels (shipped BlockSizes()) through Mosaic."""
    def fwd_bwd(q, k, v, cu, do):
        out, vjp = jax.vjp(lambda q, k, v: KJ.history_attention(q, k, v, cu, 300, impl="pallas", interpret=False),
                           q, k, v)
        return out, vjp(do)

    text = lower_for_tpu(fwd_bwd, S_((300, 4, d), dtype), S_((300, 2, d), dtype), S_((300, 2, d), dtype),
                         S_((5,), jnp.int32), S_((300, 4, d), dtype))
    assert text.count("tpu_custom_call") == 3


@pytest.mark.parametrize("dtype, d", [(jnp.bfloat16, 128), (jnp.float32, 64)])
def test_beam_decode_pallas_lowers_for_tpu(dtype, d):
    """Both prefix layouts: in place (D = 128) and heads-first (D = 64)."""
    def f(q, kp, vp, plens, ks, vs):
        return KJ.beam_decode_attention(q, kp, vp, plens, ks, vs, 2, impl="pallas", interpret=False)

    lower_for_tpu(f, S_((2, 64, 16, d), dtype), S_((2, 1024, 4, d), dtype), S_((2, 1024, 4, d), dtype),
                  S_((2,), jnp.int32), S_((2, 64, 4, 4, d), dtype), S_((2, 64, 4, 4, d), dtype))
