"""Benchmark of the MoE kernels (GPU, bf16): the ``moe`` and ``routing`` parts of the device suite.

    python benchmarks/bench_moe.py --out OUT                      # CUDA: both sections
    python benchmarks/bench_moe.py --section moe --out OUT        # the suite's `moe` part
    python benchmarks/bench_moe.py --section routing --out OUT    # the suite's `routing` part
    python benchmarks/bench_moe.py --smoke --out OUT              # CPU: tiny sizes, interpreter, no timings

Writes ``OUT/parts/{moe,routing}.csv`` and ``OUT/{moe,routing}.json``;
fractions of peak use ``OUT/peaks.json`` (the ``peaks`` part of the same run).

``moe``, at six (tokens T, d_model, expert FFN f, experts E, top-k) shapes
(E 8 / 32 / 128, k 2 / 4 / 8, d 1024-4096, f 512-1536, 8k-32k tokens):

- the grouped matmul of both projections (gate|up: ``[T k, d] x [E, d, 2f]``;
  down: ``[T k, f] x [E, f, d]``; group sizes from a top-k over random router
  logits): ``plum_kernels.torch.grouped_matmul`` (impl="triton") and, forward
  only, the ``plum_kernels::grouped_matmul`` custom op called directly, against
  ``torch._grouped_mm`` (where this torch has it); forward, dx (autograd with
  only x requiring grad) and dw (only w requiring grad), each of the form
  2 M K N FLOPs;
- the SwiGLU layer forward and forward + backward (``plum_kernels.torch.moe_mlp``)
  against the same layer on ``torch._grouped_mm``: our route / permute /
  combine around it and the same SwiGLU (silu in float32, as ours), bf16
  everywhere else; FLOPs on routed tokens, forward = 2 T k (d 2f + f d),
  forward + backward = 3x.

``routing``: ``moe_route``, ``moe_permute`` and ``moe_unpermute`` (the
weighted combine), impl="triton" against the torch reference, in GB/s of the
bytes each must move (below) and as a fraction of the measured copy bandwidth.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Recorder, Timer, finite, record_autotune, sections_main, shape_str, try_part  # noqa: E402

BF16 = "bfloat16"
GROUPED_MM = "torch._grouped_mm"
GROUPED_MM_LAYER = "torch._grouped_mm layer"
REFERENCE = "torch reference"


@dataclass(frozen=True)
class MoECase:
    """Tokens T, model width d, expert FFN width f, experts E, experts per token k."""
    T: int
    d: int
    f: int
    E: int
    k: int

    @property
    def shape(self) -> str:
        return shape_str(T=self.T, d=self.d, f=self.f, E=self.E, k=self.k)


CASES = [MoECase(8192, 1024, 512, 8, 2), MoECase(16384, 2048, 1408, 32, 4), MoECase(16384, 1024, 512, 128, 8),
         MoECase(32768, 2048, 768, 128, 8), MoECase(8192, 4096, 1536, 32, 4), MoECase(32768, 4096, 1024, 8, 2)]
SMOKE_CASES = [MoECase(16, 32, 24, 4, 2)]
ROUTE_CASES = [MoECase(16384, 1024, 0, 32, 4), MoECase(32768, 2048, 0, 128, 8), MoECase(65536, 4096, 0, 8, 2)]
SMOKE_ROUTE_CASES = [MoECase(24, 32, 0, 4, 2)]


def layer_flops(T: int, d: int, f: int, k: int) -> float:
    """Forward FLOPs of the SwiGLU experts on the routed token copies: 2 T k (d 2f + f d)."""
    return 2.0 * T * k * (d * 2 * f + f * d)


def randn(*shape, scale: float = 1.0, dtype=None, device="cpu", seed: int = 0):
    """Seeded normal tensor times ``scale``, drawn on ``device`` in float32, then cast (bf16 by default)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype or torch.bfloat16)


def make_layer(c: MoECase, device: str):
    """``x [T, d]`` bf16, router logits ``[T, E]`` float32 (a random router: roughly balanced),
    ``w_gate_up [E, d, 2f]`` and ``w_down [E, f, d]`` bf16."""
    import torch

    x = randn(c.T, c.d, device=device, seed=0)
    router = randn(c.d, c.E, scale=c.d ** -0.5, dtype=torch.float32, device=device, seed=1)
    wg = randn(c.E, c.d, 2 * c.f, scale=c.d ** -0.5, device=device, seed=2)
    wd = randn(c.E, c.f, c.d, scale=c.f ** -0.5, device=device, seed=3)
    return x, x.float() @ router, wg, wd


def group_sizes(c: MoECase, device: str):
    """Rows per expert of ``T k`` token copies routed by a top-k over random logits: int32 ``[E]``."""
    import torch

    ids = randn(c.T, c.E, dtype=torch.float32, device=device, seed=4).topk(c.k, dim=1).indices
    return torch.bincount(ids.flatten(), minlength=c.E).to(torch.int32)


# ============================================================================= grouped matmul


def gmm_impls(x, w, gs) -> dict[str, Callable]:
    """``name -> f(x, w)`` over the same rows and group sizes."""
    import torch

    import plum_kernels.torch as K

    impls = {"plum triton": lambda a, b: K.grouped_matmul(a, b, gs, impl="triton", validate=False)}
    if hasattr(torch, "_grouped_mm"):
        offs = torch.cumsum(gs, 0).to(torch.int32)
        impls[GROUPED_MM] = lambda a, b: torch._grouped_mm(a, b, offs=offs)
    return impls


def gmm_mode_fn(f: Callable, x, w, dy, mode: str) -> Callable:
    """The callable timed for ``mode``: the forward, or the backward to x or w only over a retained graph."""
    import torch

    if mode == "fwd":
        return lambda: f(x, w)
    leaf = (x if mode == "dx" else w).detach().requires_grad_()
    y = f(leaf, w) if mode == "dx" else f(x, leaf)
    return lambda: torch.autograd.grad(y, (leaf,), dy, retain_graph=True)


def run_gmm(rec: Recorder, timer: Timer, c: MoECase, proj: str, device: str) -> None:
    """Forward, dx and dw of one projection (``gate_up`` or ``down``) for every implementation."""
    import torch

    K_, N = (c.d, 2 * c.f) if proj == "gate_up" else (c.f, c.d)
    gs = group_sizes(c, device)
    M = c.T * c.k
    x, w = randn(M, K_, device=device, seed=5), randn(c.E, K_, N, scale=K_ ** -0.5, device=device, seed=6)
    dy = randn(M, N, device=device, seed=7)
    shape = shape_str(proj=proj, M=M, K=K_, N=N, E=c.E, case=f"T{c.T}/d{c.d}/f{c.f}/E{c.E}/k{c.k}")
    impls = gmm_impls(x, w, gs)
    if GROUPED_MM not in impls:
        rec.note("torch._grouped_mm is not in this torch: no grouped-matmul baseline")
    ours = finite(impls["plum triton"](x, w))
    flops = 2.0 * M * K_ * N
    for mode in ("fwd", "dx", "dw"):
        for name, f in impls.items():
            _time_gmm(rec, timer, f"grouped_matmul {mode}", shape, name,
                      lambda f=f, m=mode: gmm_mode_fn(f, x, w, dy, m), flops, ours if mode == "fwd" else None)
    op = torch.ops.plum_kernels.grouped_matmul
    _time_gmm(rec, timer, "grouped_matmul fwd", shape, "plum triton (custom op)",
              lambda: (lambda: op(x, w, gs, False, "triton")), flops, ours)


def _time_gmm(rec: Recorder, timer: Timer, op: str, shape: str, impl: str, build: Callable, flops: float,
              ours) -> None:
    """One row: build the timed callable, check its output (against ours in the forward), time it."""
    try:
        fn = build()
        out = finite(fn())
        notes = "" if ours is None or impl.startswith("plum") else f"rel. diff vs plum {_rel(out, ours):.1e}"
        ms, how = timer(fn)
    except Exception as e:  # noqa: BLE001 - recorded; the other implementations still run
        ms, how, notes = None, "failed", f"{type(e).__name__}: {str(e)[:200]}"
    rec.row(op, shape, BF16, impl, ms, flops=flops, baseline=GROUPED_MM, timer=how, notes=notes)


def _rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ============================================================================= SwiGLU layer


def grouped_mm_layer(x, logits, wg, wd, k: int):
    """The SwiGLU expert layer with ``torch._grouped_mm`` for both projections, between our
    route / permute / combine and with our SwiGLU (silu in float32, bf16 out)."""
    import torch

    import plum_kernels.torch as K
    from plum_kernels.moe import reference as ref

    E = wd.shape[0]
    r = K.moe_route(logits, k)
    xs, gs, perm, inv = K.moe_permute(x, r.expert_ids, E, validate=False)
    offs = torch.cumsum(gs, 0).to(torch.int32)
    h = torch._grouped_mm(xs, wg, offs=offs)
    y = torch._grouped_mm(ref.swiglu(h), wd, offs=offs)
    return K.moe_unpermute(y, r.weights, perm, inv, validate=False)


def run_layer(rec: Recorder, timer: Timer, c: MoECase, device: str) -> None:
    """Layer forward and forward + backward (gradients of x, router logits and both weights)."""
    import torch

    import plum_kernels.torch as K

    x, logits, wg, wd = (t.requires_grad_() for t in make_layer(c, device))
    dout = randn(c.T, c.d, device=device, seed=8)
    impls = {"plum triton": lambda: K.moe_mlp(x, logits, wg, wd, c.k, impl="triton").out}
    if hasattr(torch, "_grouped_mm"):
        impls[GROUPED_MM_LAYER] = lambda: grouped_mm_layer(x, logits, wg, wd, c.k)
    ours = finite(impls["plum triton"]()).detach()
    for name, f in impls.items():
        for mode, scale in (("fwd", 1.0), ("fwd+bwd", 3.0)):
            fn = f if mode == "fwd" else (lambda f=f: torch.autograd.grad(f(), (x, logits, wg, wd), dout))
            try:
                out = finite(fn())
                notes = "" if mode != "fwd" or name == "plum triton" else f"rel. diff vs plum {_rel(out, ours):.1e}"
                ms, how = timer(fn)
            except Exception as e:  # noqa: BLE001 - recorded; the other rows still run
                ms, how, notes = None, "failed", f"{type(e).__name__}: {str(e)[:200]}"
            rec.row(f"moe_mlp {mode}", c.shape, BF16, name, ms, flops=scale * layer_flops(c.T, c.d, c.f, c.k),
                    baseline=GROUPED_MM_LAYER, timer=how, notes=notes)


# ============================================================================= routing


def routing_bytes(c: MoECase) -> dict[str, float]:
    """Bytes each op must move at the least (bf16 activations, float32 logits and weights, int32 ids):

    - route: read logits ``[T, E]``, write weights and ids ``[T, k]``;
    - permute: read x ``[T, d]`` and ids, write the sorted copies ``[T k, d]``, the group sizes,
      the permutation and its inverse;
    - combine: read the expert outputs ``[T k, d]``, the weights and the inverse, write ``[T, d]``."""
    T, d, E, k = c.T, c.d, c.E, c.k
    return {"moe_route": 4.0 * T * E + 8.0 * T * k,
            "moe_permute": 2.0 * T * d + 4.0 * T * k + 2.0 * T * k * d + 4.0 * E + 8.0 * T * k,
            "moe_unpermute": 2.0 * T * k * d + 8.0 * T * k + 2.0 * T * d}


def run_routing(rec: Recorder, timer: Timer, c: MoECase, device: str) -> None:
    """The three routing ops, each for impl="triton" then the torch reference (the baseline)."""
    import plum_kernels.torch as K

    x, logits, _, _ = make_layer(MoECase(c.T, c.d, 8, c.E, c.k), device)
    r = K.moe_route(logits, c.k, impl="reference")
    _, _, perm, inv = K.moe_permute(x, r.expert_ids, c.E, impl="reference", validate=False)
    y = randn(c.T * c.k, c.d, device=device, seed=9)
    ops = {"moe_route": lambda impl: K.moe_route(logits, c.k, impl=impl),
           "moe_permute": lambda impl: K.moe_permute(x, r.expert_ids, c.E, impl=impl, validate=False),
           "moe_unpermute": lambda impl: K.moe_unpermute(y, r.weights, perm, inv, impl=impl, validate=False)}
    nbytes = routing_bytes(c)
    for op, call in ops.items():
        for name, impl in (("plum triton", "triton"), (REFERENCE, "reference")):
            try:
                fn = lambda call=call, impl=impl: call(impl)  # noqa: E731
                finite(fn())
                ms, how = timer(fn, graph=True)
                notes = ""
            except Exception as e:  # noqa: BLE001 - recorded; the next op still runs
                ms, how, notes = None, "failed", f"{type(e).__name__}: {str(e)[:200]}"
            rec.row(op, shape_str(T=c.T, d=c.d, E=c.E, k=c.k), BF16, name, ms, nbytes=nbytes[op], baseline=REFERENCE,
                    timer=how, notes=notes)


# ============================================================================= entry point


def run_section(section: str, args, device: str) -> dict:
    rec = Recorder(args.out, args.name or section, part=section, smoke=args.smoke)
    timer = Timer(smoke=args.smoke, device=device)
    if section == "moe":
        cases = SMOKE_CASES if args.smoke else CASES
        rec.set("torch_has_grouped_mm", _has_grouped_mm())
        for c in cases:   # shape by shape: a part stopped at its timeout keeps whole shapes
            for proj in ("gate_up", "down"):
                try_part(rec, f"grouped_matmul {proj} {c.shape}", lambda c=c, p=proj: run_gmm(rec, timer, c, p, device))
            try_part(rec, f"moe_mlp {c.shape}", lambda c=c: run_layer(rec, timer, c, device))
            record_autotune(rec)
    else:
        rec.set("bytes_counted", routing_bytes.__doc__)
        for c in SMOKE_ROUTE_CASES if args.smoke else ROUTE_CASES:
            try_part(rec, c.shape, lambda c=c: run_routing(rec, timer, c, device))
    return rec.record


def _has_grouped_mm() -> bool:
    import torch

    return hasattr(torch, "_grouped_mm")


def main(argv: list[str] | None = None) -> dict:
    return sections_main(argv, __doc__, {"moe": "grouped matmul and SwiGLU layer",
                                         "routing": "route / permute / combine"}, run_section)


if __name__ == "__main__":
    main()
