"""The device's measured ceilings, for every other part's fraction of peak.

    python benchmarks/peaks.py --out OUT            # CUDA: writes OUT/peaks.json and OUT/parts/peaks.csv
    python benchmarks/peaks.py --out OUT --smoke    # CPU: tiny sizes, no figures

- bf16 GEMM: ``[n, n] @ [n, n]`` (n = 8192, random data, not zeros) into a
  preallocated output; TFLOP/s = 2 n^3 / time.
- copy: ``dst.copy_(src)`` of a 4 GiB device buffer (random bytes); GB/s
  counts the bytes read plus the bytes written (2 x 4 GiB / time).

Both are timed with ``triton.testing.do_bench`` (median) and written to
``OUT/peaks.json`` as ``{"peaks": {"bf16_gemm_tflops", "copy_gbps"}}``,
which ``common.load_peaks`` reads.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Recorder, Timer, finite, shape_str, suite_setup, try_part  # noqa: E402

GEMM_N, SMOKE_GEMM_N = 8192, 64
COPY_BYTES, SMOKE_COPY_BYTES = 4 << 30, 1 << 16


def gemm_peak(rec: Recorder, timer: Timer, n: int, device: str) -> float | None:
    """Median ms of one bf16 ``[n, n] @ [n, n]``; records the row, returns TFLOP/s (None in smoke)."""
    import torch

    a, b = (torch.randn(n, n, device=device).to(torch.bfloat16) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    fn = lambda: torch.mm(a, b, out=c)  # noqa: E731
    finite(fn())
    ms, how = timer(fn)
    r = rec.row("bf16 gemm", shape_str(M=n, N=n, K=n), "bfloat16", "torch.mm (cuBLAS)", ms, flops=2.0 * n ** 3,
                timer=how)
    return r["tflops"] or None


def copy_peak(rec: Recorder, timer: Timer, nbytes: int, device: str) -> float | None:
    """Median ms of a device-to-device copy of ``nbytes``; returns GB/s of bytes read + written."""
    import torch

    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    fn()
    ms, how = timer(fn)
    r = rec.row("copy", shape_str(bytes=nbytes), "uint8", "Tensor.copy_", ms, nbytes=2.0 * nbytes, timer=how,
                notes="GB/s counts bytes read + written")
    return r["gbps"] or None


def main(argv: list[str] | None = None) -> dict:
    args, device, rec, timer = suite_setup(argv, "peaks", __doc__.split("\n\n")[0])
    peaks = {"bf16_gemm_tflops": None, "copy_gbps": None}
    rec.set("peaks", peaks)
    peaks["bf16_gemm_tflops"] = try_part(rec, "bf16 gemm", lambda: gemm_peak(
        rec, timer, SMOKE_GEMM_N if args.smoke else GEMM_N, device))
    rec.set("peaks", peaks)
    peaks["copy_gbps"] = try_part(rec, "copy", lambda: copy_peak(
        rec, timer, SMOKE_COPY_BYTES if args.smoke else COPY_BYTES, device))
    rec.set("peaks", peaks)
    return rec.record


if __name__ == "__main__":
    main()
