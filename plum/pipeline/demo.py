"""The demos: ``plum demo`` (the whole pipeline on the embedded synthetic catalogue, with the
baselines) and ``plum trie-demo`` (the SID trie's build and query timings).

``plum demo --out DIR``: content embeddings -> SIDs (SemanticIdTokenizer) ->
trie -> CPT -> SFT -> trie-constrained beam search; it compares ``plum`` (CPT
then SFT) with ``sft_only`` (the same SFT from a fresh model, PLUM's
ablation), ``popularity`` and ``sasrec`` (a full item-embedding-table model
trained on the same sequences), prints a table and writes ``DIR/results.json``.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from plumrec.baselines import Popularity
from plumrec.io import write_json
from plumrec.pipeline.config import load_run_config
from plumrec.pipeline.stages import (
    exclude_history,
    run_cpt,
    run_eval,
    run_sasrec,
    run_sft,
    run_sid,
    training_popularity,
)
from plumrec.pipeline.workspace import Workspace
from plumrec.sid.trie import SIDTrie, build_trie

__all__ = ["demo", "trie_demo", "RESULT_KEYS", "PLUM_CODEBOOKS"]

PLUM_CODEBOOKS = (2048, 1024, 512, 256, 128, 64, 32, 16)
BACKENDS = ("torch", "jax")
RESULT_KEYS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "invalid_rate")


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def demo(out_dir: str, *, config: str | None = None, threads: int | None = 1, progress: bool = True,
         backend: str = "torch", **overrides) -> dict:
    """The end-to-end job; returns ``{model: metrics}`` and writes ``out_dir/results.json``.

    ``threads``: torch intra-op threads (default 1: the tiny model's ops are
    too small to gain from more, and a loaded machine makes spinning threads
    much slower). ``backend``: ``"torch"``, or ``"jax"`` (CPT, SFT and retrieval
    on :mod:`plumrec.jax`, compared with ``popularity``; the SIDs as for torch;
    see :mod:`plumrec.pipeline.jax_stages`). ``overrides`` replace run-config
    sections (the tests use a scaled-down run)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    cfg = load_run_config(config, workdir=out_dir, **overrides)
    timings: dict[str, float] = {}
    ws, timings["data"] = _timed(Workspace, cfg)
    sid_info, timings["sid"] = _timed(run_sid, ws, progress=progress)
    if backend == "jax":
        return _demo_jax(ws, out_dir, sid_info, timings, t_start, progress)
    _, timings["cpt"] = _timed(run_cpt, ws, progress=progress)
    _, timings["sft"] = _timed(run_sft, ws, init="cpt", out="sft", progress=progress)
    _, timings["sft_only"] = _timed(run_sft, ws, init="scratch", out="sft_only", progress=progress)
    es = ws.split.test
    hist, tgt, ks = list(es.histories), es.targets, cfg["eval"]["ks"]
    results: dict[str, dict] = {}
    results["plum"], timings["eval_plum"] = _timed(run_eval, ws, ws.dir / "sft" / "model")
    results["sft_only"], timings["eval_sft_only"] = _timed(run_eval, ws, ws.dir / "sft_only" / "model")
    (ws.dir / "eval.json").unlink(missing_ok=True)
    xh, pop = exclude_history(ws), training_popularity(ws)
    results["popularity"] = Popularity(ws.split.train, ws.num_items).evaluate(hist, tgt, ks, exclude_history=xh,
                                                                              popularity=pop)
    t0 = time.perf_counter()
    sas = run_sasrec(ws, progress=progress)  # already trained when sft.distill used it as the teacher
    results["sasrec"] = sas.evaluate(hist, tgt, ks, exclude_history=xh, popularity=pop)
    timings["sasrec"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return _report(ws, out_dir, results, sid_info, timings, {"backend": "torch"})


def _demo_jax(ws: Workspace, out_dir: str, sid_info: dict, timings: dict, t_start: float, progress: bool) -> dict:
    """The demo's model stages on the JAX twin: CPT, SFT, the JAX retriever; popularity beside it."""
    from plumrec.pipeline import jax_stages as J  # only here: the torch install has no jax

    _, timings["cpt"] = _timed(J.run_cpt_jax, ws, progress=progress)
    _, timings["sft"] = _timed(J.run_sft_jax, ws, progress=progress)
    es = ws.split.test
    results: dict[str, dict] = {}
    results["plum"], timings["eval_plum"] = _timed(J.run_eval_jax, ws, ws.dir / "sft" / "model")
    results["popularity"] = Popularity(ws.split.train, ws.num_items).evaluate(
        list(es.histories), es.targets, ws.cfg["eval"]["ks"], exclude_history=exclude_history(ws),
        popularity=training_popularity(ws))
    timings["total"] = time.perf_counter() - t_start
    return _report(ws, out_dir, results, sid_info, timings, {"backend": "jax", "kernels": J.kernels_used(None)})


def _report(ws: Workspace, out_dir: str, results: dict, sid_info: dict, timings: dict, run: dict) -> dict:
    """Print the table and write ``out_dir/results.json``: the table, then ``details``."""
    table = {name: {k: float(r[k]) for k in RESULT_KEYS} for name, r in results.items()}
    extra = {name: {k: v for k, v in r.items() if k not in RESULT_KEYS} for name, r in results.items()}
    users = int(len(ws.split.test.targets))
    out = {**table, "details": {**run, "sid": sid_info, "metrics": extra, "timings_s": timings, "test_users": users,
                                "items": int(ws.num_items)}}
    write_json(os.path.join(out_dir, "results.json"), out, indent=1)
    _print_table(table, sid_info, users, timings["total"], run)
    print(f"wrote {os.path.join(out_dir, 'results.json')}")
    return out


def _print_table(table: dict, sid_info: dict, users: int, seconds: float, run: dict) -> None:
    kernels = f", {run['backend']} backend" + (f" ({run['kernels']} kernels)" if "kernels" in run else "")
    print(f"\nPLUM demo: {sid_info['items']} items, SIDs {tuple(sid_info['codebook_sizes'])} "
          f"({sid_info['unique_sid_fraction']:.1%} unique), {users} test users, full ranking, {seconds:.0f} s"
          f"{kernels}")
    head = f"  {'model':<12}" + "".join(f"{k:>13}" for k in RESULT_KEYS)
    print(head)
    print("  " + "-" * (len(head) - 2))
    for name, row in table.items():
        print(f"  {name:<12}" + "".join(f"{row[k]:>13.4f}" for k in RESULT_KEYS))


def trie_demo(out_dir: str, num_items: int = 1_000_000, seed: int = 0) -> dict:
    """Trie demo: build, query, save/load; returns and writes the timings."""
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
    write_json(os.path.join(out_dir, "trie_demo.json"), result, indent=1)
    print(f"wrote {os.path.join(out_dir, 'trie_demo.json')}")
    return result
