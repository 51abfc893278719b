"""Benchmark of the MoE SwiGLU layer and its grouped GEMM (GPU, bf16).

    python benchmarks/bench_moe.py                      # H100: JSON + markdown under benchmarks/out/
    python benchmarks/bench_moe.py --smoke              # CPU: tiny sizes, reference impl, no timings

Layers at the scale of PLUM's models: d_model 1024 / 2048, expert FFN 512 /
1408, E = 64 and 128, k = 8, 16k / 64k tokens; router logits from a random
router (roughly balanced). FLOPs counted on routed tokens only:
forward = 2 * T * k * (d * 2f + f * d), forward + backward = 3x forward.

In the same run:
- ``loop``: a per-expert Python loop (index_select, two matmuls, index_add);
- ``torch._grouped_mm``: the same layer with torch's grouped GEMM where the
  installed PyTorch has it (bf16, SM >= 80), our route/permute around it;
- ``dense``: one bf16 GEMM of the same FLOPs (the ceiling for the grouped GEMM);
- the share of routing + permute + combine in our layer's forward time.

Targets (issue 4, H100): grouped GEMM >= 75% of the dense GEMM's TFLOP/s;
layer >= 3x the loop and >= 1.0x the torch._grouped_mm layer; route + permute
+ combine <= 15% of layer time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels.torch as K  # noqa: E402
from kernels.moe import ops_torch as OT  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, time_ms  # noqa: E402

bench = time_ms

CONFIGS = [  # (tokens, d_model, ffn, experts, k)
    (16384, 1024, 512, 64, 8),
    (16384, 2048, 1408, 64, 8),
    (32768, 2048, 768, 128, 8),
    (65536, 2048, 1408, 128, 8),
]
SMOKE_CONFIGS = [(16, 32, 24, 8, 2), (12, 16, 8, 4, 4)]


def make_layer(T, d, f, E, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(device)  # noqa: E731
    x = mk(T, d)
    router = mk(d, E, scale=d ** -0.5).float()
    wg = mk(E, d, 2 * f, scale=d ** -0.5)
    wd = mk(E, f, d, scale=f ** -0.5)
    return x, router, wg, wd


def layer_flops(T, d, f, k) -> float:
    return 2.0 * T * k * (d * 2 * f + f * d)


def loop_layer(x, logits, wg, wd, k):
    """Per-expert loop baseline (the plain formulation)."""
    r = K.moe_route(logits, k, impl="reference")
    out = torch.zeros_like(x, dtype=torch.float32)
    f = wd.shape[1]
    for e in range(wg.shape[0]):
        tok, slot = (r.expert_ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok] @ wg[e]
        y = (F.silu(h[:, :f]) * h[:, f:]) @ wd[e]
        out.index_add_(0, tok, y.float() * r.weights[tok, slot, None])
    return out.to(x.dtype)


def grouped_mm_layer(x, logits, wg, wd, k):
    """torch._grouped_mm between our route / permute / combine."""
    E, f = wd.shape[0], wd.shape[1]
    r = K.moe_route(logits, k)
    xs, gs, perm, inv = K.moe_permute(x, r.expert_ids, E, validate=False)
    offs = torch.cumsum(gs, 0).to(torch.int32)
    h = torch._grouped_mm(xs, wg, offs=offs)
    a = F.silu(h[:, :f]) * h[:, f:]
    y = torch._grouped_mm(a, wd, offs=offs)
    return K.moe_unpermute(y, r.weights, perm, inv)


def fwd_bwd(fn, inputs):
    def run():
        for t in inputs:
            t.grad = None
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
    return run


def run_config(T, d, f, E, k, *, device, dtype, smoke):
    x, router, wg, wd = make_layer(T, d, f, E, dtype, device)
    logits = (x.float() @ router)
    ins = [t.requires_grad_() for t in (x, wg, wd)]
    impl = "reference" if smoke else None
    ours = lambda: K.moe_mlp(x, logits, wg, wd, k, impl=impl).out  # noqa: E731
    loop = lambda: loop_layer(x, logits, wg, wd, k)  # noqa: E731
    if smoke:  # run every path once, check they agree, report no timings
        a, b = ours(), loop()
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4), (a - b).abs().max()
        fwd_bwd(ours, ins)()
        xs = torch.randn(T * k, d, dtype=dtype)
        gs = torch.full((E,), T * k // E, dtype=torch.int32)
        gs[0] += T * k - int(gs.sum())
        K.grouped_matmul(xs, wg.detach(), gs, impl="reference")
        return {"tokens": T, "d_model": d, "ffn": f, "experts": E, "k": k, "smoke": "ran"}

    flops = layer_flops(T, d, f, k)
    res = {"tokens": T, "d_model": d, "ffn": f, "experts": E, "k": k, "gflop_fwd": flops / 1e9}
    timings = {"ours": ours, "loop": loop}
    if hasattr(torch, "_grouped_mm"):
        timings["torch_grouped_mm"] = lambda: grouped_mm_layer(x, logits, wg, wd, k)
    for name, fn in timings.items():
        with torch.no_grad():
            ms = bench(fn)
        ms_fb = bench(fwd_bwd(fn, ins), warmup=2, iters=5)
        res[name] = {"fwd_ms": ms, "fwd_tflops": flops / ms / 1e9,
                     "fwd_bwd_ms": ms_fb, "fwd_bwd_tflops": 3 * flops / ms_fb / 1e9}
    # grouped GEMM alone vs one dense GEMM of the same FLOPs
    with torch.no_grad():
        r = K.moe_route(logits, k)
        xs, gs, perm, inv = K.moe_permute(x, r.expert_ids, E, validate=False)
        gmm_ms = bench(lambda: OT._gmm_op(xs, wg, gs, False, "triton"))
        a_dense = torch.randn(T * k, d, dtype=dtype, device=device)
        b_dense = torch.randn(d, 2 * f, dtype=dtype, device=device)
        dense_ms = bench(lambda: a_dense @ b_dense)
        gflop = 2.0 * T * k * d * 2 * f / 1e9
        res["gmm_gate_up"] = {"ms": gmm_ms, "tflops": gflop / gmm_ms, "dense_ms": dense_ms,
                              "dense_tflops": gflop / dense_ms, "ratio_to_dense": dense_ms / gmm_ms}
        route_ms = bench(lambda: K.moe_route(logits, k))
        perm_ms = bench(lambda: K.moe_permute(x, r.expert_ids, E, validate=False))
        y = torch.randn(T * k, d, dtype=dtype, device=device)
        comb_ms = bench(lambda: K.moe_unpermute(y, r.weights, perm, inv))
        res["routing_share_of_fwd"] = (route_ms + perm_ms + comb_ms) / res["ours"]["fwd_ms"]
    res["speedup_vs_loop_fwd_bwd"] = res["loop"]["fwd_bwd_ms"] / res["ours"]["fwd_bwd_ms"]
    if "torch_grouped_mm" in res:
        res["speedup_vs_grouped_mm_fwd_bwd"] = res["torch_grouped_mm"]["fwd_bwd_ms"] / res["ours"]["fwd_bwd_ms"]
    return res


def to_markdown(meta, rows) -> str:
    lines = [f"MoE layer, {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}", "",
             "| T | d | f | E | k | ours fwd+bwd TFLOP/s | loop | _grouped_mm | x loop | x _grouped_mm "
             "| gmm / dense | route+perm+combine share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gm = r.get("torch_grouped_mm", {}).get("fwd_bwd_tflops", float("nan"))
        lines.append(
            f"| {r['tokens']} | {r['d_model']} | {r['ffn']} | {r['experts']} | {r['k']} "
            f"| {r['ours']['fwd_bwd_tflops']:.0f} | {r['loop']['fwd_bwd_tflops']:.0f} | {gm:.0f} "
            f"| {r['speedup_vs_loop_fwd_bwd']:.2f} | {r.get('speedup_vs_grouped_mm_fwd_bwd', float('nan')):.2f} "
            f"| {r['gmm_gate_up']['ratio_to_dense']:.2f} | {r['routing_share_of_fwd']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, reference impl, no timings")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = ap.parse_args(argv)
    if args.smoke:
        rows = [run_config(*c, device="cpu", dtype=torch.float32, smoke=True) for c in SMOKE_CONFIGS]
        print(json.dumps(rows))
        return rows
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py needs a CUDA GPU (use --smoke on a CPU)")

    meta = environment() | {"command": " ".join(["python"] + sys.argv)}
    rows = [run_config(*c, device="cuda", dtype=torch.bfloat16, smoke=False) for c in CONFIGS]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_moe.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = to_markdown(meta, rows)
    (out / "bench_moe.md").write_text(md)
    print(md)
    return rows


if __name__ == "__main__":
    main()
