"""Benchmark of history_attention and beam_decode_attention (GPU).

    python benchmarks/bench_attention.py                 # H100: JSON + markdown
    python benchmarks/bench_attention.py --smoke         # CPU: tiny sizes, reference impl, no timings

History attention: bf16, D = 128, Hq = 16, Hkv = 4, causal; lengths lognormal
(median 1k, capped at 32k) until ~128k tokens per batch. TFLOP/s counted on
real (unpadded) tokens: causal forward FLOPs = sum_b 2 * 2 * L_b^2 / 2 * Hq * D,
backward = 2.5x forward. Baselines in the same run: SDPA on the padded batch
(flash and cuDNN backends), FlexAttention with a document mask (block-mask
build timed separately), and torch's varlen attention where installed.

Decode: W = 64 beams over 8k-token prefixes, Hq = 16, Hkv = 4, D = 128, bf16,
against SDPA with the prefix copied for each beam; GB/s of reading the prefix
once (2 * B * S * Hkv * D * 2 bytes / time) against a measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels.torch as K  # noqa: E402
from common import environment, time_ms  # noqa: E402

bench = time_ms


def lognormal_lengths(total: int, median: int, cap: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    lens, n = [], 0
    while n < total:
        length = int(min(cap, max(1, rng.lognormal(math.log(median), 1.0))))
        length = min(length, total - n)
        lens.append(length)
        n += length
    return lens


def history_inputs(lens, hq, hkv, d, dtype, device):
    cu = torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int32, device=device)
    t = int(sum(lens))
    mk = lambda h: torch.randn(t, h, d, dtype=dtype, device=device, requires_grad=True)  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv), cu


def causal_flops(lens, hq, d) -> float:
    return sum(2 * 2 * n * (n + 1) / 2 * hq * d for n in lens)


def padded(x, lens, max_len):
    """[T, H, D] -> [B, H, max_len, D] zero-padded (for SDPA)."""
    out = x.new_zeros(len(lens), max_len, *x.shape[1:])
    s = 0
    for i, n in enumerate(lens):
        out[i, :n] = x[s:s + n]
        s += n
    return out.transpose(1, 2)


def run_history(args, device, dtype, results):
    hq, hkv, d = 16, 4, 128
    lens = lognormal_lengths(args.tokens, args.median, args.cap)
    if args.smoke:
        lens = [1, 5, 17]
        hq, hkv, d = 4, 2, 64
    q, k, v, cu = history_inputs(lens, hq, hkv, d, dtype, device)
    max_len = max(lens)
    impl = "reference" if args.smoke else "triton"
    # check_values=False: time the kernels, not the cu_seqlens host check (a sync)
    fwd = lambda: K.history_attention(q, k, v, cu, max_len, impl=impl, check_values=False)  # noqa: E731
    do = torch.randn_like(q)
    fwd_bwd = lambda: torch.autograd.grad(fwd(), (q, k, v), do)  # noqa: E731
    if args.smoke:
        out = fwd()
        fwd_bwd()
        assert out.shape == q.shape and torch.isfinite(out).all()
        results["history"] = {"smoke": True}
        return
    flops = causal_flops(lens, hq, d)
    rows = {}
    rows["plum triton"] = (bench(fwd), bench(fwd_bwd))
    # SDPA on the padded batch (GQA expanded)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qp = padded(q.detach(), lens, max_len).requires_grad_()
    kp = padded(k.detach().repeat_interleave(hq // hkv, 1), lens, max_len).requires_grad_()
    vp = padded(v.detach().repeat_interleave(hq // hkv, 1), lens, max_len).requires_grad_()
    dop = torch.randn_like(qp)
    for name, backend in (("sdpa flash (padded)", SDPBackend.FLASH_ATTENTION),
                          ("sdpa cudnn (padded)", SDPBackend.CUDNN_ATTENTION)):
        try:
            def f():
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
            rows[name] = (bench(f), bench(lambda: torch.autograd.grad(f(), (qp, kp, vp), dop)))
        except RuntimeError as e:  # backend unavailable
            rows[name] = (float("nan"), float("nan"))
            results.setdefault("notes", []).append(f"{name}: {e}")
    # FlexAttention with a document mask
    try:
        import time

        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        seg = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))

        def doc_causal(b, h, qi, ki):
            return (seg[qi] == seg[ki]) & (ki <= qi)

        t0 = time.perf_counter()
        bm = create_block_mask(doc_causal, None, None, q.shape[0], q.shape[0], device=device)
        torch.cuda.synchronize()
        results["flex_block_mask_build_ms"] = 1e3 * (time.perf_counter() - t0)
        flex = torch.compile(flex_attention)
        qf, kf, vf = (x.detach().transpose(0, 1)[None].requires_grad_() for x in (q, k, v))
        f = lambda: flex(qf, kf, vf, block_mask=bm, enable_gqa=True)  # noqa: E731
        rows["flex (document mask)"] = (bench(f), bench(lambda: torch.autograd.grad(f(), (qf, kf, vf),
                                                                                   do.transpose(0, 1)[None])))
    except Exception as e:  # noqa: BLE001 - report, don't die
        results.setdefault("notes", []).append(f"flex: {e!r}")
    # PyTorch's own varlen attention (torch.nn.attention.varlen), where installed
    try:
        from torch.nn.attention.varlen import varlen_attn

        qv, kv_, vv = (x.detach().requires_grad_() for x in (q, k, v))

        def f():
            try:   # newer signature: causal = window (-1, 0)
                return varlen_attn(qv, kv_, vv, cu, cu, max_len, max_len, window_size=(-1, 0), enable_gqa=True)
            except TypeError:  # older releases
                return varlen_attn(qv, kv_, vv, cu, cu, max_len, max_len, is_causal=True)
        rows["torch varlen_attn"] = (bench(f), bench(lambda: torch.autograd.grad(f(), (qv, kv_, vv), do)))
    except Exception as e:  # noqa: BLE001 - absent or unsupported here
        results.setdefault("notes", []).append(f"varlen_attn: {e!r}")
    results["history"] = {name: {"fwd_ms": f, "fwd_bwd_ms": fb, "fwd_tflops": flops / f / 1e9,
                                 "fwd_bwd_tflops": 3.5 * flops / fb / 1e9} for name, (f, fb) in rows.items()}
    results["history_setup"] = {"tokens": sum(lens), "seqs": len(lens), "max_len": max_len, "Hq": hq, "Hkv": hkv,
                                "D": d}


def run_decode(args, device, dtype, results):
    B, W, hq, hkv, d, S, s = 4, 64, 16, 4, 128, 8192, 8
    if args.smoke:
        B, W, hq, hkv, d, S, s = 2, 3, 4, 2, 64, 40, 4
    mk = lambda *shape: torch.randn(*shape, dtype=dtype, device=device)  # noqa: E731
    q, kp, vp = mk(B, W, hq, d), mk(B, S, hkv, d), mk(B, S, hkv, d)
    ks, vs = mk(B, W, s, hkv, d), mk(B, W, s, hkv, d)
    plens = torch.full((B,), S, dtype=torch.int32, device=device)
    impl = "reference" if args.smoke else "triton"
    f = lambda: K.beam_decode_attention(q, kp, vp, plens, ks, vs, s, impl=impl, check_values=False)  # noqa: E731
    if args.smoke:
        assert torch.isfinite(f()).all()
        results["decode"] = {"smoke": True}
        return

    def per_beam_copy():
        kk = torch.cat([kp[:, None].expand(B, W, S, hkv, d), ks], 2).repeat_interleave(hq // hkv, 3)
        vv = torch.cat([vp[:, None].expand(B, W, S, hkv, d), vs], 2).repeat_interleave(hq // hkv, 3)
        qq = q.reshape(B * W, hq, 1, d)
        return torch.nn.functional.scaled_dot_product_attention(
            qq, kk.reshape(B * W, S + s, hq, d).transpose(1, 2), vv.reshape(B * W, S + s, hq, d).transpose(1, 2))

    ms, base = bench(f), bench(per_beam_copy)
    nbytes = 2 * B * S * hkv * d * q.element_size()
    big = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    copy_ms = bench(lambda: big.clone())
    peak = 2 * big.numel() / copy_ms / 1e6
    results["decode"] = {"ms": ms, "per_beam_copy_ms": base, "speedup": base / ms,
                         "prefix_GBps": nbytes / ms / 1e6, "copy_GBps": peak,
                         "fraction_of_copy_bw": nbytes / ms / 1e6 / peak}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU with the reference impl, no timings")
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--median", type=int, default=1024)
    p.add_argument("--cap", type=int, default=32768)
    p.add_argument("--out", default="benchmarks/results/attention")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (use --smoke on CPU)")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    results = environment() | {"command": " ".join(["python"] + sys.argv)}
    run_history(args, device, dtype, results)
    run_decode(args, device, dtype, results)
    if args.smoke:
        print(json.dumps(results))
        return results
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    lines = [f"# attention ({results['device']}, torch {results['torch']}, {results['date']})", "",
             "| impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |", "|---|---|---|---|---|"]
    for name, r in results["history"].items():
        lines.append(f"| {name} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | {r['fwd_bwd_ms']:.3f} | "
                     f"{r['fwd_bwd_tflops']:.0f} |")
    d = results["decode"]
    lines += ["", f"decode: {d['ms']:.3f} ms vs per-beam copy {d['per_beam_copy_ms']:.3f} ms "
              f"({d['speedup']:.1f}x); prefix read {d['prefix_GBps']:.0f} GB/s = "
              f"{100 * d['fraction_of_copy_bw']:.0f}% of copy bandwidth"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
