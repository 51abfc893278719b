"""Check every Triton op against its reference in float64 on this machine's GPU.

    python benchmarks/check_kernels.py                  # CUDA: writes benchmarks/out/check_kernels.json
    python benchmarks/check_kernels.py --smoke          # CPU: tiny sizes through the Triton interpreter

The ``check`` part of the device suite (``benchmarks/device_suite.py``) runs
it with ``--out OUT/check.json``; the report is rewritten after every case,
with the environment (device, versions, date) and the exact command.

The test suite checks the kernels through the Triton interpreter on the CPU;
this script runs the compiled kernels on a real GPU, at the sizes the Beauty
benchmark and PLUM's presets use, before anything is timed or trained there.
Each case compares ``impl="triton"`` with the op's reference computed in
float64 on the same device, forward and backward where the op has one, as the
relative Frobenius error ``||x - ref|| / ||ref||`` against the budget of the
project's standards (1e-4 for float32, 1e-2 for bf16 / fp16). The beam search
must return the reference's SIDs exactly. One failing case does not stop the
others; the exit status is 1 when any case fails.

The kernels run their default tiles (``plum_kernels.torch.set_autotune(False)``):
autotuning every space at every case would take minutes of compilation, and
each configuration of the spaces is checked against float64 by the test
suite (``tests/kernels/attention/test_ops_torch.py``, ``tests/kernels/moe/test_triton.py``).
``--autotune`` checks the tiles the autotuner picks instead.

Cases:
- ``history_attention`` forward + backward (out, dq, dk, dv): GQA 6 -> 3,
  head dim 64 and 128, causal and not, jagged lengths with empty and
  length-1 sequences, fp32 / bf16 / fp16; the backward with dQ by atomics
  (``deterministic=False``) too;
- ``beam_decode_attention``: B users x W beams over prefixes of 0..S tokens
  plus a 3-token suffix;
- ``moe_mlp`` forward + backward (out, dx, d router logits, both weights,
  through the load-balance and z losses): 4 experts top-2 (the ``medium``
  preset) and 32 experts top-4 (``plum-110m``);
- ``constrained_beam_search``: 12,101 random SIDs over 256/128/64/32 codes
  (Beauty's catalogue size), W 20 and 64.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUDGET = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}


def rel_err(x, ref) -> float:
    """``||x - ref|| / ||ref||`` in float64 (inf when x is not finite)."""
    import torch

    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def _gen(dev, seed):
    import torch

    return torch.Generator(device=dev).manual_seed(seed)


def check_history_attention(dev, dtype, d, causal, lens, deterministic=True, hq=6, hkv=3) -> dict:
    import torch

    import plum_kernels.torch as K
    from plum_kernels.attention.reference import history_attention_reference

    g = _gen(dev, 0)
    cu = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32, device=dev)
    t = int(cu[-1])
    q, k, v = (torch.randn(t, h, d, generator=g, device=dev).to(dtype).requires_grad_() for h in (hq, hkv, hkv))
    do = torch.randn(t, hq, d, generator=g, device=dev).to(dtype)
    out = K.history_attention(q, k, v, cu, max(lens), causal=causal, impl="triton", deterministic=deterministic)
    grads = torch.autograd.grad(out, (q, k, v), do)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, _ = history_attention_reference(*leaves, cu, causal=causal)
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    return {"out": rel_err(out, ref), **{n: rel_err(a, b) for n, a, b in zip(("dq", "dk", "dv"), grads, ref_grads)}}


def check_beam_decode_attention(dev, dtype, d, B, W, S, prefix_lens, s=4, suffix_len=3, hq=6, hkv=3) -> dict:
    import torch

    import plum_kernels.torch as K
    from plum_kernels.attention.reference import beam_decode_attention_reference

    g = _gen(dev, 1)
    q = torch.randn(B, W, hq, d, generator=g, device=dev).to(dtype)
    kp, vp = (torch.randn(B, S, hkv, d, generator=g, device=dev).to(dtype) for _ in range(2))
    ks, vs = (torch.randn(B, W, s, hkv, d, generator=g, device=dev).to(dtype) for _ in range(2))
    pl = torch.tensor(prefix_lens, dtype=torch.int32, device=dev)
    out = K.beam_decode_attention(q, kp, vp, pl, ks, vs, suffix_len, impl="triton")
    ref = beam_decode_attention_reference(q.double(), kp.double(), vp.double(), pl, ks.double(), vs.double(),
                                          suffix_len)
    return {"out": rel_err(out, ref)}


def check_moe_mlp(dev, dtype, T, d, E, f, k) -> dict:
    import torch

    import plum_kernels.torch as K

    g = _gen(dev, 2)
    x = torch.randn(T, d, generator=g, device=dev).to(dtype)
    logits = torch.randn(T, E, generator=g, device=dev) * 1.5
    wg = (torch.randn(E, d, 2 * f, generator=g, device=dev) / d ** 0.5).to(dtype)
    wd = (torch.randn(E, f, d, generator=g, device=dev) / f ** 0.5).to(dtype)
    cot = torch.randn(T, d, generator=g, device=dev, dtype=torch.float64)

    def run(leaves, impl):
        o = K.moe_mlp(*leaves, k, impl=impl)
        loss = (o.out.double() * cot).sum() + 0.3 * o.load_balance_loss.double() + 0.2 * o.z_loss.double()
        return o.out, torch.autograd.grad(loss, leaves)

    out, grads = run([t.clone().requires_grad_() for t in (x, logits, wg, wd)], "triton")
    ref, ref_grads = run([t.detach().double().requires_grad_() for t in (x, logits, wg, wd)], "reference")
    return {"out": rel_err(out, ref),
            **{n: rel_err(a, b) for n, a, b in zip(("dx", "dlogits", "dw_gate_up", "dw_down"), grads, ref_grads)}}


def check_beam_search(dev, B, W, sizes, n) -> dict:
    import torch

    import plum_kernels.torch as K
    from plumrec.sid import build_trie

    rng = np.random.default_rng(3)
    codes = np.stack([rng.integers(0, v, n) for v in sizes], 1)
    trie = build_trie(codes, list(sizes)).to_torch(dev)
    g = _gen(dev, 3)
    tables = [torch.randn(B, W, v, generator=g, device=dev) * 3 for v in sizes]
    res = {impl: K.constrained_beam_search(lambda level, tokens, parent: tables[level], trie, batch_size=B,
                                           beam_width=W, impl=impl) for impl in ("reference", "triton")}
    (c_ref, s_ref), (c_tri, s_tri) = res["reference"], res["triton"]
    return {"codes_differ": float((c_ref != c_tri).any(-1).float().mean()), "scores": rel_err(s_tri, s_ref)}


def cases(smoke: bool) -> list[tuple[str, str, float, object]]:
    """``(name, dtype, budget, fn(dev) -> {quantity: error})`` for every case."""
    import torch

    fp32, bf16, fp16 = torch.float32, torch.bfloat16, torch.float16
    if smoke:
        att = [(fp32, 64, True, [1, 31, 0, 6], True), (bf16, 64, True, [1, 31, 0, 6], False)]
        dec = [(fp32, 64, 3, 4, 40, [0, 17, 40])]
        moe = [(fp32, 50, 32, 4, 32, 2), (bf16, 50, 32, 4, 32, 2)]
        beam = [(3, 8, (16, 8, 4), 300)]
    else:
        long = [1, 131, 0, 6, 517, 1000]
        att = [(fp32, 64, True, long, True), (bf16, 64, True, long, True), (fp16, 128, False, [3, 200, 64, 1025], True),
               (bf16, 64, True, [97] * 40 + [5, 100, 1], True), (bf16, 128, True, long, True),
               (bf16, 128, True, long, False), (fp32, 64, False, long, False)]
        pls = [0, 1, 17, 64, 129, 299, 300]
        dec = [(fp32, 64, 7, 20, 300, pls), (bf16, 64, 7, 20, 300, pls), (bf16, 128, 7, 20, 300, pls)]
        moe = [(fp32, 1000, 384, 4, 384, 2), (bf16, 4096, 384, 4, 384, 2), (bf16, 3001, 512, 32, 320, 4)]
        beam = [(64, 20, (256, 128, 64, 32), 12101), (3, 64, (256, 128, 64, 32), 12101)]
    out = []
    name = lambda t: str(t).replace("torch.", "")  # noqa: E731
    for dt, d, causal, lens, det in att:
        label = "" if det else " atomic-dQ"
        out.append((f"history_attention fwd+bwd{label} d={d} causal={causal} lens={lens}", name(dt),
                    BUDGET[name(dt)], lambda dev, a=(dt, d, causal, lens, det): check_history_attention(dev, *a)))
    for dt, d, B, W, S, pl in dec:
        out.append((f"beam_decode_attention d={d} B={B} W={W} S={S}", name(dt), BUDGET[name(dt)],
                    lambda dev, a=(dt, d, B, W, S, pl): check_beam_decode_attention(dev, *a)))
    for dt, T, d, E, f, k in moe:
        out.append((f"moe_mlp fwd+bwd T={T} d={d} E={E} f={f} k={k}", name(dt), BUDGET[name(dt)],
                    lambda dev, a=(dt, T, d, E, f, k): check_moe_mlp(dev, *a)))
    for B, W, sizes, n in beam:
        out.append((f"constrained_beam_search B={B} W={W} codebooks={list(sizes)} sids={n}", "float32", 1e-5,
                    lambda dev, a=(B, W, sizes, n): check_beam_search(dev, *a)))
    return out


def first_per_family(todo: list) -> list:
    """The first case of each op family (the first word of a case's name), in order."""
    seen: set[str] = set()
    out = []
    for case in todo:
        if case[0].split()[0] not in seen:
            seen.add(case[0].split()[0])
            out.append(case)
    return out


def run_case(name: str, dtype: str, budget: float, fn, dev) -> dict:
    """One case: its errors, whether each is within budget (beam codes must match exactly), its time."""
    t0 = time.perf_counter()
    try:
        errs = fn(dev)
        ok = all(v <= (0.0 if k == "codes_differ" else budget) for k, v in errs.items())
        row = {"case": name, "dtype": dtype, "budget": budget, "ok": ok, **errs}
    except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
        traceback.print_exc()
        row = {"case": name, "dtype": dtype, "budget": budget, "ok": False, "error": f"{type(e).__name__}: {e}"}
    row["seconds"] = round(time.perf_counter() - t0, 2)
    errs = {k: f"{v:.2e}" for k, v in row.items() if isinstance(v, float) and k not in ("budget", "seconds")}
    print(f"{'ok  ' if row['ok'] else 'FAIL'} {name} {dtype} {errs or row.get('error')}", flush=True)
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU through the Triton interpreter")
    p.add_argument("--autotune", action="store_true",
                   help="check the tiles the autotuner picks (default: each kernel's default tiles)")
    p.add_argument("--first-per-family", action="store_true",
                   help="only the first case of each op family (the device suite's smoke run)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "check_kernels.json"),
                   help="the JSON report, rewritten after every case (default benchmarks/out/check_kernels.json)")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (below)
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import command_line, environment

    from plumrec.io import write_text

    if not args.smoke and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (use --smoke on the CPU)")
    dev = torch.device("cpu" if args.smoke else "cuda")
    import plum_kernels.torch as K

    K.set_autotune(args.autotune)
    env = environment()
    if dev.type == "cpu":
        env["device"] = "cpu (Triton interpreter)"
    # "ok": every case ran and passed (False until the last case is done)
    report = {"ok": False, "complete": False, **env, "command": command_line(), "cases": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = first_per_family(cases(args.smoke)) if args.first_per_family else cases(args.smoke)
    for name, dtype, budget, fn in todo:
        report["cases"].append(run_case(name, dtype, budget, fn, dev))
        write_text(out, json.dumps(report, indent=1))   # a run stopped mid-way keeps the cases it finished
    report["complete"] = True
    report["ok"] = all(r["ok"] for r in report["cases"])
    write_text(out, json.dumps(report, indent=1))
    print(("all cases ok" if report["ok"] else "SOME CASES FAILED") + f"; wrote {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
