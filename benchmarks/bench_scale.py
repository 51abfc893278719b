"""Catalogue scale on one machine: SIDs for millions of items, and SFT fed from a log of 10^8 events.

Two parts, each in a child process of its own so that its peak memory is its own:

- **sid**: a clustered synthetic catalogue (``plumrec.data.scale.write_clustered_embeddings``: N x 128
  float32 in a ``.npy`` file, 1,024 clusters) is fitted from its memory map by
  ``SemanticIdTokenizer.fit(..., codes_path=...)`` with the default config, the codes written to disk as
  they come. Reports the fit time (statistics, training, k-means, restarts and the assignment of every
  item), peak RSS (all of it, and the anonymous part: RSS less the pages of mapped files), uniqueness and
  first-level purity against the clusters.
- **loader**: a power-law event log of ``--events`` events in Parquet shards
  (``write_synthetic_events``) becomes an ``EventStore`` (``write_event_store``), then an ``ExampleStream``
  over ``StoreSFTDataset`` packs ``--batches`` SFT batches of ``--max-tokens`` tokens. Reports the
  build time, tokens/s and RSS sampled across the run (first, peak and last; flat memory means peak minus
  first stays small).

The CPU machine is the one the figures are for (the issue's budget: 2 cores, 24 GiB). Results are
appended as JSON lines to ``--out`` (default ``benchmarks/data/scale.jsonl``)::

    python benchmarks/bench_scale.py --part sid --items 10000000 --work /tmp/scale
    python benchmarks/bench_scale.py --part loader --events 100000000 --work /tmp/scale
    python benchmarks/bench_scale.py --smoke          # tiny sizes, seconds
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shlex
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


class MemoryWatch:
    """Samples this process's RSS and anonymous RSS (``/proc/self/status``) every ``interval`` seconds
    in a thread; ``peak`` holds the largest of each, in GiB."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak, self._stop = interval, {"rss": 0.0, "anon": 0.0}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> dict:
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:")):
                    key, value = line.split(":")
                    fields["rss" if key == "VmRSS" else "anon"] = int(value.split()[0]) / 2**20
        return fields

    def _run(self):
        while not self._stop.is_set():
            for k, v in self.now().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for k, v in self.now().items():
            self.peak[k] = max(self.peak[k], v)


def _environment(threads: int) -> dict:
    import platform

    import torch

    return {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "cpus": os.cpu_count(), "torch_threads": threads,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def sid_part(items: int, work: Path, clusters: int, config: dict) -> dict:
    """Write the catalogue, fit and assign its SIDs from the memory map, score them."""
    import torch

    from plumrec.data.scale import write_clustered_embeddings
    from plumrec.sid import SemanticIdTokenizer, first_level_purity, sid_quality

    work.mkdir(parents=True, exist_ok=True)
    emb_path = work / f"emb-{items}.npy"
    t0 = time.perf_counter()
    if not emb_path.exists():
        write_clustered_embeddings(emb_path, items, num_clusters=clusters, progress=False)
    gen_s = time.perf_counter() - t0
    emb = np.load(emb_path, mmap_mode="r")
    tok = SemanticIdTokenizer(seed=0, **config)
    with MemoryWatch() as mem:
        t0 = time.perf_counter()
        codes = tok.fit(emb, progress=True, codes_path=work / f"codes-{items}.npy")
        fit_s = time.perf_counter() - t0
    labels = np.load(work / f"emb-{items}.clusters.npy")
    q = sid_quality(codes, tok.codebook_sizes)
    return {"part": "sid", "items": items, "dim": int(emb.shape[1]), "clusters": clusters,
            "codebook_sizes": list(tok.codebook_sizes), "train_items": tok.config.train_items,
            "epochs": tok.config.epochs, "embeddings_gib": round(emb.nbytes / 2**30, 2),
            "generate_s": round(gen_s, 1), "fit_and_assign_s": round(fit_s, 1),
            "peak_rss_gib": round(mem.peak["rss"], 2), "peak_anon_rss_gib": round(mem.peak["anon"], 2),
            "ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "uniqueness": round(q.uniqueness, 4), "max_items_per_sid": q.max_items_per_sid,
            "utilisation": [round(u, 4) for u in q.utilisation],
            "first_level_purity": round(first_level_purity(codes, labels), 4),
            **_environment(torch.get_num_threads())}


def loader_part(events: int, items: int, work: Path, batches: int, max_tokens: int, shards: int) -> dict:
    """Write the event log, build the store, stream SFT batches and watch the memory."""
    import torch

    from plumrec.data.events import EventStore, write_event_store
    from plumrec.data.scale import write_synthetic_events
    from plumrec.model.vocab import SIDVocab
    from plumrec.sequences import ExampleStream
    from plumrec.train.streaming import StoreSFTDataset

    log, store_dir = work / f"events-{events}", work / f"store-{events}"
    t0 = time.perf_counter()
    if not log.exists():
        write_synthetic_events(log, events, num_items=items, num_shards=shards, progress=False)
    gen_s = time.perf_counter() - t0
    with MemoryWatch() as build_mem:
        t0 = time.perf_counter()
        if not store_dir.exists():
            write_event_store(sorted(log.glob("*.parquet")), store_dir, num_items=items, time_col="time",
                              progress=False)
        build_s = time.perf_counter() - t0
    store = EventStore.open(store_dir)
    sizes = (256, 256, 256, 256)
    vocab = SIDVocab(0, sizes)  # SID tokens only: the loader needs no text vocabulary
    rng = np.random.default_rng(0)
    sid_tokens = np.lib.format.open_memmap(work / f"sid-tokens-{items}.npy", mode="w+", dtype=np.int64,
                                           shape=(items, len(sizes)))
    for s in range(0, items, 1 << 20):  # random SIDs: the loader's cost does not depend on them
        n = min(1 << 20, items - s)
        sid_tokens[s:s + n] = vocab.sid_to_tokens(rng.integers(0, 256, (n, len(sizes))))
    t0 = time.perf_counter()
    dataset = StoreSFTDataset(store, sid_tokens, vocab, max_items=50)
    index_s = time.perf_counter() - t0
    stream = ExampleStream(dataset, max_tokens=max_tokens, seed=0)
    samples, tokens = [], 0
    with MemoryWatch() as mem:
        t0 = time.perf_counter()
        for b in range(batches):
            tokens += stream.next_batch().num_tokens
            if b % max(1, batches // 20) == 0 or b == batches - 1:
                samples.append(MemoryWatch.now())
        run_s = time.perf_counter() - t0
    anon = [s["anon"] for s in samples]
    return {"part": "loader", "events": store.num_events, "users": len(store), "items": items,
            "sft_examples": len(dataset), "shards": shards, "generate_s": round(gen_s, 1),
            "store_build_s": round(build_s, 1), "store_build_peak_anon_gib": round(build_mem.peak["anon"], 2),
            "index_s": round(index_s, 1), "batches": batches, "max_tokens": max_tokens, "tokens": tokens,
            "tokens_per_s": round(tokens / run_s), "examples_per_s": round(stream.position / run_s),
            "anon_rss_first_gib": round(anon[0], 3), "anon_rss_peak_gib": round(mem.peak["anon"], 3),
            "anon_rss_last_gib": round(anon[-1], 3), "rss_peak_gib": round(mem.peak["rss"], 3),
            "rss_spread_gib": round(mem.peak["rss"] - samples[0]["rss"], 3),
            **_environment(torch.get_num_threads())}


def _child(fn, kwargs, queue):
    try:
        queue.put(fn(**kwargs))
    except BaseException:
        import traceback

        queue.put({"error": traceback.format_exc()})
        raise


def run_isolated(fn, **kwargs) -> dict:
    """``fn(**kwargs)`` in a fresh process (its own peak memory)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, kwargs, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{fn.__name__} failed in its process:\n{result['error']}")
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["sid", "loader", "both"], default="both")
    p.add_argument("--items", type=int, default=10_000_000, help="catalogue size")
    p.add_argument("--clusters", type=int, default=1024)
    p.add_argument("--events", type=int, default=100_000_000)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--batches", type=int, default=2000, help="SFT batches the loader packs")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--work", type=Path, default=Path("/tmp/plum-scale"), help="folder for the generated files")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "data" / "scale.jsonl")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (checks the code paths)")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    config = {}
    if args.smoke:
        args.items, args.clusters, args.events, args.shards, args.batches = 3000, 12, 20000, 2, 20
        config = dict(codebook_sizes=(24, 16, 16), latent_dim=8, hidden_dims=(16,), epochs=3, warmup_epochs=1,
                      train_items=1000, kmeans_iters=3)
    results = []
    if args.part in ("sid", "both"):
        results.append(run_isolated(sid_part, items=args.items, work=args.work, clusters=args.clusters,
                                    config=config))
    if args.part in ("loader", "both"):
        results.append(run_isolated(loader_part, events=args.events, items=args.items, work=args.work,
                                    batches=args.batches, max_tokens=args.max_tokens, shards=args.shards))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for r in results:
            r["command"] = shlex.join(["python", "benchmarks/bench_scale.py",
                                       *(sys.argv[1:] if argv is None else argv)])
            f.write(json.dumps(r) + "\n")
            print(json.dumps(r))
    return results


if __name__ == "__main__":
    main()
