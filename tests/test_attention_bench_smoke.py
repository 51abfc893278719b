"""benchmarks/bench_attention.py --smoke runs its code paths on the CPU
(reference impl, tiny sizes, no timings)."""
import importlib.util
from pathlib import Path


def test_bench_attention_smoke():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = mod.main(["--smoke"])
    assert results["history"] == {"smoke": True} and results["decode"] == {"smoke": True}
    lens = mod.lognormal_lengths(65536, 1024, 32768)
    assert sum(lens) == 65536 and max(lens) <= 32768 and min(lens) >= 1
