"""The ``plum`` command line.

``plum demo --out DIR`` runs the main job on an embedded default. Until the
model layer lands it exercises the SID trie end to end: generate SIDs with
PLUM's multi-resolution codebooks, build the trie (C++), query it in batches,
save and memory-map it back, and print timings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

PLUM_CODEBOOKS = (2048, 1024, 512, 256, 128, 64, 32, 16)


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def demo(out_dir: str, num_items: int = 1_000_000, seed: int = 0) -> dict:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plum", description="PLUM generative recommendation")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run the main job on the embedded default")
    p_demo.add_argument("--out", default="runs/demo", help="output directory")
    p_demo.add_argument("--items", type=int, default=1_000_000, help="number of generated SIDs")
    p_demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.out, num_items=args.items, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
