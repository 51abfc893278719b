"""Benchmark of history_attention (GPU): the ``attention`` part of the device suite
(``benchmarks/bench_decode.py`` is its ``decode`` part).

    python benchmarks/bench_attention.py --out OUT            # CUDA
    python benchmarks/bench_attention.py --smoke --out OUT    # CPU: tiny sizes, interpreter, no timings

Writes ``OUT/parts/attention.csv`` (one row per op x shape x impl, as
measured) and ``OUT/attention.json`` (environment, command, notes, autotuner
choices); fractions of peak use ``OUT/peaks.json`` from the ``peaks`` part of
the same run (``benchmarks/peaks.py``).

History attention (``plum_kernels.torch.history_attention``, impl="triton",
check_values=False): bf16, causal, GQA; D = 128 with Hq 16 / Hkv 4 and D = 64
with Hq 16 / Hkv 8; two length sets of 131,072 tokens each: ``long`` (16 x
8192, the target row) and ``jagged`` (lognormal lengths, median 1k, capped at
32k). Forward, backward and forward + backward. FLOPs on real (unpadded)
tokens: causal forward = sum_b 4 * L_b (L_b + 1) / 2 * Hq * D, backward =
2.5x forward. When ``history_attention`` takes ``deterministic``, both
backward variants are timed. Baselines in the same process: FlexAttention
with a document (sequence-id) causal mask (compiled; ``create_block_mask``
timed separately), ``torch.nn.attention.varlen.varlen_attn``, SDPA on the
padded batch (flash and cuDNN backends), ``flash_attn`` (FA2) and
``flash_attn_interface`` (FA3) where importable. A baseline that is missing
or fails is recorded (row without a figure, reason in the notes).
"""
from __future__ import annotations

import inspect
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Recorder,
    Timer,
    finite,
    record_autotune,
    rel_diff,
    shape_str,
    suite_setup,
    try_part,
)

BF16 = "bfloat16"
FLEX = "flex (document mask)"


# ============================================================================= history attention: cases


def lognormal_lengths(total: int, median: int, cap: int, seed: int = 0) -> list[int]:
    """Sequence lengths drawn from a lognormal (sigma 1) around ``median``, each in [1, cap],
    the last one cut so that they sum to exactly ``total``."""
    rng = np.random.default_rng(seed)
    lens, n = [], 0
    while n < total:
        length = int(min(cap, max(1, rng.lognormal(math.log(median), 1.0))))
        length = min(length, total - n)
        lens.append(length)
        n += length
    return lens


def causal_flops(lens, hq: int, d: int) -> float:
    """Causal forward FLOPs on real tokens: sum_b 4 * L_b (L_b + 1) / 2 * Hq * D."""
    return float(sum(4 * n * (n + 1) / 2 * hq * d for n in lens))


@dataclass(frozen=True)
class HistoryCase:
    """One history-attention shape: ``lens`` packed into ``T = sum(lens)`` tokens."""
    name: str
    lens: tuple[int, ...]
    hq: int
    hkv: int
    d: int

    @property
    def shape(self) -> str:
        return shape_str(set=self.name, T=sum(self.lens), B=len(self.lens), max=max(self.lens), Hq=self.hq,
                         Hkv=self.hkv, D=self.d)


def history_cases(smoke: bool) -> list[HistoryCase]:
    """The target row (D 128, every sequence 8k) first, then the jagged set, then D 64. Smoke: one tiny
    jagged GQA case (every case runs the same code; the kernel tests cover both head dims)."""
    if smoke:
        return [HistoryCase("jagged", (5, 0, 11), 2, 1, 64)]
    jagged = tuple(lognormal_lengths(131072, 1024, 32768))
    long = (8192,) * 16
    return [HistoryCase("long", long, 16, 4, 128), HistoryCase("jagged", jagged, 16, 4, 128),
            HistoryCase("long", long, 16, 8, 64), HistoryCase("jagged", jagged, 16, 8, 64)]


# ============================================================================= history attention: implementations


@dataclass
class Runner:
    """One implementation's forward over its own layout of the inputs.

    ``forward()`` returns the output; ``leaves`` are what the backward
    differentiates; ``grad_out`` is the output gradient in the output's layout;
    ``packed(out)`` maps an output back to the packed ``[T, Hq, D]`` layout
    (to compare implementations)."""
    impl: str
    forward: Callable[[], object]
    leaves: tuple
    grad_out: object
    packed: Callable[[object], object] = lambda o: o
    notes: list[str] = field(default_factory=list)
    modes: tuple[str, ...] = ("fwd", "bwd", "fwd+bwd")


def history_inputs(lens, hq: int, hkv: int, d: int, dtype, device):
    """``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` (leaves requiring grad), ``cu_seqlens`` int32 ``[B+1]``."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    cu = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32, device=device)
    t = int(sum(lens))
    mk = lambda h: torch.randn(t, h, d, generator=g, device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv), cu


def plum_variants() -> list[tuple[str, dict]]:
    """``(impl name, extra kwargs)``: both backward variants when ``history_attention`` takes ``deterministic``."""
    import plum_kernels.torch as K

    if "deterministic" in inspect.signature(K.history_attention).parameters:
        return [("plum triton (deterministic)", {"deterministic": True}),
                ("plum triton (atomic dQ)", {"deterministic": False})]
    return [("plum triton", {})]


def plum_runner(impl: str, kw: dict, case: HistoryCase, q, k, v, cu, do) -> Runner:
    import plum_kernels.torch as K

    mx = max(case.lens)
    return Runner(impl, lambda: K.history_attention(q, k, v, cu, mx, impl="triton", check_values=False, **kw),
                  (q, k, v), do)


def document_causal_mask(seg):
    """FlexAttention ``mask_mod``: same sequence id (``seg [T]``) and key at or before the query."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (seg[q_idx] == seg[kv_idx]) & (kv_idx <= q_idx)
    return mask_mod


_FLEX: dict = {}


def flex_pieces(T: int, device, smoke: bool):
    """``(seg buffer [T], its mask_mod, create_block_mask, flex_attention)``, made once per (T, device):
    every case of T tokens refills the same ``seg`` buffer and passes the same ``mask_mod`` object,
    so the compiled functions are reused instead of recompiled (new closures would fail the guards)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    key = (T, str(device))
    if key not in _FLEX:
        seg = torch.zeros(T, dtype=torch.int64, device=device)
        build = create_block_mask if smoke else torch.compile(create_block_mask)
        flex = flex_attention if smoke else torch.compile(flex_attention, dynamic=False)
        _FLEX[key] = (seg, document_causal_mask(seg), build, flex)
    return _FLEX[key]


def flex_runner(rec: Recorder, timer: Timer, case: HistoryCase, q, k, v, do, smoke: bool) -> Runner:
    """Compiled ``flex_attention`` over ``[1, H, T, D]`` with a document causal block mask; the
    block-mask build (``torch.compile(create_block_mask)`` on CUDA) is recorded as its own row."""
    import torch

    dev = q.device
    T = sum(case.lens)
    seg, mask_mod, build, flex = flex_pieces(T, dev, smoke)
    seg.copy_(torch.repeat_interleave(torch.arange(len(case.lens), device=dev), torch.tensor(case.lens, device=dev)))
    t0 = time.perf_counter()
    bm = build(mask_mod, None, None, T, T, device=dev)
    first_s = time.perf_counter() - t0   # includes the compilation on the first case of each length
    ms, how = timer(lambda: build(mask_mod, None, None, T, T, device=dev))
    rec.row("flex create_block_mask", case.shape, "bool", "create_block_mask (eager)" if smoke
            else "torch.compile(create_block_mask)", ms, timer=how,
            notes="document causal mask, 128 x 128 blocks" + ("" if smoke else
                                                             f"; warm; first call {first_s:.1f} s with compilation"))
    # FlexAttention has no CPU backward and refuses CPU inputs that require grad
    qf, kf, vf = (x.detach().transpose(0, 1).contiguous()[None].requires_grad_(not smoke) for x in (q, k, v))
    notes = [] if not smoke else ["eager flex_attention: FlexAttention has no CPU backward"]
    return Runner(FLEX, lambda: flex(qf, kf, vf, block_mask=bm, enable_gqa=True), (qf, kf, vf),
                  do.transpose(0, 1).contiguous()[None], lambda o: o[0].transpose(0, 1), notes,
                  ("fwd",) if smoke else ("fwd", "bwd", "fwd+bwd"))


def varlen_runner(case: HistoryCase, q, k, v, cu, do) -> Runner:
    """``torch.nn.attention.varlen.varlen_attn``: causal through ``window_size=(-1, 0)`` (torch 2.10+)
    or ``is_causal=True`` (2.9); GQA through ``enable_gqa`` where it exists, else the flash kernel's
    native GQA, else k/v heads expanded to Hq (noted)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        kw: dict = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        kw = {"is_causal": True}
    else:
        raise RuntimeError(f"varlen_attn takes neither window_size nor is_causal: {list(params)}")
    if "enable_gqa" in params:
        kw["enable_gqa"] = True
    mx = max(case.lens)
    r = Runner("torch varlen_attn", lambda: varlen_attn(q, k, v, cu, cu, mx, mx, **kw), (q, k, v), do,
               notes=[f"kwargs {kw}"])
    try:
        finite(r.forward())
    except RuntimeError as e:  # this torch has no GQA here: expand the heads (and fail if that fails too)
        group = case.hq // case.hkv
        ke, ve = (x.detach().repeat_interleave(group, 1).requires_grad_() for x in (k, v))
        r = Runner(r.impl, lambda: varlen_attn(q, ke, ve, cu, cu, mx, mx, **kw), (q, ke, ve), do,
                   notes=[f"kwargs {kw}; k/v heads expanded to Hq ({type(e).__name__}: {str(e)[:80]})"])
        finite(r.forward())
    return r


def padded(x, lens, max_len: int):
    """``[T, H, D]`` -> ``[B, H, max_len, D]``, zero-padded (for SDPA)."""
    out = x.new_zeros(len(lens), max_len, *x.shape[1:])
    s = 0
    for i, n in enumerate(lens):
        out[i, :n] = x[s:s + n]
        s += n
    return out.transpose(1, 2).contiguous()


def unpadded(x, lens):
    """``[B, H, max_len, D]`` -> ``[T, H, D]`` (the real rows)."""
    import torch

    return torch.cat([x[i, :, :n].transpose(0, 1) for i, n in enumerate(lens)], 0)


def sdpa_runner(backend_name: str, case: HistoryCase, q, k, v, do) -> Runner:
    """SDPA with one backend on the zero-padded batch, causal (the real rows are exact: a real
    query only sees real keys); GQA through ``enable_gqa``, or k/v heads expanded when the
    backend refuses it (noted)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    lens, mx = case.lens, max(case.lens)
    qp = padded(q.detach(), lens, mx).requires_grad_()
    kp, vp = (padded(x.detach(), lens, mx).requires_grad_() for x in (k, v))
    dop = padded(do, lens, mx)

    def fwd(kk=kp, vv=vp, gqa=True):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qp, kk, vv, is_causal=True, enable_gqa=gqa)

    name = f"sdpa {backend_name.split('_')[0].lower()} (padded)"
    notes = [f"padded to {len(lens)} x {mx} = {len(lens) * mx} tokens"]
    try:
        finite(fwd())
        return Runner(name, fwd, (qp, kp, vp), dop, lambda o: unpadded(o, lens), notes + ["enable_gqa=True"])
    except RuntimeError as e:  # the backend refuses GQA: expand the heads (and fail if that fails too)
        group = case.hq // case.hkv
        ke, ve = (x.detach().repeat_interleave(group, 1).requires_grad_() for x in (kp, vp))
        r = Runner(name, lambda: fwd(ke, ve, False), (qp, ke, ve), dop, lambda o: unpadded(o, lens),
                   notes + [f"k/v heads expanded ({type(e).__name__}: {str(e)[:80]})"])
        finite(r.forward())
        return r


def flash_attn_runner(module: str, case: HistoryCase, q, k, v, cu, do) -> Runner:
    """``flash_varlen_func(q, k, v, cu, cu, max, max, causal=True)`` of ``flash_attn`` (FA2) or
    ``flash_attn_interface`` (FA3, whose result may be ``(out, lse)``)."""
    import importlib

    fn = importlib.import_module(module).flash_attn_varlen_func
    mx = max(case.lens)

    def fwd():
        o = fn(q, k, v, cu, cu, mx, mx, causal=True)
        return o[0] if isinstance(o, tuple) else o
    label = "FA2" if module == "flash_attn" else "FA3"
    return Runner(f"{module} varlen ({label})", fwd, (q, k, v), do)


# ============================================================================= history attention: measurement


def measure_modes(rec: Recorder, timer: Timer, case: HistoryCase, r: Runner, modes, reference) -> None:
    """Rows ``history_attention fwd | fwd+bwd | bwd`` of one implementation; each mode on its own
    (a mode that fails is recorded with its reason and the others still run). The backward alone
    is timed over a retained graph; where that is refused (compiled graphs with donated buffers)
    it is fwd+bwd - fwd, and the timer column says so."""
    fl = causal_flops(case.lens, case.hq, case.d)
    notes = list(r.notes)
    if reference is not None and not r.impl.startswith("plum"):
        try:
            notes.append(f"rel. diff vs {reference[0]} {rel_diff(r.packed(r.forward()), reference[1]):.1e}")
        except Exception as e:  # noqa: BLE001 - the modes below record the failure
            notes.append(f"no comparison ({type(e).__name__})")
    got: dict[str, float | None] = {}
    for mode in sorted(modes, key=("fwd", "fwd+bwd", "bwd").index):
        try:
            ms, how = _time_mode(timer, r, mode)
        except Exception as e:  # noqa: BLE001 - e.g. FlexAttention has no CPU backward
            ms, how = None, f"failed: {type(e).__name__}: {str(e)[:160]}"
            if mode == "bwd" and got.get("fwd") and got.get("fwd+bwd"):
                ms, how = got["fwd+bwd"] - got["fwd"], f"fwd+bwd - fwd (retained-graph backward {how})"
        got[mode] = ms
        scale = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
        rec.row(f"history_attention {mode}", case.shape, BF16, r.impl, ms, flops=scale * fl, baseline=FLEX, timer=how,
                notes="; ".join(notes))


def _time_mode(timer: Timer, r: Runner, mode: str) -> tuple[float | None, str]:
    import torch

    if mode == "fwd":
        finite(r.forward())
        return timer(r.forward)
    if mode == "fwd+bwd":
        fb = lambda: torch.autograd.grad(r.forward(), r.leaves, r.grad_out)  # noqa: E731
        finite(fb())
        return timer(fb)
    out = r.forward()
    bwd = lambda: torch.autograd.grad(out, r.leaves, r.grad_out, retain_graph=True)  # noqa: E731
    finite(bwd())
    return timer(bwd)


def run_history_case(rec: Recorder, timer: Timer, case: HistoryCase, device: str, smoke: bool) -> None:
    """Every implementation on one case, ours first (its output is the reference of the others)."""
    import torch

    q, k, v, cu = history_inputs(case.lens, case.hq, case.hkv, case.d, torch.bfloat16, device)
    do = torch.randn_like(q)
    reference = None
    for impl, kw in plum_variants():   # the variants differ in the backward only
        r = plum_runner(impl, kw, case, q, k, v, cu, do)
        if reference is None:
            reference = (impl, r.forward().detach())
            measure_modes(rec, timer, case, r, ("fwd", "bwd", "fwd+bwd"), reference)
        else:
            measure_modes(rec, timer, case, r, ("fwd+bwd",) if smoke else ("bwd", "fwd+bwd"), reference)
    builders = [
        (FLEX, lambda: flex_runner(rec, timer, case, q, k, v, do, smoke)),
        ("torch varlen_attn", lambda: varlen_runner(case, q, k, v, cu, do)),
        ("sdpa flash (padded)", lambda: sdpa_runner("FLASH_ATTENTION", case, q, k, v, do)),
        ("sdpa cudnn (padded)", lambda: sdpa_runner("CUDNN_ATTENTION", case, q, k, v, do)),
        ("flash_attn varlen (FA2)", lambda: flash_attn_runner("flash_attn", case, q, k, v, cu, do)),
        ("flash_attn_interface varlen (FA3)", lambda: flash_attn_runner("flash_attn_interface", case, q, k, v, cu,
                                                                         do)),
    ]
    for name, build in builders:
        try:
            r = build()
        except Exception as e:  # noqa: BLE001 - a missing or refusing baseline is recorded, not fatal
            rec.row("history_attention fwd", case.shape, BF16, name, None, baseline=FLEX, timer="unavailable",
                    notes=f"{type(e).__name__}: {str(e)[:200]}")
            continue
        measure_modes(rec, timer, case, r, r.modes, reference)
        del r
        if device == "cuda":
            torch.cuda.empty_cache()
    record_autotune(rec)


# ============================================================================= entry point


def main(argv: list[str] | None = None) -> dict:
    args, device, rec, timer = suite_setup(argv, "attention", __doc__)
    cases = history_cases(args.smoke)
    rec.set("cases", [dict(shape=c.shape, lens=list(c.lens)) for c in cases])
    for c in cases:
        try_part(rec, c.shape, lambda c=c: run_history_case(rec, timer, c, device, args.smoke))
    return rec.record


if __name__ == "__main__":
    main()
