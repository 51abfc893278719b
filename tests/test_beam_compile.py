"""Proof that the beam kernels are real GPU/TPU kernels: every Triton kernel
compiled ahead of time for Hopper (sm_90) at each shipped configuration
(shared memory within the H100 limit; no matrix products, so no wgmma
requirement), every Pallas kernel lowered for TPU with interpret=False; and
the benchmark's --smoke path."""
from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest

from compile_checks import compile_in_clean_process, lower_for_tpu

_EXPAND_SIG = {"logits_ptr": "*bf16", "stride_lb": "i64", "stride_lw": "i64", "scores_ptr": "*fp32",
               "nodes_ptr": "*i64", "child_ptr_ptr": "*i64", "child_token_ptr": "*i16", "edge_word_ptr": "*i32",
               "keys_ptr": "*i64", "W_in": "i32", "V": "i32", "vocab_offset": "i32", "num_internal": "i64",
               "shift": "i32", "mask": "i32"}
_SELECT_SIG = {"keys_ptr": "*i64", "nodes_ptr": "*i64", "child_ptr_ptr": "*i64", "child_token_ptr": "*i16",
               "edge_word_ptr": "*i32", "out_score_ptr": "*fp32", "out_node_ptr": "*i64", "out_parent_ptr": "*i64",
               "out_token_ptr": "*i64", "W_in": "i32", "W": "i32", "num_internal": "i64", "shift": "i32",
               "mask": "i32"}


def jobs() -> dict:
    """name -> (kernel, signature, constexprs, num_warps) for every shipped
    configuration: both kernels at every per-beam list length KP; logits
    dtype, normalization and token width vary across them."""
    from kernels.beam import triton as tk
    blocks = tk.DEFAULT_BLOCKS
    out = {}
    for kp in tk.SHIPPED_KP:
        log = kp.bit_length() - 1
        warps = blocks.warps_for(kp)
        for dtype, children in (("*bf16", False), ("*bf16", True), ("*fp16", False), ("*fp32", False)):
            if dtype != "*bf16" and kp not in (16, 512):
                continue
            tok = "*i32" if kp == 64 else "*i16"   # codebooks above 32768 store int32 tokens
            sig = dict(_EXPAND_SIG, logits_ptr=dtype, child_token_ptr=tok)
            out[f"expand-kp{kp}-{dtype[1:]}-{'children' if children else 'codebook'}"] = (
                tk._expand_kernel, sig, {"KP": kp, "LOG_KP": log, "BLOCK_V": blocks.block_v,
                                         "CHILDREN_NORM": children}, warps)
        g = blocks.group_for(kp)
        out[f"select-kp{kp}"] = (tk._select_kernel, _SELECT_SIG,
                                 {"KP": kp, "LOG_KP": log, "GROUP": g, "LOG_GROUP": g.bit_length() - 1}, warps)
    return out


def _compile_all() -> dict:
    """Run in the subprocess (see test_attention_aot.py: a process that ran
    interpreted kernels cannot compile for real)."""
    from compile_checks import compile_for_hopper

    report = {}
    for name, (fn, sig, consts, warps) in jobs().items():
        build = compile_for_hopper(fn, sig, consts, num_warps=warps, num_stages=1)
        report[name] = {"shared": build.shared, "sm90": ".target sm_90" in build.ptx}
    return report


@pytest.fixture(scope="module")
def hopper_builds():
    return compile_in_clean_process("test_beam_compile", "_compile_all")


def test_every_shipped_kp_is_compiled():
    from kernels.beam import triton as tk
    names = jobs()
    assert {int(n.split("-")[1][2:]) for n in names} == set(tk.SHIPPED_KP)
    assert tk.DEFAULT_BLOCKS.kp(tk.MAX_BEAM) == max(tk.SHIPPED_KP) and tk.DEFAULT_BLOCKS.kp(1) == min(tk.SHIPPED_KP)


@pytest.mark.parametrize("name", sorted(jobs()))
def test_triton_kernel_compiles_for_hopper(hopper_builds, name):
    from compile_checks import HOPPER_SMEM_LIMIT

    build = hopper_builds[name]
    assert build["sm90"]
    assert build["shared"] <= HOPPER_SMEM_LIMIT, f"{name}: {build['shared']} B of shared memory"


@pytest.mark.parametrize("W_in,V,C,W,normalize", [(16, 256, 16, 16, "codebook"), (70, 2048, 7, 70, "children"),
                                                  (256, 2048, 64, 256, "codebook")])
def test_pallas_kernel_lowers_for_tpu(W_in, V, C, W, normalize):
    import jax
    import jax.numpy as jnp

    from kernels.beam import pallas as kp
    f = functools.partial(kp.beam_select, W=W, normalize=normalize, interpret=False)
    lower_for_tpu(f, jax.ShapeDtypeStruct((4, W_in, V), jnp.bfloat16),
                  jax.ShapeDtypeStruct((4, W_in, C), jnp.float32), jax.ShapeDtypeStruct((4, W_in), jnp.float32))


def test_benchmark_smoke(tmp_path):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_beam.py"), "--smoke", "--out",
                        str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "bench_beam.json").exists() and (tmp_path / "bench_beam.md").exists()
