"""Benchmark of beam_decode_attention (GPU): the ``decode`` part of the device suite.

    python benchmarks/bench_decode.py --out OUT            # CUDA
    python benchmarks/bench_decode.py --smoke --out OUT    # CPU: tiny sizes, interpreter, no timings

Writes ``OUT/parts/decode.csv`` (one row per shape x impl, as measured) and
``OUT/decode.json`` (environment, command, notes); fractions of peak use
``OUT/peaks.json`` from the ``peaks`` part of the same run
(``benchmarks/peaks.py``).

Beam decode (``plum_kernels.torch.beam_decode_attention``): B users x W beams
over an S-token prefix plus an 8-token suffix, Hq 16, Hkv 4, D 128, bf16;
TFLOP/s, GB/s (prefix K/V read once, plus q, out and the suffixes) and the
fraction of the shape's roofline max(FLOPs / peak FLOP/s, bytes / copy
bandwidth). Baselines: SDPA with the beams as query rows over the prefix
plus every beam's suffix (a boolean mask lets each beam see only its own
suffix; K/V laid out once, outside the timing) and the per-beam prefix copy
(the prefix copied for every beam, then SDPA per beam; the copy is timed).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Recorder,
    Timer,
    finite,
    rel_diff,
    shape_str,
    suite_setup,
    try_part,
)

BF16 = "bfloat16"
PER_BEAM_COPY = "per-beam copy + SDPA"
PER_BEAM_COPY_MAX_BYTES = 24 << 30   # the baseline's K/V copy must fit beside everything else


@dataclass(frozen=True)
class DecodeCase:
    """B users x W beams, an S-token prefix per user, an s-token suffix per beam (all valid)."""
    B: int
    W: int
    S: int
    hq: int = 16
    hkv: int = 4
    d: int = 128
    s: int = 8

    @property
    def shape(self) -> str:
        return shape_str(B=self.B, W=self.W, S=self.S, s=self.s, Hq=self.hq, Hkv=self.hkv, D=self.d)

    @property
    def flops(self) -> float:
        return 4.0 * self.B * self.W * self.hq * self.d * (self.S + self.s)

    def nbytes(self, element_size: int) -> float:
        """Prefix K/V read once per user, each beam's suffix K/V, q and out."""
        kv = 2 * self.B * self.hkv * self.d * (self.S + self.W * self.s)
        return float(element_size * (kv + 2 * self.B * self.W * self.hq * self.d))


def decode_cases(smoke: bool) -> list[DecodeCase]:
    if smoke:
        return [DecodeCase(2, 3, 40, hq=4, hkv=2, d=64, s=4)]
    return [DecodeCase(4, 16, 2048), DecodeCase(4, 64, 8192), DecodeCase(32, 16, 8192), DecodeCase(32, 64, 2048)]


def decode_inputs(c: DecodeCase, device: str):
    """``q [B, W, Hq, D]``, prefix K/V ``[B, S, Hkv, D]``, suffix K/V ``[B, W, s, Hkv, D]``, prefix_lens."""
    import torch

    g = torch.Generator(device=device).manual_seed(1)
    mk = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16)  # noqa: E731
    q, kp, vp = mk(c.B, c.W, c.hq, c.d), mk(c.B, c.S, c.hkv, c.d), mk(c.B, c.S, c.hkv, c.d)
    ks, vs = mk(c.B, c.W, c.s, c.hkv, c.d), mk(c.B, c.W, c.s, c.hkv, c.d)
    plens = torch.full((c.B,), c.S, dtype=torch.int32, device=device)
    return q, kp, vp, ks, vs, plens


def per_beam_copy_fn(c: DecodeCase, q, kp, vp, ks, vs) -> Callable:
    """Each beam gets its own copy of the prefix followed by its suffix, then SDPA with the
    ``Hq / Hkv`` query heads of a KV head as query rows (exact GQA, no head expansion)."""
    import torch
    import torch.nn.functional as F

    B, W, S, s, hkv, d = c.B, c.W, c.S, c.s, c.hkv, c.d
    qq = q.reshape(B * W, hkv, c.hq // hkv, d)

    def fn():
        kk = torch.cat([kp[:, None].expand(B, W, S, hkv, d), ks], 2).reshape(B * W, S + s, hkv, d).transpose(1, 2)
        vv = torch.cat([vp[:, None].expand(B, W, S, hkv, d), vs], 2).reshape(B * W, S + s, hkv, d).transpose(1, 2)
        return F.scaled_dot_product_attention(qq, kk, vv).reshape(B, W, c.hq, d)
    return fn


def beams_as_rows_fn(c: DecodeCase, q, kp, vp, ks, vs) -> Callable:
    """SDPA per (user, KV head) with the W x Hq/Hkv queries as rows over ``[prefix, suffix of beam 0,
    ..., suffix of beam W-1]``; a boolean mask keeps each beam to the prefix and its own suffix.
    The K/V layout and the mask are built once, outside the timing."""
    import torch
    import torch.nn.functional as F

    B, W, S, s, hkv, d, G = c.B, c.W, c.S, c.s, c.hkv, c.d, c.hq // c.hkv
    qr = q.reshape(B, W, hkv, G, d).permute(0, 2, 1, 3, 4).reshape(B, hkv, W * G, d).contiguous()
    k_all = torch.cat([kp, ks.reshape(B, W * s, hkv, d)], 1).transpose(1, 2).contiguous()
    v_all = torch.cat([vp, vs.reshape(B, W * s, hkv, d)], 1).transpose(1, 2).contiguous()
    beam = torch.arange(W * G, device=q.device) // G                              # beam of each query row
    col_beam = torch.arange(W * s, device=q.device) // s                          # beam of each suffix key
    mask = torch.cat([torch.ones(W * G, S, dtype=torch.bool, device=q.device), beam[:, None] == col_beam[None]], 1)
    mask = mask[None, None].expand(B, 1, W * G, S + W * s)

    def fn():
        o = F.scaled_dot_product_attention(qr, k_all, v_all, attn_mask=mask)     # [B, Hkv, W*G, D]
        return o.reshape(B, hkv, W, G, d).permute(0, 2, 1, 3, 4).reshape(B, W, c.hq, d)
    return fn


def run_decode_case(rec: Recorder, timer: Timer, c: DecodeCase, device: str) -> None:
    """Ours, then the two SDPA baselines, each checked against ours before it is timed."""
    import plum_kernels.torch as K

    q, kp, vp, ks, vs, plens = decode_inputs(c, device)
    ours = lambda: K.beam_decode_attention(q, kp, vp, plens, ks, vs, c.s, impl="triton",  # noqa: E731
                                           check_values=False)
    ref = finite(ours())
    nbytes = c.nbytes(q.element_size())
    roof = 1e3 * max(c.flops / (rec.peaks["bf16_tflops"] * 1e12), nbytes / (rec.peaks["copy_gbps"] * 1e9))
    bound = "memory" if nbytes / rec.peaks["copy_gbps"] > c.flops / rec.peaks["bf16_tflops"] / 1e3 else "compute"
    ms, how = timer(ours, graph=True)
    rec.row("beam_decode_attention", c.shape, BF16, "plum triton", ms, flops=c.flops, nbytes=nbytes,
            roofline_ms=roof, baseline=PER_BEAM_COPY, timer=how,
            notes=f"roofline {roof * 1e3:.2f} us ({bound}-bound at the peaks used)")
    copy_bytes = 2 * c.B * c.W * (c.S + c.s) * c.hkv * c.d * q.element_size()
    baselines = [("SDPA beams as rows (masked)", lambda: beams_as_rows_fn(c, q, kp, vp, ks, vs), True)]
    if copy_bytes <= PER_BEAM_COPY_MAX_BYTES:
        baselines.append((PER_BEAM_COPY, lambda: per_beam_copy_fn(c, q, kp, vp, ks, vs), False))
    else:
        rec.row("beam_decode_attention", c.shape, BF16, PER_BEAM_COPY, None, baseline=PER_BEAM_COPY,
                timer="skipped", notes=f"its K/V copy would take {copy_bytes / 2**30:.0f} GiB")
    for name, build, graph in baselines:
        try:
            fn = build()
            diff = rel_diff(finite(fn()), ref)
            ms, how = timer(fn, graph=graph)
            notes = f"rel. diff vs plum {diff:.1e}"
        except Exception as e:  # noqa: BLE001 - recorded, the next baseline still runs
            ms, how, notes = None, "failed", f"{type(e).__name__}: {str(e)[:200]}"
        rec.row("beam_decode_attention", c.shape, BF16, name, ms, flops=c.flops, nbytes=nbytes, roofline_ms=roof,
                baseline=PER_BEAM_COPY, timer=how, notes=notes)


def main(argv: list[str] | None = None) -> dict:
    args, device, rec, timer = suite_setup(argv, "decode", __doc__)
    for c in decode_cases(args.smoke):
        try_part(rec, c.shape, lambda c=c: run_decode_case(rec, timer, c, device))
    return rec.record


if __name__ == "__main__":
    main()
