"""The ``plum`` command line.

Subcommands (each over a run configuration, JSON or TOML, see
:func:`plum.train.stages.load_run_config`; without ``--config`` the defaults,
i.e. the embedded synthetic catalogue and the ``tiny`` model)::

    plum sid       --config run.toml     # SID tokenizer + trie
    plum cpt       --config run.toml     # continued pre-training
    plum sft       --config run.toml [--init cpt|scratch]
    plum eval      --config run.toml     # constrained beam search, Recall/NDCG@K
    plum recommend --config run.toml --history item_1,item_7 [-k 10]
    plum demo      --out DIR             # the main job, end to end (below)
    plum trie-demo --out DIR             # SID trie build/query timings

``plum demo --out DIR`` runs the whole pipeline on the embedded synthetic
catalogue: content embeddings -> SIDs (SemanticIdTokenizer) -> trie -> CPT
-> SFT -> trie-constrained beam search, and compares ``plum`` (CPT then SFT)
with ``sft_only`` (the same SFT from a fresh model, PLUM's ablation),
``popularity`` and ``sasrec`` (a full item-embedding-table model trained on
the same sequences). It prints a table and writes ``DIR/results.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

PLUM_CODEBOOKS = (2048, 1024, 512, 256, 128, 64, 32, 16)
RESULT_KEYS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "invalid_rate")


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- the main job

def demo(out_dir: str, *, config: str | None = None, threads: int | None = 1, progress: bool = True,
         **overrides) -> dict:
    """The end-to-end job; returns ``{model: metrics}`` and writes ``out_dir/results.json``.

    ``threads``: torch intra-op threads (default 1: the tiny model's ops are
    too small to gain from more, and a loaded machine makes spinning threads
    much slower). ``overrides`` replace run-config sections (the tests use a
    scaled-down run)."""
    import torch

    from plum.baselines import Popularity
    from plum.train.stages import (Workspace, exclude_history, load_run_config, run_cpt, run_eval, run_sasrec,
                                   run_sft, run_sid)

    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    cfg = load_run_config(config, workdir=out_dir, **overrides)
    timings: dict[str, float] = {}
    ws, timings["data"] = _timed(Workspace, cfg)
    sid_info, timings["sid"] = _timed(run_sid, ws, progress=progress)
    _, timings["cpt"] = _timed(run_cpt, ws, progress=progress)
    _, timings["sft"] = _timed(run_sft, ws, init="cpt", out="sft", progress=progress)
    _, timings["sft_only"] = _timed(run_sft, ws, init="scratch", out="sft_only", progress=progress)
    es = ws.split.test
    hist, tgt, ks = list(es.histories), es.targets, cfg["eval"]["ks"]
    results: dict[str, dict] = {}
    results["plum"], timings["eval_plum"] = _timed(run_eval, ws, ws.dir / "sft" / "model")
    results["sft_only"], timings["eval_sft_only"] = _timed(run_eval, ws, ws.dir / "sft_only" / "model")
    (ws.dir / "eval.json").unlink(missing_ok=True)
    xh = exclude_history(ws)
    results["popularity"] = Popularity(ws.split.train, ws.num_items).evaluate(hist, tgt, ks, exclude_history=xh)
    t0 = time.perf_counter()
    sas = run_sasrec(ws, progress=progress)  # already trained when sft.distill used it as the teacher
    results["sasrec"] = sas.evaluate(hist, tgt, ks, exclude_history=xh)
    timings["sasrec"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    table = {name: {k: float(r[k]) for k in RESULT_KEYS} for name, r in results.items()}
    extra = {name: {k: v for k, v in r.items() if k not in RESULT_KEYS} for name, r in results.items()}
    out = {**table, "details": {"sid": sid_info, "metrics": extra, "timings_s": timings,
                                "test_users": int(len(tgt)), "items": int(ws.num_items)}}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    _print_table(table, sid_info, len(tgt), timings["total"])
    print(f"wrote {os.path.join(out_dir, 'results.json')}")
    return out


def _print_table(table: dict, sid_info: dict, users: int, seconds: float) -> None:
    print(f"\nPLUM demo: {sid_info['items']} items, SIDs {tuple(sid_info['codebook_sizes'])} "
          f"({sid_info['unique_sid_fraction']:.1%} unique), {users} test users, full ranking, {seconds:.0f} s")
    head = f"  {'model':<12}" + "".join(f"{k:>13}" for k in RESULT_KEYS)
    print(head)
    print("  " + "-" * (len(head) - 2))
    for name, row in table.items():
        print(f"  {name:<12}" + "".join(f"{row[k]:>13.4f}" for k in RESULT_KEYS))


# ----------------------------------------------------------------------------- trie demo

def trie_demo(out_dir: str, num_items: int = 1_000_000, seed: int = 0) -> dict:
    """Trie demo: build, query, save/load; returns and writes the timings."""
    from plum.sid import SIDTrie, build_trie

    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, v, num_items, dtype=np.int16) for v in PLUM_CODEBOOKS], axis=1)
    trie, t_build = _timed(build_trie, codes, PLUM_CODEBOOKS)
    queries = codes[rng.integers(0, num_items, min(num_items, 100_000))]
    absent = np.stack([rng.integers(0, v, len(queries), dtype=np.int16) for v in PLUM_CODEBOOKS], axis=1)
    found, t_contains = _timed(trie.contains, queries)
    found_absent = trie.contains(absent)
    states, t_walk = _timed(trie.walk, queries[:, :3])
    items, t_items = _timed(trie.items, queries[:10_000])
    path = os.path.join(out_dir, "trie.safetensors")
    _, t_save = _timed(trie.save, path)
    back, t_load = _timed(SIDTrie.load, path, mmap=True)
    if not found.all() or not (back.walk(queries[:1000]) == trie.walk(queries[:1000])).all():
        raise RuntimeError("trie demo self-check failed")
    if not all(int(i) in trie.items(codes[i:i + 1])[0] for i in rng.integers(0, num_items, 100)):
        raise RuntimeError("trie demo self-check failed: items")
    result = {
        "num_items": num_items, "codebooks": list(PLUM_CODEBOOKS), "num_sids": trie.num_sids,
        "logical_nodes": trie.num_nodes, "internal_nodes": trie.num_internal, "edges": trie.num_edges,
        "bytes_per_item": trie.nbytes / num_items,
        "build_s": t_build, "contains_per_s": len(queries) / t_contains, "walk3_per_s": len(queries) / t_walk,
        "items_per_s": 10_000 / t_items, "save_s": t_save, "mmap_load_s": t_load,
        "random_sids_present": float(found_absent.mean()),
    }
    rows = [
        ("items", f"{num_items:,}"), ("distinct SIDs", f"{trie.num_sids:,}"),
        ("logical nodes", f"{trie.num_nodes:,}"),
        ("stored: internal nodes / edges", f"{trie.num_internal:,} / {trie.num_edges:,}"),
        ("bytes per item", f"{result['bytes_per_item']:.2f}"),
        ("build (C++)", f"{t_build * 1e3:.0f} ms"),
        ("contains, batch of 100k", f"{t_contains * 1e3:.1f} ms ({result['contains_per_s'] / 1e6:.1f} M/s)"),
        ("walk 3-level prefixes", f"{t_walk * 1e3:.1f} ms"),
        ("items of 10k SIDs", f"{t_items * 1e3:.1f} ms"),
        ("save / mmap load", f"{t_save * 1e3:.0f} ms / {t_load * 1e3:.1f} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"PLUM SID trie demo: {num_items:,} random SIDs, codebooks {PLUM_CODEBOOKS}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    with open(os.path.join(out_dir, "trie_demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {os.path.join(out_dir, 'trie_demo.json')}")
    return result


# ----------------------------------------------------------------------------- entry point

def _workspace(args):
    from plum.train.stages import Workspace, load_run_config

    over = {"workdir": args.workdir} if args.workdir else {}
    return Workspace(load_run_config(args.config, **over))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plum", description="PLUM generative recommendation")
    sub = parser.add_subparsers(dest="command", required=True)

    def stage(name: str, help: str):
        p = sub.add_parser(name, help=help)
        p.add_argument("--config", default=None, help="run configuration (.json or .toml); default: built-in")
        p.add_argument("--workdir", default=None, help="override the config's workdir")
        p.add_argument("--no-progress", action="store_true")
        return p

    stage("sid", "fit the SID tokenizer and build the trie")
    stage("cpt", "continued pre-training on SID histories + grounding text")
    p_sft = stage("sft", "supervised fine-tuning: history -> next SID")
    p_sft.add_argument("--init", choices=("cpt", "scratch"), default=None)
    p_eval = stage("eval", "constrained beam search evaluation (Recall/NDCG@K)")
    p_eval.add_argument("--model", default=None, help="saved model dir (default WORKDIR/sft/model)")
    p_rec = stage("recommend", "top-k items for one history")
    p_rec.add_argument("--history", required=True, help="comma-separated raw item ids, oldest first")
    p_rec.add_argument("-k", type=int, default=10)
    p_rec.add_argument("--model", default=None)

    p_demo = sub.add_parser("demo", help="run the main job on the embedded synthetic catalogue")
    p_demo.add_argument("--out", default="runs/demo", help="output directory")
    p_demo.add_argument("--config", default=None, help="optional run configuration to start from")
    p_demo.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p_demo.add_argument("--no-progress", action="store_true")
    p_trie = sub.add_parser("trie-demo", help="SID trie build/query timings on random SIDs")
    p_trie.add_argument("--out", default="runs/trie-demo", help="output directory")
    p_trie.add_argument("--items", type=int, default=1_000_000, help="number of generated SIDs")
    p_trie.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
        demo(args.out, config=args.config, threads=args.threads, progress=not args.no_progress)
    elif args.command == "trie-demo":
        trie_demo(args.out, num_items=args.items, seed=args.seed)
    else:
        from plum.train import stages
        from plum.train.loop import init_distributed, shutdown_distributed

        if args.command in ("cpt", "sft"):
            init_distributed()  # under torchrun: DDP (or FSDP2 with fsdp = true in the config)
        ws = _workspace(args)
        progress = not args.no_progress
        if args.command == "sid":
            out = stages.run_sid(ws, progress=progress)
        elif args.command == "cpt":
            out = stages.run_cpt(ws, progress=progress)
        elif args.command == "sft":
            out = stages.run_sft(ws, init=args.init, progress=progress)
        elif args.command == "eval":
            out = stages.run_eval(ws, args.model)
        else:
            out = stages.run_recommend(ws, args.history.split(","), args.k, args.model)
        shutdown_distributed()
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
