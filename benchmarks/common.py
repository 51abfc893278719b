"""Shared pieces of the benchmarks: timing, the environment record, option
parsing, and the result files of the device suite (``benchmarks/device_suite.py``).

Result files of one part ``NAME`` under an output folder ``OUT``:

- ``OUT/parts/NAME.csv``: one row per op x shape x dtype x implementation
  (columns ``CSV_COLUMNS``), appended and flushed as each figure is measured,
  so that a part stopped at its timeout keeps what it finished;
- ``OUT/NAME.json``: the environment (device, versions, date, exact command),
  the peaks used, notes and the part's details, rewritten on every change.

``merge_rows`` joins the parts' rows into ``OUT/ops.csv`` and fills each row's
speed-up against its baseline (the row of the same part, op, shape and dtype
whose impl the ``baseline`` column names).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from plumrec.io import read_json, write_text


def time_ms(fn: Callable[[], object], *, warmup: int = 3, iters: int = 10,
            device: str | torch.device = "cuda") -> float:
    """Median milliseconds of ``fn()``: CUDA events on a CUDA device,
    ``perf_counter`` elsewhere (never use the CPU interpreters for speed)."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def environment() -> dict:
    """Device, library versions and date, recorded beside every result."""
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
           "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["device"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        out["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        out["sm_count"] = props.multi_processor_count
    else:
        out["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return out


def command_line() -> str:
    """The exact command of this process, as typed (``python benchmarks/x.py --flag ...``)."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


# ----------------------------------------------------------------------------- device suite: timing

DATASHEET = {"device": "NVIDIA H200 SXM", "bf16_dense_tflops": 989.0, "hbm_gbps": 4800.0}
SMOKE_TIMER = "smoke (no timing)"


def rel_diff(a, b) -> float:
    """``||a - b|| / ||b||`` in float32."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def finite(out, *, allow_inf: bool = False):
    """``out`` unchanged; ``ValueError`` if any floating tensor in it (nested tuples/lists/dicts,
    NamedTuples) holds a NaN, or an infinity unless ``allow_inf`` (beam scores of empty slots are
    -inf by contract): the check before any timing."""
    for t in _tensors(out):
        if not t.is_floating_point():
            continue
        bad = torch.isnan(t).any() if allow_inf else ~torch.isfinite(t).all()
        if bool(bad):
            raise ValueError(f"{'NaN' if allow_inf else 'non-finite'} values in an output of shape "
                             f"{tuple(t.shape)} ({t.dtype})")
    return out


def _tensors(x) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)


class Timer:
    """Median milliseconds of a callable that has already run once (warm).

    CUDA: ``triton.testing.do_bench(..., return_mode="median")``, or with
    ``graph=True`` ``do_bench_cudagraph`` (for ops under ~100 us, where launch
    overhead would dominate), falling back to ``do_bench`` when the graph
    capture fails. CPU (``device="cpu"``, not smoke): ``time_ms`` with
    ``perf_counter``, for the torch reference paths only. Smoke: no timing at
    all (the interpreters are for correctness, never speed).

    ``__call__`` returns ``(ms or None, how it was timed)``.
    """

    def __init__(self, *, smoke: bool, device: str = "cuda", rep_ms: int = 100, warmup_ms: int = 25,
                 cpu_iters: int = 5):
        self.smoke, self.device, self.rep_ms, self.warmup_ms = smoke, torch.device(device), rep_ms, warmup_ms
        self.cpu_iters = cpu_iters

    def __call__(self, fn: Callable[[], object], *, graph: bool = False, rep_ms: int | None = None
                 ) -> tuple[float | None, str]:
        rep = rep_ms or self.rep_ms
        if self.smoke:
            return None, SMOKE_TIMER
        if self.device.type != "cuda":
            return time_ms(fn, warmup=1, iters=self.cpu_iters, device=self.device), "perf_counter (cpu)"
        from triton.testing import do_bench, do_bench_cudagraph

        how = "do_bench"
        if graph:
            try:
                return float(do_bench_cudagraph(fn, rep=rep, return_mode="median")), "do_bench_cudagraph"
            except Exception as e:  # noqa: BLE001 - capture unsupported by this callable: time it without
                _sync_quietly()
                how = f"do_bench (graph capture failed: {type(e).__name__}: {str(e)[:120]})"
        return float(do_bench(fn, warmup=self.warmup_ms, rep=rep, return_mode="median")), how


def _sync_quietly() -> None:
    try:
        torch.cuda.synchronize()
    except RuntimeError:
        pass


# ----------------------------------------------------------------------------- device suite: results

CSV_COLUMNS = ("part", "op", "shape", "dtype", "impl", "ms", "tflops", "gbps", "frac_peak_flops", "frac_peak_bw",
               "frac_roofline", "speedup", "baseline", "timer", "notes")


def shape_str(**fields) -> str:
    """Compact, parseable shape: ``shape_str(T=131072, D=128)`` -> ``"T=131072 D=128"``."""
    return " ".join(f"{k}={v}" for k, v in fields.items())


def parse_shape(text: str) -> dict[str, str]:
    """Inverse of ``shape_str`` (values stay strings)."""
    return dict(f.split("=", 1) for f in text.split() if "=" in f)


def load_peaks(out: Path) -> dict:
    """The ceilings the fractions of peak use: ``OUT/peaks.json`` from this run's ``peaks`` part
    (``bf16_tflops``, ``copy_gbps``), else the H200 datasheet, with ``source`` saying which."""
    path = Path(out) / "peaks.json"
    measured = {}
    if path.exists():
        try:
            measured = read_json(path).get("peaks", {})
        except (ValueError, AttributeError):  # damaged, or not an object: the datasheet's figures
            measured = {}
    tf, bw = measured.get("bf16_gemm_tflops"), measured.get("copy_gbps")
    return {"bf16_tflops": tf or DATASHEET["bf16_dense_tflops"], "copy_gbps": bw or DATASHEET["hbm_gbps"],
            "source": {"bf16_tflops": "measured (peaks part)" if tf else f"datasheet ({DATASHEET['device']})",
                       "copy_gbps": "measured (peaks part)" if bw else f"datasheet HBM ({DATASHEET['device']})"}}


def _write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, default=str))


def _write_csv(path: Path, rows: Iterable[dict]) -> None:
    """``CSV_COLUMNS`` and one line per row, written atomically (a run stopped mid-way keeps the last full file)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows({c: _fmt(r.get(c, "")) for c in CSV_COLUMNS} for r in rows)
    write_text(path, buf.getvalue())


class Recorder:
    """Results of one part: CSV rows appended as measured, a JSON record rewritten on every change.

    ``row()`` derives TFLOP/s, GB/s and the fractions of the peaks (``load_peaks``)
    from ``ms``, ``flops`` and ``nbytes``; ``ms=None`` (smoke, or unavailable)
    leaves every figure empty."""

    def __init__(self, out: str | Path, name: str, *, part: str | None = None, smoke: bool = False):
        self.out, self.name, self.part, self.smoke = Path(out), name, part or name, smoke
        (self.out / "parts").mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out / "parts" / f"{name}.csv"
        self.json_path = self.out / f"{name}.json"
        self.peaks = load_peaks(self.out)
        self.rows: list[dict] = []
        self.record = {**environment(), "command": command_line(), "part": self.part, "smoke": smoke,
                       "peaks_used": self.peaks, "notes": [], "rows": 0}
        _write_csv(self.csv_path, self.rows)
        self.save()

    def row(self, op: str, shape: str, dtype: str, impl: str, ms: float | None, *, flops: float | None = None,
            nbytes: float | None = None, roofline_ms: float | None = None, baseline: str = "", timer: str = "",
            notes: str = "") -> dict:
        """Append one row (and flush it to disk)."""
        r = dict.fromkeys(CSV_COLUMNS, "")
        r.update(part=self.part, op=op, shape=shape, dtype=dtype, impl=impl, baseline=baseline, timer=timer,
                 notes=notes)
        if ms is not None and ms > 0:
            r["ms"] = ms
            if flops:
                r["tflops"] = flops / ms / 1e9
                r["frac_peak_flops"] = r["tflops"] / self.peaks["bf16_tflops"]
            if nbytes:
                r["gbps"] = nbytes / ms / 1e6
                r["frac_peak_bw"] = r["gbps"] / self.peaks["copy_gbps"]
            if roofline_ms:
                r["frac_roofline"] = roofline_ms / ms
        self.rows.append(r)
        _write_csv(self.csv_path, self.rows)
        self.record["rows"] = len(self.rows)
        self.save()
        shown = f"{ms:.4f} ms" if isinstance(ms, float) else (timer or "no timing")
        print(f"[{self.part}] {op} | {shape} | {dtype} | {impl}: {shown} {notes}", flush=True)
        return r

    def note(self, text: str) -> None:
        """A remark for the JSON record (an unavailable baseline, a fallback taken)."""
        self.record["notes"].append(text)
        print(f"[{self.part}] note: {text}", flush=True)
        self.save()

    def set(self, key: str, value) -> None:
        self.record[key] = value
        self.save()

    def save(self) -> None:
        _write_json(self.json_path, self.record)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def merge_rows(out: Path, part_names: Iterable[str]) -> list[dict]:
    """Join ``OUT/parts/<name>.csv`` (in ``part_names`` order) into ``OUT/ops.csv``, filling ``speedup``
    = baseline ms / row ms for rows whose baseline was timed in the same part, op, shape and dtype."""
    out = Path(out)
    rows: list[dict] = []
    for name in part_names:
        path = out / "parts" / f"{name}.csv"
        if path.exists():
            rows += read_rows(path)
    ms = {(r["part"], r["op"], r["shape"], r["dtype"], r["impl"]): r["ms"] for r in rows}
    for r in rows:
        base = ms.get((r["part"], r["op"], r["shape"], r["dtype"], r["baseline"])) if r["baseline"] else None
        if base and r["ms"]:
            r["speedup"] = _fmt(float(base) / float(r["ms"]))
    _write_csv(out / "ops.csv", rows)
    return rows


def suite_args(parser, name: str) -> None:
    """The options every part of the device suite takes: ``--out DIR``, ``--name``, ``--smoke``."""
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"),
                        help="output folder: parts/NAME.csv rows and NAME.json (default benchmarks/out)")
    parser.add_argument("--name", default=name,
                        help=f"file name of this part's results (default {name or 'the section name'})")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny sizes, Triton kernels through the interpreter (TRITON_INTERPRET=1 is set "
                             "before triton is imported); runs every code path, reports no speed figures")


def suite_parser(argv: list[str] | None, name: str | None, description: str) -> argparse.ArgumentParser:
    """The argument parser of a device-suite part (:func:`suite_args`), after setting ``TRITON_INTERPRET=1``
    when ``--smoke`` is among ``argv`` (before triton is imported)."""
    enable_interpreter_if_smoke(argv)
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    suite_args(p, name)
    return p


def suite_device(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """``"cpu"`` with ``--smoke``, else ``"cuda"``; refuses (``p.error``) a run without CUDA unless ``--smoke``."""
    if not args.smoke and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (use --smoke on the CPU)")
    return "cpu" if args.smoke else "cuda"


def suite_setup(argv: list[str] | None, part: str, description: str
                ) -> tuple[argparse.Namespace, str, Recorder, Timer]:
    """Entry point of a one-part benchmark script: ``(args, device, recorder, timer)`` from the suite options
    (:func:`suite_parser`, :func:`suite_device`)."""
    p = suite_parser(argv, part, description)
    args = p.parse_args(argv)
    device = suite_device(p, args)
    return args, device, Recorder(args.out, args.name, part=part, smoke=args.smoke), Timer(smoke=args.smoke,
                                                                                            device=device)


def sections_main(argv: list[str] | None, description: str, sections: dict[str, str],
                  run_section: Callable[[str, argparse.Namespace, str], dict]) -> dict:
    """Entry point of a benchmark script whose parts are sections: parse the
    suite options plus ``--section NAME|all`` (``sections``: name -> help),
    refuse a run without CUDA unless ``--smoke``, then ``run_section(name,
    args, device)`` for each chosen section. Returns ``{section: record}``."""
    p = suite_parser(argv, None, description)
    p.add_argument("--section", choices=(*sections, "all"), default="all",
                   help="; ".join(f"{k}: {v}" for k, v in sections.items()) + " (default all)")
    args = p.parse_args(argv)
    if args.section == "all" and args.name:
        p.error("--name needs a single --section")
    device = suite_device(p, args)
    chosen = tuple(sections) if args.section == "all" else (args.section,)
    return {s: run_section(s, args, device) for s in chosen}


def enable_interpreter_if_smoke(argv: list[str] | None) -> None:
    """Set ``TRITON_INTERPRET=1`` when ``--smoke`` is among the arguments (before triton is imported)."""
    args = sys.argv[1:] if argv is None else argv
    if "--smoke" in args:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def try_part(rec: Recorder, label: str, fn: Callable[[], object]) -> object:
    """Run one section of a part; an exception is recorded as a note (with its type and message)
    and the part goes on with its next section."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one failing section must not hide the others
        import traceback

        traceback.print_exc()
        rec.note(f"{label} failed: {type(e).__name__}: {str(e)[:300]}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def record_autotune(rec: Recorder) -> None:
    """The autotuners' choices into the part's JSON, where the kernels expose them
    (``plum_kernels._autotune.chosen_configs()``)."""
    try:
        from plum_kernels import _autotune

        rec.set("autotune_chosen_configs", _autotune.chosen_configs())
    except (ImportError, AttributeError) as e:
        rec.set("autotune_chosen_configs", f"not exposed by the kernels ({type(e).__name__})")
