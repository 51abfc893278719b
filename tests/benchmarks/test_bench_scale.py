"""benchmarks/bench_scale.py --smoke runs both parts at tiny sizes in their own processes and records what the
issue asks for: SID fit time, peak memory, uniqueness and purity; the loader's throughput and memory."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_scale_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # each part runs in a spawned process that imports it
    mod = importlib.import_module("bench_scale")
    out = tmp_path / "r.jsonl"
    sid, loader = mod.main(["--smoke", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert [json.loads(line)["part"] for line in out.read_text().splitlines()] == ["sid", "loader"]
    assert sid["items"] == 3000 and 0 < sid["uniqueness"] <= 1 and sid["first_level_purity"] >= 0.8
    assert 0 < sid["peak_anon_rss_gib"] <= sid["peak_rss_gib"]
    assert (tmp_path / "work" / "codes-3000.npy").exists()
    assert 20000 <= loader["events"] < 40000 and loader["batches"] == 20 and loader["tokens_per_s"] > 0
    assert loader["anon_rss_first_gib"] <= loader["anon_rss_peak_gib"]
