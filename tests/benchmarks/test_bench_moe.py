"""benchmarks/bench_moe.py runs end to end on the CPU in --smoke mode (Triton kernels through the
interpreter, tiny sizes, no timings); here its `moe` section, in process (the device suite's smoke
test runs both sections)."""
import csv
import importlib.util
import pathlib
import sys


def test_bench_moe_smoke(tmp_path):
    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_moe.py"
    spec = importlib.util.spec_from_file_location("bench_moe", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # its dataclasses resolve their annotations through it
    spec.loader.exec_module(mod)
    results = mod.main(["--smoke", "--section", "moe", "--out", str(tmp_path)])
    assert results["moe"]["smoke"] and results["moe"]["torch_has_grouped_mm"]
    with open(tmp_path / "parts" / "moe.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ops = {(r["op"], r["impl"]) for r in rows if r["timer"] == "smoke (no timing)"}
    for mode in ("fwd", "dx", "dw"):
        assert {(f"grouped_matmul {mode}", "plum triton"), (f"grouped_matmul {mode}", "torch._grouped_mm")} <= ops
    assert {("moe_mlp fwd+bwd", "plum triton"), ("moe_mlp fwd+bwd", "torch._grouped_mm layer")} <= ops
    assert all(r["ms"] == "" for r in rows)
    # the _grouped_mm baselines compute what ours does (bf16 on both sides)
    diffs = [float(r["notes"].split("rel. diff vs plum ")[1]) for r in rows if "rel. diff" in r["notes"]]
    assert diffs and max(diffs) < 2e-2
    assert mod.layer_flops(4, 8, 2, 2) == 2 * 4 * 2 * (8 * 4 + 2 * 8)
