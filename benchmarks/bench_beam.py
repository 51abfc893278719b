"""Benchmark of the trie-constrained beam step and search (the ``beam`` part of the device suite).

For tries of random SIDs with PLUM's codebooks (2048, 1024, 512, 256, 128,
64, 32, 16; 8 levels), B users and beam width W, it walks an 8-level search
on random bf16 logits and times the step of every level:

- ``ours``: ``plum_kernels.torch.constrained_beam_step`` (Triton on CUDA; the torch
  reference path with ``--device cpu``),
- ``topk``: unconstrained step (log-softmax + score add + top-W over W x V),
  the floor,
- ``dense_mask``: builds a ``[B, W, V]`` mask from the CSR, masks, top-W,
- ``csr_torch``: vectorized CSR gather in plain PyTorch (the torch reference),
- ``callback``: a per-beam Python callback in the style of Hugging Face's
  ``prefix_allowed_tokens_fn`` (``SIDTrie.children`` per beam; small B only),

plus the whole L = 8 search (precomputed random logits, no model). A step's
time is the mean over the timed levels of each level's median
(``triton.testing.do_bench_cudagraph`` for ours and the top-k floor,
``do_bench`` for the baselines, which read sizes back on the host; CPU runs
use ``perf_counter``). Ratios are against the baselines measured in the same
run. STATIC's setting (B = 2, W = 70, 20M items) carries the target
<= 0.033 ms per step.

Writes ``OUT/parts/NAME.csv`` (one row per configuration x implementation:
``constrained_beam_step`` in ms per step, ``constrained_beam_search`` in ms
per search), ``OUT/NAME.json`` (environment, command, per-level figures)
and ``OUT/NAME.md`` (the table below), NAME = ``bench_beam`` unless
``--name`` says otherwise.

    python benchmarks/bench_beam.py                   # GPU: the full grid
    python benchmarks/bench_beam.py --items 1000000 20000000 --pairs 2x70 64x64 1024x64 --no-static --name beam
    python benchmarks/bench_beam.py --device cpu --items 1000000 --batch 1 64 --width 16 64
    python benchmarks/bench_beam.py --smoke           # CPU, tiny, Triton interpreter, no timings (tests)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Recorder, Timer, enable_interpreter_if_smoke, finite, shape_str, suite_args  # noqa: E402

enable_interpreter_if_smoke(None)  # before triton is imported (below, through the kernels)
import torch  # noqa: E402

import plum_kernels.torch as K  # noqa: E402
from plum_kernels.beam import reference as ref  # noqa: E402
from plumrec.io import write_text  # noqa: E402
from plumrec.sid import build_trie  # noqa: E402

PLUM_CODEBOOKS = (2048, 1024, 512, 256, 128, 64, 32, 16)
SMOKE_CODEBOOKS = (16, 8, 4)
STATIC = (20_000_000, 2, 70)   # (items, B, W): STATIC's published batch and beam, the target's trie size


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


def make_trie(n_items: int, codebooks=PLUM_CODEBOOKS, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = np.empty((n_items, len(codebooks)), dtype=np.int16)
    for l, v in enumerate(codebooks):
        codes[:, l] = rng.integers(0, v, n_items, dtype=np.int16)
    return build_trie(codes, codebooks)


IMPLS = ("ours", "ours_bias", "topk", "dense_mask", "csr_torch", "callback")
IMPL_NAMES = {"ours": "plum triton", "ours_bias": "plum triton + edge bias", "topk": "unconstrained top-k (floor)",
              "dense_mask": "dense [B, W, V] mask + top-k",
              "csr_torch": "CSR gather in torch (reference)", "callback": "per-beam Python callback"}
BASELINE = IMPL_NAMES["dense_mask"]


def level_fns(x, scores, nodes, trie, sidtrie, level, W, impl, with_callback, bias):
    """``name -> (step callable, whether a CUDA graph can hold it)``; the dense mask and the CSR
    reference read sizes back on the host, so they are timed without a graph. ``ours_bias`` is the
    same step with a per-edge bias ``bias [E]`` (the exploration serving path)."""
    fns = {"ours": (lambda: K.constrained_beam_step(x, scores, nodes, trie, level, W, impl=impl, validate=False),
                    True),
           "ours_bias": (lambda: K.constrained_beam_step(x, scores, nodes, trie, level, W, impl=impl, validate=False,
                                                         edge_bias=bias), True),
           "topk": (lambda: topk_step(x, scores, W), True),
           "dense_mask": (lambda: dense_mask_step(x, scores, nodes, trie, level, W), False),
           "csr_torch": (lambda: K.constrained_beam_step(x, scores, nodes, trie, level, W, impl="reference",
                                                         validate=False), False)}
    if with_callback:
        fns["callback"] = (lambda: callback_step(x, scores, nodes, sidtrie, level, W), False)
    return fns


def run_config(sidtrie, trie, device, B, W, impl, timer: Timer, with_callback, levels):
    """Walk an L-level search with random logits; time each timed level's step for every
    implementation. Returns ``(per-level rows, {impl: how it was timed}, search (ms, how))``."""
    g = torch.Generator(device=device).manual_seed(B * 1000 + W)
    sizes = [int(v) for v in trie.codebook_sizes]
    logits_all = [torch.randn(B, W, v, generator=g, device=device, dtype=torch.bfloat16) for v in sizes]
    scores = torch.full((B, W), float("-inf"), device=device)
    scores[:, 0] = 0
    nodes = torch.full((B, W), -1, dtype=torch.int64, device=device)
    nodes[:, 0] = 0
    bias = torch.randn(int(trie.num_edges), generator=g, device=device)
    rows, hows = [], {}
    for level in range(len(sizes)):
        x = logits_all[level]
        if level in levels:
            row = {"level": level, "V": sizes[level]}
            fns = level_fns(x, scores, nodes, trie, sidtrie, level, W, impl, with_callback, bias)
            for name, (fn, graph) in fns.items():
                finite(fn(), allow_inf=True)
                row[name], hows[name] = timer(fn, graph=graph)
            rows.append(row)
        scores, nodes, _, _ = K.constrained_beam_step(x, scores, nodes, trie, level, W, impl=impl, validate=False)

    def search():
        return K.constrained_beam_search(lambda l, t, p: logits_all[l], trie, batch_size=B, beam_width=W, impl=impl)

    search()
    return rows, hows, timer(search)


def time_aggregate(rec: Recorder, sidtrie, trie, device, impl, timer: Timer) -> float | None:
    """Time ``trie_aggregate`` (random item masses -> node masses and per-edge biases) on one trie:
    one CSV row with the bytes it must move (item masses, the trie's edge and pointer arrays, three
    float32 outputs per edge or node) as GB/s. Returns ms."""
    g = torch.Generator(device=device).manual_seed(7)
    mass = torch.rand(sidtrie.num_items, generator=g, device=device)
    items = tuple(torch.as_tensor(getattr(sidtrie, k), device=device) for k in ("edge_item", "dup_ptr", "dup_items"))
    view = SimpleNamespace(edge_item=items[0], dup_ptr=items[1], dup_items=items[2])
    fn = lambda: K.trie_aggregate(mass, trie, view, impl=impl, validate=False)  # noqa: E731
    finite(fn().edge_bias)
    ms, how = timer(fn, graph=False)   # one host read of the level bounds per call
    I, E, N = int(trie.num_internal), int(trie.num_edges), int(sidtrie.num_items)
    nbytes = 4 * N + E * (trie.edge_word.element_size() + 8 + 4 * 3) + I * (8 + 4 + 4)
    rec.row("trie_aggregate", shape_str(items=N, edges=E, nodes=I), "float32", f"plum {impl}", ms, nbytes=nbytes,
            timer=how, notes="bottom-up masses + per-edge log-ratio bias")
    return ms


def make_configs(args) -> list[tuple[int, int, int]]:
    """``(items, B, W)``: items x (the --pairs, or --batch x --width), then STATIC's setting."""
    pairs = [tuple(int(v) for v in p.split("x")) for p in args.pairs] if args.pairs else \
        [(B, W) for B in args.batch for W in args.width]
    configs = [(n, B, W) for n in args.items for B, W in pairs]
    if not args.no_static and STATIC not in configs:
        configs.append(STATIC)
    return configs


def mean_ms(rows, name):
    vals = [r[name] for r in rows if r.get(name) is not None]
    return statistics.mean(vals) if vals and len(vals) == len(rows) else None


def record_config(rec: Recorder, n, B, W, L, impl, rows, hows, search) -> dict:
    """One CSV row per implementation (mean ms per step over the timed levels) plus the search row."""
    shape = shape_str(items=n, B=B, W=W, L=L, levels=",".join(str(r["level"]) for r in rows))
    names = {**IMPL_NAMES, "ours": f"plum {impl}"}
    for name in IMPLS:
        if name in hows:
            rec.row("constrained_beam_step", shape, "bfloat16", names[name], mean_ms(rows, name),
                    baseline=BASELINE, timer=hows[name], notes="ms per step: mean over the timed levels")
    rec.row("constrained_beam_search", shape_str(items=n, B=B, W=W, L=L), "bfloat16",
            names["ours"], search[0], timer=search[1], notes="whole search, precomputed logits, no model")
    res = {"items": n, "B": B, "W": W, "impl": impl, "levels": rows, "search_ms": search[0]}
    res.update({f"{k}_ms_mean": mean_ms(rows, k) for k in hows})
    return res


def markdown(meta: dict, results: list[dict], impl: str) -> str:
    def f(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    def ratio(r, k):
        a, b = r.get(f"{k}_ms_mean"), r.get("ours_ms_mean")
        return f(a / b, ".2f") if a and b else "-"

    def bias_cost(r):
        a, b = r.get("ours_bias_ms_mean"), r.get("ours_ms_mean")
        return f(a / b, ".3f") if a and b else "-"

    lines = [f"# bench_beam ({meta['device']}, torch {meta['torch']}, triton {meta.get('triton', '-')}, "
             f"{meta['date']})", "", f"`{meta['command']}`; impl = {impl}; step = mean over timed levels, ms", "",
             "| items | B | W | step ms | top-k ms | step / top-k | x dense mask | x CSR torch | x callback "
             "| search ms | biased / plain step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, t = r.get("ours_ms_mean"), r.get("topk_ms_mean")
        vs_topk = f(s / t, '.2f') if s and t else '-'
        lines.append(f"| {r['items']:,} | {r['B']} | {r['W']} | {f(s)} | {f(t)} | {vs_topk} "
                     f"| {ratio(r, 'dense_mask')} | {ratio(r, 'csr_torch')} | {ratio(r, 'callback')} "
                     f"| {f(r['search_ms'], '.3f')} | {bias_cost(r)} |")
    aggregate = meta.get("trie_aggregate_ms", {})
    if aggregate:
        lines += ["", "| items | trie_aggregate ms |", "|---|---|"]
        lines += [f"| {int(n):,} | {f(ms)} |" for n, ms in aggregate.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    suite_args(ap, "bench_beam")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda: the Triton kernel (default with a GPU); cpu: the torch reference path")
    ap.add_argument("--items", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000],
                    help="trie sizes (random SIDs)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 1024], help="users B (grid with --width)")
    ap.add_argument("--width", type=int, nargs="+", default=[16, 64, 256], help="beam widths W (grid with --batch)")
    ap.add_argument("--pairs", nargs="+", metavar="BxW", help="(B, W) pairs instead of the --batch x --width grid")
    ap.add_argument("--codebooks", type=int, nargs="+", default=list(PLUM_CODEBOOKS),
                    help="codebook size of each SID level (default PLUM's 8 levels)")
    ap.add_argument("--levels", type=int, nargs="+", default=list(range(8)), help="levels whose step is timed")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per level (CPU; do_bench on CUDA)")
    ap.add_argument("--callback-max-batch", type=int, default=1, help="time the Python callback up to this B")
    ap.add_argument("--no-static", action="store_true", help="skip STATIC's setting (B=2, W=70, 20M items)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.items, args.batch, args.width, args.pairs = "cpu", [5000], [2], [4], None
        args.reps, args.levels, args.no_static, args.callback_max_batch = 1, [0, 2], True, 2
        args.codebooks = list(SMOKE_CODEBOOKS)
    device = torch.device(args.device)
    impl = "triton" if device.type == "cuda" or args.smoke else "reference"
    timer = Timer(smoke=args.smoke, device=args.device, rep_ms=10, warmup_ms=5, cpu_iters=args.reps)
    rec = Recorder(args.out, args.name, part="beam", smoke=args.smoke)
    rec.set("codebooks", list(args.codebooks))
    results, tries, aggregate = [], {}, {}
    for n, B, W in make_configs(args):
        if n not in tries:
            t0 = time.perf_counter()
            tries.clear()
            sidtrie = make_trie(n, args.codebooks)
            tries[n] = (sidtrie, sidtrie.to_torch(device))
            rec.note(f"trie of {n:,} items: {sidtrie!r}, built in {time.perf_counter() - t0:.1f} s")
            aggregate[str(n)] = time_aggregate(rec, *tries[n], device, impl, timer)
            rec.set("trie_aggregate_ms", aggregate)
        sidtrie, trie = tries[n]
        rows, hows, search = run_config(sidtrie, trie, device, B, W, impl, timer, B <= args.callback_max_batch,
                                        set(args.levels))
        results.append(record_config(rec, n, B, W, len(args.codebooks), impl, rows, hows, search))
        rec.set("results", results)
    write_text(Path(args.out) / f"{args.name}.md", md := markdown(rec.record, results, impl))
    print(md)
    return rec.record


if __name__ == "__main__":
    main()
