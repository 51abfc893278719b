"""A tiny Amazon-style dataset (S3-Rec text format with an item json) and the benchmark scripts loaded from
``benchmarks/``, shared by the retrieval benchmark's tests and ``plum run``'s."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TINY_WORDS = "lipstick shampoo nail polish face cream number beauty".split()


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_bench():
    return load_script("bench_retrieval")


def write_dataset(d: Path, num_items: int = 48, num_users: int = 40, seed: int = 0) -> Path:
    """Users walk through 4 item groups of ``num_items // 4`` (so there is something to learn); S3-Rec ids are
    1-based."""
    rng = np.random.default_rng(seed)
    size = num_items // 4
    d.mkdir()
    words = ["lipstick", "shampoo", "nail polish", "face cream"]
    lines = []
    for u in range(1, num_users + 1):
        g = rng.integers(0, 4)
        n = int(rng.integers(5, 9))
        seq = [int(g * size + rng.integers(0, size)) + 1 for _ in range(n)]
        lines.append(" ".join(map(str, [u, *seq])))
    (d / "Tiny.txt").write_text("\n".join(lines) + "\n")
    items = {str(i + 1): {"title": f"{words[min(i // size, 3)]} number {i % size}",
                           "categories": [["Beauty", words[min(i // size, 3)]]]}
             for i in range(num_items)}
    (d / "Tiny.item.json").write_text(json.dumps(items))
    return d
