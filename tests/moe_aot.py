"""Ahead-of-time Hopper (sm_90) builds of every MoE Triton kernel at every
configuration it ships with. Run as a script (``python tests/moe_aot.py``,
without ``TRITON_INTERPRET``) it prints one JSON line
``{config name: {"shared", "wgmma", "matrix", "sm_90"}}``;
``tests/test_moe_triton.py`` runs it in a child process and checks the result.

The grouped-GEMM configurations (dtype x plain / transposed weight) are built
``aligned``, with the specialisations Triton
applies at run time to 16-byte-aligned pointers / multiple-of-16 integers and
unit strides: the software-pipelined variant, whose shared memory is the real
figure; the bf16 ones also once through ``compile_for_hopper`` with generic
integer arguments (the variant used for unaligned shapes such as an odd K).
"""
from __future__ import annotations

import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

_DT = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_GMM_SIG = dict(x_ptr="*{t}", w_ptr="*{t}", out_ptr="*{t}", sched_ptr="*i32", num_tiles="i32", N="i32", K="i32",
                stride_xm="i32", stride_xk="i32", stride_we="i32", stride_wk="i32", stride_wn="i32",
                stride_om="i32", stride_on="i32")
_TGMM_SIG = dict(x_ptr="*{t}", dy_ptr="*{t}", dw_ptr="*{t}", offsets_ptr="*i32", K="i32", N="i32",
                 stride_xm="i32", stride_xk="i32", stride_dym="i32", stride_dyn="i32", stride_we="i32",
                 stride_wk="i32", stride_wn="i32")
# (E, k, score) of PLUM's models; BLOCK_E / BLOCK_K / BLOCK_T follow (E, k)
ROUTE_SHAPES = [(8, 2, "softmax"), (128, 8, "sigmoid")]
# fp16 takes the bf16 code path of the GEMMs (another 16-bit wgmma operand);
# the row-moving kernels' code does not depend on the dtype beyond the element size.
GEMM_DTYPES = ("bf16", "fp32")
ROW_DTYPES = ("bf16",)


def _sig(template, t):
    return {k: v.format(t=t) for k, v in template.items()}


def _configs():
    """-> list of (name, kernel, signature, constexprs, aligned args or None, num_warps, num_stages, matrix)."""
    import triton

    from kernels.moe import reference as R
    from kernels.moe import triton_gmm as TG
    from kernels.moe import triton_permute as TP
    from kernels.moe import triton_route as TR

    out = []
    g = TG.DEFAULT_GMM_BLOCKS
    for t in GEMM_DTYPES:
        prec = "ieee" if t == "fp32" else "tf32"
        for tr in (False, True):
            consts = dict(BLOCK_M=g.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k, PRECISION=prec, CPU_INTERP=False)
            name = f"gmm_{t}{'_transposed_w' if tr else ''}"
            if t == "bf16" and not tr:
                out.append((name, TG._gmm_kernel, _sig(_GMM_SIG, t), consts, None, g.num_warps, g.num_stages,
                            True))
            unit = dict(stride_xk=1, stride_on=1, **({"stride_wk": 1} if tr else {"stride_wn": 1}))
            aligned = ["x_ptr", "w_ptr", "out_ptr", "sched_ptr", "N", "K", "stride_xm", "stride_we", "stride_om",
                       "stride_wn" if tr else "stride_wk"]
            out.append((name + "_aligned", TG._gmm_kernel, _sig(_GMM_SIG, t), {**consts, **unit}, aligned,
                        g.num_warps, g.num_stages, t != "fp32"))
    tg = TG.DEFAULT_TGMM_BLOCKS
    for t in GEMM_DTYPES:
        consts = dict(BLOCK_K=tg.block_k, BLOCK_N=tg.block_n, BLOCK_M=tg.block_m,
                      PRECISION="ieee" if t == "fp32" else "tf32", CPU_INTERP=False)
        if t == "bf16":
            out.append((f"tgmm_{t}", TG._tgmm_kernel, _sig(_TGMM_SIG, t), consts, None, tg.num_warps,
                        tg.num_stages, True))
        out.append((f"tgmm_{t}_aligned", TG._tgmm_kernel, _sig(_TGMM_SIG, t),
                    {**consts, "stride_xk": 1, "stride_dyn": 1, "stride_wn": 1},
                    ["x_ptr", "dy_ptr", "dw_ptr", "K", "N", "stride_xm", "stride_dym", "stride_we", "stride_wk"],
                    tg.num_warps, tg.num_stages, t != "fp32"))
    rb = TR.DEFAULT_ROUTE_BLOCKS
    for E, k, score in ROUTE_SHAPES:
        meta = dict(BLOCK_T=rb.block_t(E), BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(k),
                    SIGMOID=score == "sigmoid", RENORM=True, EPS=R.RENORM_EPS)
        out.append((f"route_fwd_E{E}_k{k}_{score}", TR._route_fwd_kernel, dict(
            logits_ptr="*fp32", bias_ptr="*fp32", w_ptr="*fp32", ids_ptr="*i32", lse_ptr="*fp32",
            psum_ptr="*fp32", cnt_ptr="*fp32", T="i32", E="i32", k="i32", stride_lt="i32"),
            dict(HAS_BIAS=score == "sigmoid", **meta), None, rb.num_warps, 1, False))
        out.append((f"route_bwd_E{E}_k{k}_{score}", TR._route_bwd_kernel, dict(
            logits_ptr="*bf16", ids_ptr="*i32", gw_ptr="*fp32", c_ptr="*fp32", lse_ptr="*fp32", dl_ptr="*bf16",
            T="i32", E="i32", k="i32", stride_lt="i32", stride_dt="i32", gz_ptr="*fp32"),
            dict(CPU_INTERP=False, **meta), None, rb.num_warps, 1, False))
    pb = TP.DEFAULT_ROW_BLOCKS
    blocks = dict(BLOCK_R=pb.block_rows, BLOCK_D=pb.block_d)
    for t in ROW_DTYPES:
        out.append((f"gather_rows_{t}", TP._gather_rows_kernel, dict(
            x_ptr=f"*{t}", out_ptr=f"*{t}", perm_ptr="*i32", M="i32", D="i32", k="i32", stride_x="i32",
            stride_o="i32"), blocks, None, pb.num_warps, 1, False))
        for has_w in (True, False):
            out.append((f"combine_{t}_{'weighted' if has_w else 'sum'}", TP._combine_kernel, dict(
                y_ptr=f"*{t}", w_ptr="*fp32", inv_ptr="*i32", out_ptr=f"*{t}", T="i32", D="i32", k="i32",
                stride_y="i32", stride_o="i32"), dict(HAS_W=has_w, CPU_INTERP=False, **blocks), None, pb.num_warps, 1,
                False))
        out.append((f"unpermute_bwd_{t}", TP._unpermute_bwd_kernel, dict(
            dout_ptr=f"*{t}", y_ptr=f"*{t}", w_ptr="*fp32", perm_ptr="*i32", dy_ptr=f"*{t}", dw_ptr="*fp32",
            M="i32", D="i32", k="i32", stride_do="i32", stride_y="i32", stride_dy="i32"),
            dict(CPU_INTERP=False, **blocks), None, pb.num_warps, 1, False))
    return out


def config_names():
    names = ["gmm_bf16", "tgmm_bf16"]   # generic integer arguments (compile_for_hopper)
    for t in GEMM_DTYPES:
        for tr in ("", "_transposed_w"):
            names += [f"gmm_{t}{tr}_aligned"]
        names += [f"tgmm_{t}_aligned"]
    for E, k, score in ROUTE_SHAPES:
        names += [f"route_fwd_E{E}_k{k}_{score}", f"route_bwd_E{E}_k{k}_{score}"]
    for t in ROW_DTYPES:
        names += [f"gather_rows_{t}", f"combine_{t}_weighted", f"combine_{t}_sum", f"unpermute_bwd_{t}"]
    return names


def build_all() -> dict:
    from compile_checks import compile_for_hopper

    results = {}
    for name, kernel, sig, consts, aligned, nw, ns, matrix in _configs():
        b = compile_for_hopper(kernel, sig, consts, num_warps=nw, num_stages=ns,
                               aligned=() if aligned is None else aligned)
        results[name] = dict(shared=b.shared, wgmma=b.uses_wgmma, matrix=matrix, sm_90=".target sm_90" in b.ptx)
    return results


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("run without TRITON_INTERPRET")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    print(json.dumps(build_all()))
