"""benchmarks/bench_moe.py runs end to end on the CPU in --smoke mode (reference
impl, tiny sizes, no timings)."""
import importlib.util
import pathlib


def test_bench_moe_smoke():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_moe.py"
    spec = importlib.util.spec_from_file_location("bench_moe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--smoke"])
    assert [r["smoke"] for r in rows] == ["ran", "ran"]
