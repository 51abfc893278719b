"""Markdown report of a device-suite output folder (``benchmarks/device_suite.py``).

    python benchmarks/device_report.py OUT                               # print the report
    python benchmarks/device_report.py OUT --write benchmarks/RESULTS.md # replace its device-suite section

The report: the device, library versions, date and exact command; each
part's status; the targets (``TARGETS``: each kernel's goal on an H200) with
measured / target / met; the kernel check against float64; then one short
table per op (shape, impl, ms, TFLOP/s or GB/s, fraction of the peaks
measured in the same run, speed-up against the part's baseline). ``--write`` replaces only the text between
``BEGIN`` and ``END`` (two HTML comments) in the given file.

``make_plots(OUT)`` draws ``OUT/attention_tflops.png`` and
``OUT/grouped_matmul_ratio.png`` (matplotlib, optional).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path
from typing import Callable

BEGIN = "<!-- device-suite:begin -->"
END = "<!-- device-suite:end -->"
DATASHEET_TFLOPS = 989.0
FLEX = "flex (document mask)"


# ----------------------------------------------------------------------------- loading


def load(out: Path) -> dict:
    """``rows`` (ops.csv), ``suite`` (suite.json), ``parts`` ({name: part JSON}), ``check`` (check.json)."""
    out = Path(out)
    rows = []
    if (out / "ops.csv").exists():
        with open(out / "ops.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    suite = _json(out / "suite.json") or {}
    parts = {p.stem: _json(p) for p in sorted(out.glob("*.json")) if p.stem not in ("suite", "check")}
    return {"rows": rows, "suite": suite, "parts": {k: v for k, v in parts.items() if v}, "check": _json(
        out / "check.json")}


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def num(v) -> float | None:
    try:
        return float(v) if v not in ("", None) else None
    except ValueError:
        return None


def shape_fields(shape: str) -> dict[str, str]:
    return dict(f.split("=", 1) for f in shape.split() if "=" in f)


# ----------------------------------------------------------------------------- targets


def _pick(rows, part: str, op: str, impl: Callable[[str], bool], **shape) -> list[dict]:
    return [r for r in rows if r["part"] == part and r["op"] == op and impl(r["impl"])
            and all(shape_fields(r["shape"]).get(k) == str(v) for k, v in shape.items())]


def _best(rows) -> dict | None:
    timed = [r for r in rows if num(r["ms"])]
    return min(timed, key=lambda r: num(r["ms"])) if timed else None


def _attention_target(rows, mode: str, ratio: float, tflops: float | None) -> dict:
    sel = dict(set="long", D=128)
    ours = _best(_pick(rows, "attention", f"history_attention {mode}", lambda i: i.startswith("plum"), **sel))
    flex = _best(_pick(rows, "attention", f"history_attention {mode}", lambda i: i == FLEX, **sel))
    if not ours or not flex:
        return {"measured": "not measured", "met": None}
    x = num(flex["ms"]) / num(ours["ms"])
    t = num(ours["tflops"]) or 0.0
    met = x >= ratio and (tflops is None or t >= tflops)
    return {"measured": f"{x:.2f}x Flex, {t:.0f} TFLOP/s ({ours['impl']})", "met": met}


def _min_speedup(rows, part: str, op_prefix: str, impl: str, ratio: float) -> dict:
    sel = [r for r in rows if r["part"] == part and r["op"].startswith(op_prefix) and r["impl"] == impl]
    if not sel:
        return {"measured": "not measured", "met": None}
    got = [(num(r["speedup"]), r) for r in sel]
    missing = sum(x is None for x, _ in got)
    if missing == len(got):
        return {"measured": "not measured", "met": None}
    if missing:
        return {"measured": f"{missing} of {len(got)} rows without a ratio", "met": False}
    x, r = min(got, key=lambda g: g[0])
    return {"measured": f"min {x:.2f}x over {len(got)} rows (at {r['op']}, {r['shape']})", "met": x >= ratio}


def _decode_target(rows) -> dict:
    sel = [r for r in rows if r["part"] == "decode" and r["impl"] == "plum triton"]
    sp = [num(r["speedup"]) for r in sel]
    roof = [num(r["frac_roofline"]) for r in sel]
    if not sel or any(v is None for v in sp + roof):
        return {"measured": "not measured", "met": None}
    return {"measured": f"min {min(sp):.1f}x copy, min {min(roof):.0%} of roofline over {len(sel)} shapes",
            "met": min(sp) >= 10 and min(roof) >= 0.7}


def _beam_target(rows) -> dict:
    r = _best(_pick(rows, "beam", "constrained_beam_step", lambda i: i == "plum triton", items=20000000, B=2, W=70))
    if not r:
        return {"measured": "not measured", "met": None}
    return {"measured": f"{num(r['ms']):.4f} ms per step", "met": num(r["ms"]) <= 0.033}


def _mfu_target(rows) -> dict:
    sel = [r for r in rows if r["part"] == "train_step" and r["impl"] == "triton"
           and shape_fields(r["shape"]).get("preset") == "plum-110m" and num(r["tflops"])]
    if not sel:
        return {"measured": "not measured", "met": None}
    t, frac = num(sel[0]["tflops"]), num(sel[0]["frac_peak_flops"])
    return {"measured": f"{t / DATASHEET_TFLOPS:.1%} of 989 TFLOP/s ({frac:.1%} of the measured peak)",
            "met": t / DATASHEET_TFLOPS >= 0.35}


TARGETS: list[tuple[str, str, Callable[[list[dict]], dict]]] = [
    ("history_attention fwd, bf16, D 128, causal, every length 8k (16 x 8192)", ">= 1.3x FlexAttention and "
     ">= 450 TFLOP/s", lambda rows: _attention_target(rows, "fwd", 1.3, 450.0)),
    ("history_attention bwd, same shape", ">= 1.2x FlexAttention's backward",
     lambda rows: _attention_target(rows, "bwd", 1.2, None)),
    ("grouped_matmul fwd / dx / dw, every listed shape", ">= 1.0x torch._grouped_mm",
     lambda rows: _min_speedup(rows, "moe", "grouped_matmul", "plum triton", 1.0)),
    ("MoE SwiGLU layer fwd+bwd, every listed shape", ">= 1.2x the torch._grouped_mm layer",
     lambda rows: _min_speedup(rows, "moe", "moe_mlp fwd+bwd", "plum triton", 1.2)),
    ("beam_decode_attention, every listed shape", ">= 10x per-beam copy and >= 70% of its roofline", _decode_target),
    ("constrained_beam_step, B 2 x W 70, 20M SIDs, PLUM codebooks", "<= 0.033 ms per step", _beam_target),
    ("SFT step, plum-110m, Triton kernels", "MFU >= 35% (of 989 TFLOP/s)", _mfu_target),
]


def target_table(rows: list[dict] | None) -> list[str]:
    """The ``TARGETS`` table; with ``rows`` None, the targets alone (nothing measured)."""
    if rows is None:
        lines = ["| target | goal (H200, ratios against baselines in the same run) |", "|---|---|"]
        return lines + [f"| {name} | {goal} |" for name, goal, _ in TARGETS]
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for name, goal, fn in TARGETS:
        res = fn(rows)
        met = {True: "yes", False: "**no**", None: "-"}[res["met"]]
        lines.append(f"| {name} | {res['measured']} | {goal} | {met} |")
    return lines


# ----------------------------------------------------------------------------- tables


def _environment(data: dict) -> dict:
    for name in ("peaks", "attention", "moe", "decode", "routing", "beam", "train_step"):
        if name in data["parts"]:
            return data["parts"][name]
    return data["check"] or {}


def header(data: dict) -> list[str]:
    env, suite = _environment(data), data["suite"]
    peaks = (data["parts"].get("peaks") or {}).get("peaks") or {}
    lines = []
    if suite.get("smoke") or env.get("smoke"):
        lines += ["**Smoke run (CPU, Triton interpreter): code paths only, no speed figures.**", ""]
    lines += [f"- Device: {env.get('device', '?')}" + (f" (sm {env['capability']}, {env.get('gpu_memory_gib')} GiB, "
                                                        f"{env.get('sm_count')} SMs)" if env.get("capability") else ""),
              f"- Versions: torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
              f"CUDA {env.get('cuda', '-')}, Python {env.get('python', '?')}",
              f"- Date: {suite.get('date') or env.get('date', '?')}",
              f"- Command: `{suite.get('command', '?')}`"]
    if peaks.get("bf16_gemm_tflops"):
        lines.append(f"- Peaks measured in this run: bf16 GEMM 8192^3 {peaks['bf16_gemm_tflops']:.0f} TFLOP/s "
                     f"({peaks['bf16_gemm_tflops'] / DATASHEET_TFLOPS:.0%} of the 989 datasheet), device copy "
                     f"{peaks.get('copy_gbps') or 0:.0f} GB/s (read + write)")
    return lines


def parts_table(suite: dict) -> list[str]:
    lines = ["| part | status | seconds | timeout s |", "|---|---|---|---|"]
    for p in suite.get("parts", []):
        lines.append(f"| {p['part']} | {p['status']} | {p.get('seconds', '-')} | {p.get('timeout_s', '-')} |")
    return lines


def check_table(check: dict | None) -> list[str]:
    if not check:
        return ["No kernel check in this run."]
    done = check.get("complete", True)
    lines = [f"All cases within budget: {'yes' if check.get('ok') else '**no**'}" if done else
             f"**Stopped after {len(check.get('cases', []))} cases** (the part's timeout); the cases it finished:", "",
             "| case | dtype | worst rel. error | budget | ok |", "|---|---|---|---|---|"]
    for c in check.get("cases", []):
        errs = [v for k, v in c.items() if isinstance(v, float) and k not in ("budget", "seconds")]
        worst = f"{max(errs):.1e}" if errs else c.get("error", "-")[:80]
        lines.append(f"| {c['case']} | {c['dtype']} | {worst} | {c['budget']:g} | {'yes' if c['ok'] else '**no**'} |")
    return lines


def _f(v, spec: str) -> str:
    x = num(v)
    return "-" if x is None else format(x, spec)


def op_tables(rows: list[dict]) -> list[str]:
    """One table per (part, op), rows in measurement order."""
    lines: list[str] = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["part"], r["op"]), []).append(r)
    for (part, op), rs in groups.items():
        base = next((r["baseline"] for r in rs if r["baseline"]), "")
        lines += ["", f"#### {part}: {op}" + (f" (baseline: {base})" if base else ""), "",
                  "| shape | impl | ms | TFLOP/s | GB/s | % peak FLOP/s | % copy BW | x baseline | notes |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            notes = r["notes"] if num(r["ms"]) else (r["timer"] + ("; " + r["notes"] if r["notes"] else ""))
            lines.append(f"| {r['shape']} | {r['impl']} | {_f(r['ms'], '.4f')} | {_f(r['tflops'], '.1f')} "
                         f"| {_f(r['gbps'], '.0f')} | {_pct(r['frac_peak_flops'])} | {_pct(r['frac_peak_bw'])} "
                         f"| {_f(r['speedup'], '.2f')} | {notes[:160].replace('|', '/')} |")
    return lines


def _pct(v) -> str:
    x = num(v)
    return "-" if x is None else f"{x:.0%}"


def render(out: Path) -> str:
    """The whole report of ``OUT`` as markdown (no top-level heading: it goes under one)."""
    data = load(out)
    lines = header(data) + ["", "Parts:", ""] + parts_table(data["suite"])
    lines += ["", "### Targets", ""] + target_table(data["rows"])
    lines += ["", "### Kernel check against float64 (`check_kernels.py`)", ""] + check_table(data["check"])
    lines += ["", "### Every op"] + op_tables(data["rows"])
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a kill leaves the old or the new
    file, never a torn one (standard library only: this module runs before the package is installed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_section(path: Path, body: str) -> None:
    """Replace the text between ``BEGIN`` and ``END`` in ``path`` by ``body``; the rest stays as it is."""
    text = Path(path).read_text()
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"{path} has no section between {BEGIN!r} and {END!r}")
    write_atomic(path, text[:i + len(BEGIN)] + "\n" + body.rstrip("\n") + "\n" + text[j:])


# ----------------------------------------------------------------------------- plots


def make_plots(out: Path) -> list[str] | str:
    """PNG plots of the timed rows; the files written, or why there are none."""
    rows = load(out)["rows"]
    if not any(num(r["ms"]) for r in rows):
        return "no timed rows (smoke run or nothing measured): no plots"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plots"
    files = []
    for name, fn in (("attention_tflops.png", _plot_attention), ("grouped_matmul_ratio.png", _plot_gmm)):
        fig = fn(plt, rows)
        if fig is not None:
            fig.savefig(Path(out) / name, dpi=110, bbox_inches="tight")
            plt.close(fig)
            files.append(name)
    return files


def _plot_attention(plt, rows):
    """TFLOP/s of every implementation per (length set, head dim), forward and forward + backward."""
    timed = [r for r in rows if r["part"] == "attention" and r["op"].startswith("history_attention")
             and num(r["tflops"])]
    if not timed:
        return None
    impls = list(dict.fromkeys(r["impl"] for r in timed))    # one colour per impl in both panels
    cases = list(dict.fromkeys(_case(r) for r in timed))
    width = 0.8 / len(impls)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for k, impl in enumerate(impls):
            vals = {_case(r): num(r["tflops"]) for r in timed if r["impl"] == impl
                    and r["op"] == f"history_attention {mode}"}
            ax.bar([i + k * width for i in range(len(cases))], [vals.get(c, 0.0) for c in cases], width,
                   label=impl, color=f"C{k}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases)
        ax.set_title(f"history_attention {mode}")
        ax.set_ylabel("TFLOP/s (real tokens)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, -0.08))
    return fig


def _case(r) -> str:
    s = shape_fields(r["shape"])
    return f"{s.get('set')} D{s.get('D')}"


def _plot_gmm(plt, rows):
    """Speed-up of our grouped matmul over torch._grouped_mm per shape and direction."""
    sel = [r for r in rows if r["part"] == "moe" and r["op"].startswith("grouped_matmul") and r["impl"] == "plum triton"
           and num(r["speedup"])]
    if not sel:
        return None
    fig, ax = plt.subplots(figsize=(13, 4.5))
    labels = [f"{r['op'].split()[1]} {shape_fields(r['shape']).get('proj')} {shape_fields(r['shape']).get('case')}"
              for r in sel]
    ax.bar(range(len(sel)), [num(r["speedup"]) for r in sel])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(sel)), labels, rotation=75, fontsize=7)
    ax.set_ylabel("x torch._grouped_mm")
    ax.set_title("grouped_matmul speed-up: torch._grouped_mm time / plum triton time")
    return fig


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the device suite's output folder")
    p.add_argument("--write", metavar="RESULTS_MD", help=f"replace the section between {BEGIN} and {END} of this "
                                                         "file with the report (the rest stays)")
    args = p.parse_args(argv)
    if not Path(args.out).is_dir():
        p.error(f"{args.out} is not a folder")
    text = render(Path(args.out))
    if args.write:
        write_section(Path(args.write), text)
    print(text)
    return text


if __name__ == "__main__":
    main()
