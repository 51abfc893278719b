"""benchmarks/bench_decode.py --smoke runs its code paths on the CPU (Triton kernels through the
interpreter, tiny sizes, no timings), in process (the device suite's smoke test runs bench_attention.py
as well), and bench_attention.py's length and FLOP helpers."""
import csv
import importlib.util
import sys
from pathlib import Path


def _bench(name: str):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # its dataclasses resolve their annotations through it
    spec.loader.exec_module(mod)
    return mod


def test_bench_decode_smoke(tmp_path):
    record = _bench("bench_decode").main(["--smoke", "--out", str(tmp_path)])
    assert record["smoke"] and record["part"] == "decode"
    with open(tmp_path / "parts" / "decode.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["impl"] for r in rows} == {"plum triton", "SDPA beams as rows (masked)", "per-beam copy + SDPA"}
    assert all(r["ms"] == "" and r["timer"] == "smoke (no timing)" for r in rows)
    assert all(float(r["notes"].split("rel. diff vs plum ")[1]) < 2e-2 for r in rows if r["impl"] != "plum triton")


def test_bench_attention_helpers():
    mod = _bench("bench_attention")
    lens = mod.lognormal_lengths(65536, 1024, 32768)
    assert sum(lens) == 65536 and max(lens) <= 32768 and min(lens) >= 1
    assert mod.causal_flops([1, 3], hq=2, d=4) == 4 * (1 * 2 / 2 + 3 * 4 / 2) * 2 * 4
