"""The device suite: every GPU benchmark of the package in one call, inside a fixed time budget.

    bash benchmarks/device_suite.sh OUT                      # on the GPU machine: build, then this
    python benchmarks/device_suite.py --out OUT              # every part (CUDA)
    python benchmarks/device_suite.py --dry-run              # the parts, their estimates and timeouts
    python benchmarks/device_suite.py --smoke --out OUT      # CPU: every part, tiny, interpreter, no timings
    python benchmarks/device_suite.py --out OUT --only attention,moe

Each part runs as its own subprocess (its own Python, its own CUDA context)
under its own timeout, in a new session so that a timeout ends its whole
process group (compile workers included). A part writes its rows as it
measures them, so a part stopped at its timeout keeps what it finished, and
the next part still runs. The timeouts add up to at most ``BUDGET_S``
seconds and the whole call stays inside that budget (a part gets no more than
what is left of it). After every part the suite rewrites ``OUT/ops.csv``
(all rows, with speed-ups against each part's baseline) and ``OUT/suite.json``
(each part's status, seconds and log tail); at the end it writes
``OUT/report.md`` and the plots (``benchmarks/device_report.py``).

Output folder:

- ``ops.csv``: part, op, shape, dtype, impl, ms, tflops, gbps,
  frac_peak_flops, frac_peak_bw, frac_roofline, speedup, baseline, timer, notes;
- ``<part>.json``: environment (device, torch / triton / CUDA versions, date,
  exact command), peaks used, notes, details (``check.json`` is
  ``check_kernels.py``'s report);
- ``parts/<part>.csv``, ``logs/<part>.log``, ``suite.json``, ``report.md``, ``*.png``.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_report import write_atomic  # noqa: E402

BUDGET_S = 540          # the whole suite: 9 minutes of a 10-minute device call (the build comes first)
FINISH_S = 10           # kept back from the parts for ops.csv, the report and the plots
KILL_GRACE_S = 3        # SIGTERM, then SIGKILL this much later (inside the part's timeout)


@dataclass(frozen=True)
class Part:
    """One subprocess of the suite: ``python ARGV...``, plus ``--smoke`` and ``smoke_argv`` in smoke
    mode; ``{out}`` in ``argv`` is the output folder, ``{name}`` the part's name."""
    name: str
    argv: tuple[str, ...]
    estimate_s: int
    timeout_s: int
    what: str
    smoke_argv: tuple[str, ...] = ()

    def command(self, out: Path, smoke: bool) -> list[str]:
        argv = [a.format(out=out, name=self.name) for a in self.argv]
        return [sys.executable, *argv, *(["--smoke", *self.smoke_argv] if smoke else [])]


def _suite_part(script: str, *extra: str) -> tuple[str, ...]:
    """``benchmarks/SCRIPT EXTRA... --out {out} --name {name}``: the options every part script takes."""
    return (f"benchmarks/{script}", *extra, "--out", "{out}", "--name", "{name}")


PARTS: tuple[Part, ...] = (
    Part("check", ("benchmarks/check_kernels.py", "--out", "{out}/check.json"), 40, 60,
         "every Triton op against its float64 reference on this GPU, full size", ("--first-per-family",)),
    Part("peaks", _suite_part("peaks.py"), 12, 20,
         "bf16 GEMM 8192^3 TFLOP/s and a 4 GiB device copy GB/s: the ceilings of every fraction"),
    Part("attention", _suite_part("bench_attention.py"), 115, 150,
         "history_attention fwd / bwd / fwd+bwd vs FlexAttention, varlen_attn, SDPA, FA2/FA3"),
    Part("decode", _suite_part("bench_decode.py"), 25, 35,
         "beam_decode_attention vs per-beam copy and beams-as-rows SDPA; roofline fraction"),
    Part("moe", _suite_part("bench_moe.py", "--section", "moe"), 60, 80,
         "grouped_matmul fwd / dx / dw and the SwiGLU layer vs torch._grouped_mm"),
    Part("routing", _suite_part("bench_moe.py", "--section", "routing"), 15, 25,
         "moe_route / moe_permute / moe_unpermute GB/s vs the torch reference"),
    Part("beam", _suite_part("bench_beam.py", "--items", "1000000", "20000000",
                             "--pairs", "2x70", "64x64", "1024x64", "--no-static"), 55, 75,
         "constrained_beam_step (plain and with an edge bias) vs dense-mask top-k and CSR torch; trie_aggregate; "
         "1M / 20M SIDs"),
    Part("train_step", _suite_part("bench_train_step.py"), 55, 75,
         "SFT step of plum-110m and medium, Triton vs reference kernels: tokens/s, MFU"),
)


def part_names(parts=PARTS) -> list[str]:
    return [p.name for p in parts]


# ----------------------------------------------------------------------------- running


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the part's process group, SIGKILL it ``KILL_GRACE_S`` later if still there."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_part(part: Part, out: Path, smoke: bool, timeout_s: float) -> dict:
    """Run one part under ``timeout_s``; stdout and stderr go to ``OUT/logs/<part>.log``.
    Returns its record: status ok | failed | timeout, exit code, seconds, the log's tail."""
    log = out / "logs" / f"{part.name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if smoke:
        env["TRITON_INTERPRET"] = "1"   # before triton is imported in the part
    cmd = part.command(out, smoke)
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s - KILL_GRACE_S))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
        kill_group(proc)   # a timeout's whole group; after a normal exit, any stray child it left
    seconds = round(time.monotonic() - t0, 1)
    tail = log.read_text(errors="replace").splitlines()[-15:]
    print(f"[suite] {part.name}: {status} (rc {rc}) in {seconds} s of {timeout_s:.0f} s", flush=True)
    return {"part": part.name, "status": status, "returncode": rc, "seconds": seconds,
            "timeout_s": round(timeout_s), "estimate_s": part.estimate_s, "command": shlex.join(cmd),
            "log": str(log.relative_to(out)), "log_tail": tail}


def versions() -> dict:
    """Library versions without importing them (the parts record the device themselves)."""
    out = {"python": platform.python_version()}
    for lib in ("torch", "triton", "jax", "numpy", "matplotlib"):
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


def run_suite(out: Path, parts=PARTS, *, smoke: bool = False, budget_s: float = BUDGET_S,
              timeouts: dict[str, float] | None = None, argv: list[str] | None = None) -> dict:
    """Run ``parts`` in order inside ``budget_s``; ``timeouts`` overrides a part's timeout.
    Writes ``suite.json`` and ``ops.csv`` after every part, then the report and plots."""
    start = time.monotonic()
    from common import merge_rows  # imports torch: inside the budget

    out = Path(out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    suite = {"command": shlex.join([Path(sys.executable).name, *(sys.argv if argv is None else argv)]),
             "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "smoke": smoke, "budget_s": budget_s,
             "versions": versions(), "parts": []}
    for part in parts:
        left = budget_s - FINISH_S - (time.monotonic() - start)
        timeout = min((timeouts or {}).get(part.name, part.timeout_s), left)
        if left < 5:
            rec = {"part": part.name, "status": "skipped", "reason": f"{left:.0f} s left of the budget",
                   "timeout_s": 0, "estimate_s": part.estimate_s}
        else:
            rec = run_part(part, out, smoke, timeout)
        suite["parts"].append(rec)
        suite["seconds"] = round(time.monotonic() - start, 1)
        write_atomic(out / "suite.json", json.dumps(suite, indent=1))
        merge_rows(out, part_names(parts))
    finish_report(out, suite)
    suite["seconds"] = round(time.monotonic() - start, 1)
    write_atomic(out / "suite.json", json.dumps(suite, indent=1))
    return suite


def finish_report(out: Path, suite: dict) -> None:
    """``OUT/report.md`` and the plots; a failure here is recorded, never fatal."""
    try:
        import device_report

        suite["plots"] = device_report.make_plots(out)
        write_atomic(out / "report.md", device_report.render(out))
    except Exception as e:  # noqa: BLE001 - the rows are already on disk
        suite["report_error"] = f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- command line


def dry_run(parts=PARTS, timeouts: dict[str, float] | None = None) -> str:
    """The table of parts with their estimated device seconds and timeouts, and the totals."""
    lines = [f"{'part':<11} {'estimate s':>10} {'timeout s':>9}  what", "-" * 100]
    for p in parts:
        t = (timeouts or {}).get(p.name, p.timeout_s)
        lines.append(f"{p.name:<11} {p.estimate_s:>10} {t:>9.0f}  {p.what}")
        lines.append(f"{'':<11} {'':>10} {'':>9}  $ {shlex.join(p.command(Path('OUT'), False)[1:])}")
    est = sum(p.estimate_s for p in parts)
    tot = sum((timeouts or {}).get(p.name, p.timeout_s) for p in parts)
    lines += ["-" * 100, f"{'total':<11} {est:>10} {tot:>9.0f}  (budget {BUDGET_S} s, of which {FINISH_S} s for "
              f"the report; plus the install and C++ build in device_suite.sh)"]
    return "\n".join(lines)


def parse_timeouts(p: argparse.ArgumentParser, items: list[str], names: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, sec = item.partition("=")
        if name not in names or not sec.replace(".", "", 1).isdigit():
            p.error(f"--timeout takes PART=SECONDS with PART one of {names}, got {item!r}")
        out[name] = float(sec)
    return out


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (created); required unless --dry-run")
    p.add_argument("--dry-run", action="store_true", help="list the parts, their estimated device seconds and "
                                                          "timeouts, and the totals; run nothing")
    p.add_argument("--smoke", action="store_true", help="every part on the CPU at tiny sizes, Triton kernels "
                                                        "through the interpreter; no speed figures")
    p.add_argument("--only", help="comma-separated parts to run, in the suite's order (default all)")
    p.add_argument("--timeout", action="append", default=[], metavar="PART=SECONDS",
                   help="override one part's timeout (repeatable); the total budget still holds")
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for the whole call (default {BUDGET_S})")
    args = p.parse_args(argv)
    names = part_names()
    only = [n for n in (args.only or "").split(",") if n]
    bad = [n for n in only if n not in names]
    if bad:
        p.error(f"--only: unknown part(s) {bad}; parts are {names}")
    parts = [q for q in PARTS if not only or q.name in only]
    timeouts = parse_timeouts(p, args.timeout, names)
    if args.dry_run:
        print(dry_run(parts, timeouts))
        return None
    if not args.out:
        p.error("--out is required (or use --dry-run)")
    suite = run_suite(Path(args.out), parts, smoke=args.smoke, budget_s=args.budget, timeouts=timeouts,
                      argv=argv if argv is None else [sys.argv[0], *argv])
    print(f"[suite] done in {suite['seconds']} s: " + ", ".join(f"{r['part']} {r['status']}" for r in suite["parts"]))
    return suite


if __name__ == "__main__":
    main()
