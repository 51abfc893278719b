"""SID trie build: time, peak memory and bytes per item, against baselines.

Every (method, N) build runs in a fresh subprocess that loads the codes,
resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and reports
the build's wall time and its peak resident memory above what the codes
already took. Methods, all measured in the same run:

- ``cpp``: :func:`plumrec.sid.build_trie` (this package; every core);
- ``numpy``: :func:`plumrec.sid.reference.build_numpy`, the same compressed
  format built with ``lexsort`` + ``diff``;
- ``dict``: a dict-of-dicts Python trie (one dict per node, items in lists);
- ``marisa``: ``marisa_trie.Trie`` over the packed big-endian keys as
  strings (a static C++ trie; no item mapping, so it stores less).

Usage::

    python benchmarks/bench_trie.py --out benchmarks/out/trie            # 1M, 10M, 100M
    python benchmarks/bench_trie.py --sizes 100000 --out /tmp/t          # quick

Writes ``OUT.json``, ``OUT.md`` and ``OUT.png`` (build time against N).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from plumrec.io import write_json, write_text

PLUM = (2048, 1024, 512, 256, 128, 64, 32, 16)
TIGER = (256, 256, 256, 256)
CONFIGS = {"plum8": PLUM, "4x256": TIGER}
LIMITS = {"cpp": 10**9, "numpy": 10_000_000, "marisa": 10_000_000, "dict": 1_000_000}


def make_codes(n: int, sizes, seed: int = 0) -> np.ndarray:
    """Uniform random SIDs, int16 (what an RQ-VAE with these codebooks emits)."""
    rng = np.random.default_rng(seed)
    codes = np.empty((n, len(sizes)), dtype=np.int16)
    for l, v in enumerate(sizes):
        codes[:, l] = rng.integers(0, v, n, dtype=np.int16)
    return codes


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _build(method: str, codes: np.ndarray, sizes) -> dict:
    if method == "cpp":
        from plumrec.sid import build_trie

        t = build_trie(codes, sizes)
        return {"bytes": t.nbytes, "sids": t.num_sids}
    if method == "numpy":
        from plumrec.sid.reference import build_numpy

        t = build_numpy(codes, sizes)
        return {"bytes": t.nbytes, "sids": t.num_sids}
    if method == "dict":
        root: dict = {}
        for item, row in enumerate(codes.tolist()):
            node = root
            for c in row[:-1]:
                node = node.setdefault(c, {})
            node.setdefault(row[-1], []).append(item)
        return {"bytes": None, "sids": None}
    if method == "marisa":
        import marisa_trie

        from plumrec.sid.trie import level_layout

        bits, shift = level_layout(sizes)
        key = np.zeros(codes.shape[0], dtype=np.uint64)
        for l in range(len(sizes)):
            key |= codes[:, l].astype(np.uint64) << np.uint64(shift[l])
        raw = key.astype(">u8").view("S8")
        keys = [k.decode("latin-1") for k in raw.tolist()]
        t = marisa_trie.Trie(keys)
        with tempfile.NamedTemporaryFile(suffix=".marisa") as f:
            t.save(f.name)
            size = os.path.getsize(f.name)
        return {"bytes": size, "sids": len(t)}
    raise ValueError(method)


def _warm_imports(method: str) -> None:
    """Import what a method needs before the clock starts."""
    import importlib

    for name in {"cpp": ["plumrec.sid.reference"], "numpy": ["plumrec.sid.reference"],
                 "marisa": ["marisa_trie", "plumrec.sid.trie"]}.get(method, []):
        importlib.import_module(name)


def child_main(method: str, path: str, config: str) -> None:
    _warm_imports(method)
    codes = np.load(path)
    sizes = CONFIGS[config]
    before = _rss_kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    t0 = time.perf_counter()
    info = _build(method, codes, sizes)
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM:")
    print(json.dumps({"seconds": seconds, "peak_extra_bytes": (peak - before) * 1024, **info}))


def run_one(method: str, path: str, config: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", method, path, config]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    except subprocess.CalledProcessError as exc:
        return {"error": exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--methods", nargs="+", default=["cpp", "numpy", "marisa", "dict"])
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default="benchmarks/out/trie")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(*args.child)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            for n in args.sizes:
                path = os.path.join(tmp, f"{config}_{n}.npy")
                np.save(path, make_codes(n, CONFIGS[config]))
                for method in args.methods:
                    if n > LIMITS.get(method, 0):
                        continue
                    r = run_one(method, path, config, args.timeout)
                    r.update(method=method, config=config, n=n)
                    rows.append(r)
                    msg = r.get("error") or f"{r['seconds']:.2f} s, peak +{r['peak_extra_bytes'] / 2**20:.0f} MiB"
                    print(f"{config:6s} N={n:>11,} {method:7s} {msg}", flush=True)
                os.remove(path)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
              "numpy": np.__version__, "command": "python " + " ".join(sys.argv), "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_json(args.out + ".json", result, indent=1)
    md = to_markdown(result)
    write_text(args.out + ".md", md)
    print(md)
    plot(result, args.out + ".png")


def to_markdown(result: dict) -> str:
    by = {(r["config"], r["n"], r["method"]): r for r in result["rows"]}
    lines = [f"Machine: {result['machine']}; date {result['date']}; python {result['python']}, "
             f"numpy {result['numpy']}.", f"Command: `{result['command']}`", "",
             "| codebooks | N | method | build (s) | speed-up of cpp | peak extra memory (MiB) | bytes/item |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for (config, n, method), r in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "cpp")):
        if "error" in r:
            lines.append(f"| {config} | {n:,} | {method} | {r['error']} | | | |")
            continue
        cpp = by.get((config, n, "cpp"))
        ratio = f"{r['seconds'] / cpp['seconds']:.1f}x" if cpp and "seconds" in cpp and method != "cpp" else ""
        bpi = f"{r['bytes'] / n:.2f}" if r.get("bytes") else "n/a"
        lines.append(f"| {config} | {n:,} | {method} | {r['seconds']:.2f} | {ratio} | "
                     f"{r['peak_extra_bytes'] / 2**20:.0f} | {bpi} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    configs = sorted({r["config"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4.2), squeeze=False)
    for ax, config in zip(axes[0], configs):
        for method in ("cpp", "numpy", "marisa", "dict"):
            pts = sorted((r["n"], r["seconds"]) for r in result["rows"]
                         if r["config"] == config and r["method"] == method and "seconds" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("SIDs (N)")
        ax.set_ylabel("build time (s)")
        ax.set_title(f"trie build, codebooks {config}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(result["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
