"""benchmarks/device_suite.py: its dry run fits the 540-second budget; its smoke run takes every part
end to end through the Triton interpreter (CSV and JSON for every part, no speed figures) and
device_report renders it and rewrites only its own section of RESULTS.md; a part that fails or
times out is recorded, keeps the rows it wrote, and the next part still runs."""
import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ["check", "peaks", "attention", "decode", "moe", "routing", "beam", "train_step"]


def _module(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod   # dataclasses resolve their annotations through it
    spec.loader.exec_module(mod)
    return mod


def _suite(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_suite.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_dry_run_lists_every_part_and_the_timeouts_fit_the_budget():
    ds = _module("device_suite")
    assert [p.name for p in ds.PARTS] == PARTS
    assert sum(p.timeout_s for p in ds.PARTS) <= ds.BUDGET_S - ds.FINISH_S <= 540
    assert all(0 < p.estimate_s < p.timeout_s for p in ds.PARTS)
    r = _suite("--dry-run")
    assert r.returncode == 0, r.stderr
    listed = [line.split()[0] for line in r.stdout.splitlines() if line.split() and line.split()[0] in PARTS]
    assert listed == PARTS
    total = next(line for line in r.stdout.splitlines() if line.startswith("total")).split()
    assert int(total[1]) == sum(p.estimate_s for p in ds.PARTS) and float(total[2]) <= 540
    r = _suite("--dry-run", "--only", "beam,peaks", "--timeout", "beam=7")
    assert [ln.split()[0] for ln in r.stdout.splitlines() if ln.split() and ln.split()[0] in PARTS] == ["peaks", "beam"]
    assert "total" in r.stdout and " 27 " in r.stdout.splitlines()[-1]   # 20 (peaks) + 7
    assert _suite("--dry-run", "--only", "nope").returncode == 2


@pytest.mark.slow
def test_smoke_runs_every_part_reports_no_speed_and_the_report_rewrites_only_its_section(tmp_path):
    out = tmp_path / "out"
    r = _suite("--smoke", "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    suite = json.loads((out / "suite.json").read_text())
    assert [(p["part"], p["status"]) for p in suite["parts"]] == [(p, "ok") for p in PARTS], suite["parts"]
    check = json.loads((out / "check.json").read_text())
    assert check["ok"] and check["complete"] and {c["case"].split()[0] for c in check["cases"]} == {
        "history_attention", "beam_decode_attention", "moe_mlp", "constrained_beam_search"}
    rows = _rows(out / "ops.csv")
    assert {r["part"] for r in rows} == set(PARTS) - {"check"}
    for name in set(PARTS) - {"check"}:
        rec = json.loads((out / f"{name}.json").read_text())
        assert rec["smoke"] and rec["part"] == name and rec["command"] and rec["device"] and rec["torch"]
        assert rec["rows"] == len(_rows(out / "parts" / f"{name}.csv")) > 0
    # no speed figures in smoke mode: every figure column is empty, every timer says why
    figures = ("ms", "tflops", "gbps", "frac_peak_flops", "frac_peak_bw", "frac_roofline", "speedup")
    assert all(r[c] == "" for r in rows for c in figures)
    assert {r["timer"].split(":")[0] for r in rows} <= {"smoke (no timing)", "unavailable", "failed", "skipped"}
    # every op ran, ours through the interpreter
    ran = {(r["part"], r["op"]) for r in rows if r["timer"] == "smoke (no timing)" and r["impl"].startswith(
        ("plum", "triton", "torch.mm", "Tensor"))}
    assert ran >= {("attention", f"history_attention {m}") for m in ("fwd", "bwd", "fwd+bwd")} | {
        ("decode", "beam_decode_attention"), ("moe", "grouped_matmul fwd"), ("moe", "grouped_matmul dx"),
        ("moe", "grouped_matmul dw"), ("moe", "moe_mlp fwd+bwd"), ("routing", "moe_route"),
        ("routing", "moe_permute"), ("routing", "moe_unpermute"), ("beam", "constrained_beam_step"),
        ("train_step", "sft step"), ("peaks", "bf16 gemm"), ("peaks", "copy")}
    # baselines that exist on this CPU torch ran too
    impls = {(r["part"], r["impl"]) for r in rows if r["timer"] == "smoke (no timing)"}
    assert {("attention", "flex (document mask)"), ("attention", "sdpa flash (padded)"),
            ("decode", "per-beam copy + SDPA"), ("routing", "torch reference"),
            ("beam", "dense [B, W, V] mask + top-k"), ("train_step", "reference")} <= impls

    dr = _module("device_report")
    report = (out / "report.md").read_text()
    assert report == dr.render(out)
    assert "Smoke run" in report and "not measured" in report and "| train_step | ok |" in report
    assert "yes" not in "\n".join(line for line in report.splitlines() if line.startswith("| SFT step"))
    copy = tmp_path / "RESULTS.md"
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", copy)
    before = copy.read_text()
    dr.main([str(out), "--write", str(copy)])
    after = copy.read_text()
    i, j = before.index(dr.BEGIN) + len(dr.BEGIN), before.index(dr.END)
    assert after.startswith(before[:i]) and after.endswith(before[j:])
    assert after[i:len(after) - len(before) + j].strip() == report.strip()


def test_a_failing_and_a_timed_out_part_are_recorded_and_the_next_part_runs(tmp_path):
    ds = _module("device_suite")
    common = _module("common")
    header = ",".join(common.CSV_COLUMNS)
    row = "slow,op,n=1,bfloat16,x,,,,,,,,,smoke (no timing),written before the timeout"
    write_then_hang = (f"import sys, time\nopen(sys.argv[1] + '/parts/slow.csv', 'w').write({header!r} + '\\n' + "
                       f"{row!r} + '\\n')\nprint('row written', flush=True)\ntime.sleep(120)")
    parts = [ds.Part("boom", ("-c", "import sys; print('partial'); sys.exit(3)"), 1, 30, "crashes"),
             ds.Part("slow", ("-c", write_then_hang, "{out}"), 1, 30, "hangs after one row"),
             ds.Part("last", ("-c", "print('ran')"), 1, 30, "runs")]
    (tmp_path / "parts").mkdir()
    suite = ds.run_suite(tmp_path, parts, timeouts={"slow": 8})
    got = {p["part"]: p for p in suite["parts"]}
    assert [p["part"] for p in suite["parts"]] == ["boom", "slow", "last"]
    assert got["boom"]["status"] == "failed" and got["boom"]["returncode"] == 3
    assert "partial" in "\n".join(got["boom"]["log_tail"])
    assert got["slow"]["status"] == "timeout" and got["slow"]["seconds"] < 20
    assert got["last"]["status"] == "ok" and "ran" in (tmp_path / "logs" / "last.log").read_text()
    kept = _rows(tmp_path / "ops.csv")
    assert [(r["part"], r["notes"]) for r in kept] == [("slow", "written before the timeout")]
    assert json.loads((tmp_path / "suite.json").read_text())["parts"] == suite["parts"]
