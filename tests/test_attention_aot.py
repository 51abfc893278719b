"""Every Triton attention kernel compiles ahead of time for Hopper (sm_90) at
each configuration it ships with: shared memory within the H100 limit and,
for bf16/fp16 matrix kernels, wgmma tensor-core instructions in the PTX.
(Pallas TPU lowering is in tests/test_attention_jax.py.)

The compiles run in one subprocess without TRITON_INTERPRET: in a process
that has run interpreted kernels, triton 3.9 leaves ``triton.language``
patched with interpreter builtins (helper calls patch it without restoring),
and the real code generator then fails on the first ``tl.minimum``.
"""
from __future__ import annotations


import pytest

from compile_checks import compile_in_clean_process

from kernels.attention.triton_bwd import (_bwd_preprocess_kernel, history_attention_bwd_dkdv_kernel,
                                          history_attention_bwd_dq_kernel)
from kernels.attention.triton_common import BWD_CONFIGS, FWD_CONFIGS
from kernels.attention.triton_decode import DECODE_CONFIGS, beam_decode_merge_kernel, beam_decode_prefix_kernel
from kernels.attention.triton_fwd import history_attention_fwd_kernel

_TY = {2: "*bf16", 4: "*fp32"}
def _ptr_sig(names, ty):
    return {n: ty for n in names}


def _ints(names):
    return {n: "i32" for n in names}


def _fwd_sig(ty):
    return {**_ptr_sig(["Q", "K", "V", "O"], ty), "LSE": "*fp32", "cu_seqlens": "*i32", "blk_cu": "*i32",
            **_ints(["num_seqs", "total_tokens", "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt",
                     "stride_vh", "stride_ot", "stride_oh"]), "qk_scale": "fp32"}


def _bwd_sig(ty, dq: bool):
    grads = ["DQ"] if dq else ["DK", "DV"]
    strides = ["stride_dqt", "stride_dqh"] if dq else ["stride_dkt", "stride_dkh", "stride_dvt", "stride_dvh"]
    return {**_ptr_sig(["Q", "K", "V", "DO"], ty), "LSE": "*fp32", "DELTA": "*fp32", **_ptr_sig(grads, ty),
            "cu_seqlens": "*i32", "blk_cu": "*i32",
            **_ints(["num_seqs", "total_tokens", "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt",
                     "stride_vh", "stride_dot", "stride_doh", *strides]), "qk_scale": "fp32", "sm_scale": "fp32"}


def _precision(esize):
    return "tf32x3" if esize == 4 else "tf32"


def jobs():
    """Every shipped configuration: name -> (kernel, signature, constexprs,
    num_warps, num_stages, needs wgmma)."""
    out = {}
    for (d, esize), cfg in sorted(FWD_CONFIGS.items()):
        out[f"fwd-d{d}-{esize}B"] = (
            history_attention_fwd_kernel, _fwd_sig(_TY[esize]),
            dict(GROUP=4, HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=True,
                 INPUT_PRECISION=_precision(esize), UPCAST=False),
            cfg.num_warps, cfg.num_stages, esize == 2)
    for (d, esize), cfg in sorted(BWD_CONFIGS.items()):
        for name, fn, bm, bn in (("dkdv", history_attention_bwd_dkdv_kernel, cfg.block_m1, cfg.block_n1),
                                 ("dq", history_attention_bwd_dq_kernel, cfg.block_m2, cfg.block_n2)):
            out[f"bwd-{name}-d{d}-{esize}B"] = (
                fn, _bwd_sig(_TY[esize], name == "dq"),
                dict(GROUP=4, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=True, INPUT_PRECISION=_precision(esize),
                     UPCAST=False),
                cfg.num_warps, cfg.num_stages, esize == 2)
    for d in (64, 128):
        out[f"bwd-preprocess-d{d}"] = (
            _bwd_preprocess_kernel,
            {"O": "*bf16", "DO": "*bf16", "DLSE": "*fp32", "DELTA": "*fp32",
             **_ints(["total_tokens", "num_heads", "stride_ot", "stride_oh", "stride_dot", "stride_doh"])},
            dict(HEAD_DIM=d, BLOCK_T=64, HAS_DLSE=True), 4, 3, False)
        out[f"decode-merge-d{d}"] = (
            beam_decode_merge_kernel,
            {"Q": "*bf16", "KS": "*bf16", "VS": "*bf16", "O_PART": "*fp32", "L_PART": "*fp32", "OUT": "*bf16",
             **_ints(["suffix_len", "num_kv_heads", "num_splits"]), "scale": "fp32",
             **_ints(["stride_qb", "stride_qw", "stride_qh", "stride_ksb", "stride_ksw", "stride_kss", "stride_ksh",
                      "stride_vsb", "stride_vsw", "stride_vss", "stride_vsh", "stride_ob", "stride_ow", "stride_oh"])},
            dict(GROUP=4, BLOCK_G=4, HEAD_DIM=d, BLOCK_S=16), 4, 3, False)
    for (d, esize, _), cfg in sorted(DECODE_CONFIGS.items()):
        ty = _TY[esize]
        out[f"decode-prefix-d{d}-{esize}B-r{cfg.block_r}"] = (
            beam_decode_prefix_kernel,
            {**_ptr_sig(["Q", "K", "V"], ty), "prefix_lens": "*i32", "O_PART": "*fp32", "L_PART": "*fp32",
             **_ints(["num_rows", "num_row_blocks", "split_size", "num_splits", "stride_qb", "stride_qw",
                      "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh"]),
             "qk_scale": "fp32"},
            dict(GROUP=4, HEAD_DIM=d, BLOCK_R=cfg.block_r, BLOCK_N=cfg.block_n, INPUT_PRECISION=_precision(esize),
                 UPCAST=False),
            cfg.num_warps, cfg.num_stages, esize == 2)
    return out


def _compile_one(name: str) -> dict:
    from compile_checks import compile_for_hopper

    fn, sig, consts, warps, stages, _ = jobs()[name]
    build = compile_for_hopper(fn, sig, consts, num_warps=warps, num_stages=stages)
    return {"shared": build.shared, "wgmma": build.uses_wgmma}


def _compile_all() -> dict:
    """Run in the subprocess: compile every job (2 worker processes, ptxas is
    the bottleneck), report shared memory and wgmma."""
    from concurrent.futures import ProcessPoolExecutor

    names = sorted(jobs())
    with ProcessPoolExecutor(max_workers=2) as pool:
        return dict(zip(names, pool.map(_compile_one, names)))


@pytest.fixture(scope="module")
def hopper_builds():
    return compile_in_clean_process("test_attention_aot", "_compile_all")


@pytest.mark.parametrize("name", sorted(jobs()))
def test_kernel_compiles_for_hopper(hopper_builds, name):
    from compile_checks import HOPPER_SMEM_LIMIT

    needs_wgmma = jobs()[name][-1]
    build = hopper_builds[name]
    assert build["shared"] <= HOPPER_SMEM_LIMIT, f"{name}: {build['shared']} B of shared memory"
    if needs_wgmma:
        assert build["wgmma"], f"{name}: no wgmma in the PTX"
