"""Benchmark of the trie-constrained beam step and search (issue 5).

For tries of 1M / 10M / 100M random SIDs with PLUM's codebooks
(2048, 1024, 512, 256, 128, 64, 32, 16), B users and beam width W, it times
per level:

- ``ours``: ``kernels.torch.constrained_beam_step`` (Triton on CUDA; the torch
  reference path with ``--device cpu``),
- ``topk``: unconstrained step (log-softmax + score add + top-W over W x V),
  the floor,
- ``dense_mask``: builds a ``[B, W, V]`` mask from the CSR, masks, top-W,
- ``csr_torch``: vectorized CSR gather in plain PyTorch (the torch reference),
- ``callback``: a per-beam Python callback in the style of Hugging Face's
  ``prefix_allowed_tokens_fn`` (``SIDTrie.children`` per beam; small B only),

plus the whole L = 8 search (precomputed random logits, no model). Reports
medians in ms and ratios against the baselines measured in the same run, and
STATIC's setting (B = 2, W = 70, V = 2048, 10M items; target < 0.033 ms).
Writes ``bench_beam.json`` and ``bench_beam.md`` to ``--out``.

    python benchmarks/bench_beam.py                   # H100: full grid
    python benchmarks/bench_beam.py --device cpu --items 1000000 --batch 1 64 --width 16 64
    python benchmarks/bench_beam.py --smoke           # tiny CPU run (tests)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernels.torch as K  # noqa: E402
from kernels.beam import reference as ref  # noqa: E402
from plum.sid import build_trie  # noqa: E402
from common import environment, time_ms  # noqa: E402

PLUM_CODEBOOKS = (2048, 1024, 512, 256, 128, 64, 32, 16)


def topk_step(logits, scores, W):
    B, W_in, V = logits.shape
    lp = torch.log_softmax(logits.float(), -1) + scores[..., None]
    top, idx = lp.reshape(B, W_in * V).topk(W, dim=1)
    return top, idx // V, idx % V


def dense_mask_step(logits, scores, nodes, trie, level, W):
    B, W_in, V = logits.shape
    tok, _, valid = ref.expand_children(nodes, trie, level)
    mask = torch.zeros(B, W_in, V, dtype=torch.bool, device=logits.device)
    mask.scatter_(2, tok, valid)
    lp = torch.log_softmax(logits.float(), -1) + scores[..., None]
    lp = lp.masked_fill(~mask, float("-inf"))
    top, idx = lp.reshape(B, W_in * V).topk(W, dim=1)
    return top, idx // V, idx % V


def callback_step(logits, scores, nodes, sidtrie, level, W):
    """prefix_allowed_tokens_fn style: one Python call per beam builds its
    allowed-token list, then a dense mask and top-W."""
    B, W_in, V = logits.shape
    n = nodes.cpu().numpy()
    mask = torch.zeros(B, W_in, V, dtype=torch.bool)
    for b in range(B):
        for w in range(W_in):
            if n[b, w] >= 0:
                mask[b, w, torch.from_numpy(sidtrie.children(int(n[b, w]), level))] = True
    mask = mask.to(logits.device)
    lp = torch.log_softmax(logits.float(), -1) + scores[..., None]
    lp = lp.masked_fill(~mask, float("-inf"))
    return lp.reshape(B, W_in * V).topk(W, dim=1)


def make_trie(n_items: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = np.empty((n_items, len(PLUM_CODEBOOKS)), dtype=np.int16)
    for l, v in enumerate(PLUM_CODEBOOKS):
        codes[:, l] = rng.integers(0, v, n_items, dtype=np.int16)
    return build_trie(codes, PLUM_CODEBOOKS)


def run_config(sidtrie, trie, device, B, W, impl, reps, with_callback, levels):
    """Walk an L-level search with random logits; time each level's step."""
    g = torch.Generator(device="cpu").manual_seed(B * 1000 + W)
    logits_all = [torch.randn(B, W, v, generator=g).to(device=device, dtype=torch.bfloat16) for v in PLUM_CODEBOOKS]
    scores = torch.full((B, W), float("-inf"), device=device)
    scores[:, 0] = 0
    nodes = torch.full((B, W), -1, dtype=torch.int64, device=device)
    nodes[:, 0] = 0
    rows = []
    for level in range(len(PLUM_CODEBOOKS)):
        x = logits_all[level]
        row = {"level": level, "V": PLUM_CODEBOOKS[level]}
        if level in levels:
            def timed(fn, iters=reps, warmup=2):
                return time_ms(fn, device=device, iters=iters, warmup=warmup)

            row["ours"] = timed(lambda: K.constrained_beam_step(x, scores, nodes, trie, level, W, impl=impl,
                                                                validate=False))
            row["topk"] = timed(lambda: topk_step(x, scores, W))
            row["dense_mask"] = timed(lambda: dense_mask_step(x, scores, nodes, trie, level, W))
            row["csr_torch"] = timed(lambda: K.constrained_beam_step(x, scores, nodes, trie, level, W,
                                                                     impl="reference", validate=False))
            if with_callback:
                row["callback"] = timed(lambda: callback_step(x, scores, nodes, sidtrie, level, W),
                                        iters=max(1, reps // 5), warmup=1)
            rows.append(row)
        scores, nodes, _, _ = K.constrained_beam_step(x, scores, nodes, trie, level, W, impl=impl, validate=False)

    def search():
        return K.constrained_beam_search(lambda l, t, p: logits_all[l], trie, batch_size=B, beam_width=W, impl=impl)

    search_ms = time_ms(search, device=device, iters=max(1, reps // 2), warmup=1)
    return rows, search_ms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--items", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 1024])
    ap.add_argument("--width", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--levels", type=int, nargs="+", default=list(range(8)), help="levels whose step is timed")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--callback-max-batch", type=int, default=1)
    ap.add_argument("--no-static", action="store_true", help="skip STATIC's setting (B=2, W=70, 10M items)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of every code path (tests)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.items, args.batch, args.width = "cpu", [5000], [2], [4]
        args.reps, args.levels, args.no_static, args.callback_max_batch = 1, [0, 3], True, 2
    device = torch.device(args.device)
    impl = "triton" if device.type == "cuda" else "reference"
    configs = [(n, B, W) for n in args.items for B in args.batch for W in args.width]
    if not args.no_static:
        configs.append((10_000_000, 2, 70))
    results = []
    tries = {}
    for n, B, W in configs:
        if n not in tries:
            t0 = time.perf_counter()
            tries.clear()
            sidtrie = make_trie(n)
            tries[n] = (sidtrie, sidtrie.to_torch(device))
            print(f"# trie {n} items: {sidtrie!r} built in {time.perf_counter() - t0:.1f}s", flush=True)
        sidtrie, trie = tries[n]
        rows, search_ms = run_config(sidtrie, trie, device, B, W, impl, args.reps,
                                     B <= args.callback_max_batch, set(args.levels))
        rec = {"items": n, "B": B, "W": W, "impl": impl, "levels": rows, "search_ms": search_ms,
               "step_ms_mean": statistics.mean(r["ours"] for r in rows),
               "topk_ms_mean": statistics.mean(r["topk"] for r in rows)}
        rec["vs_topk"] = rec["step_ms_mean"] / rec["topk_ms_mean"]
        rec["dense_mask_speedup"] = statistics.mean(r["dense_mask"] for r in rows) / rec["step_ms_mean"]
        rec["csr_torch_speedup"] = statistics.mean(r["csr_torch"] for r in rows) / rec["step_ms_mean"]
        if "callback" in rows[0]:
            rec["callback_speedup"] = statistics.mean(r["callback"] for r in rows) / rec["step_ms_mean"]
        results.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "levels"}), flush=True)
    meta = environment() | {"device": args.device, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_beam.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"# bench_beam ({meta.get('gpu', meta.get('cpu'))}, torch {meta['torch']}, triton {meta['triton']}, "
             f"{meta['date']})", "", f"`{meta['command']}`; impl = {impl}; step = mean over timed levels, ms", "",
             "| items | B | W | step ms | top-k ms | step / top-k | x dense mask | x CSR torch | x callback | search ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cb = f"{r['callback_speedup']:.0f}" if "callback_speedup" in r else "-"
        lines.append(f"| {r['items']:,} | {r['B']} | {r['W']} | {r['step_ms_mean']:.4f} | {r['topk_ms_mean']:.4f} | "
                     f"{r['vs_topk']:.2f} | {r['dense_mask_speedup']:.2f} | {r['csr_torch_speedup']:.2f} | {cb} | "
                     f"{r['search_ms']:.3f} |")
    (out / "bench_beam.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
