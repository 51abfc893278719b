"""Shared pieces of the benchmarks: timing, the environment record and option parsing."""
from __future__ import annotations

import datetime
import platform
import statistics
import time
from typing import Callable

import torch


def time_ms(fn: Callable[[], object], *, warmup: int = 3, iters: int = 10, device: str | torch.device = "cuda") -> float:
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
        out["device"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
    else:
        out["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return out


def json_fields_arg(parser, flag: str, text: str, cls=None, reserved: dict | None = None) -> dict:
    """Parse the command-line option ``flag`` as a JSON object (``parser.error`` otherwise); with a
    dataclass ``cls`` its keys must be ``cls``'s fields, and keys of ``reserved`` (field -> the flag
    that sets it) must be set with that flag instead."""
    import dataclasses
    import json

    try:
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError
    except ValueError:
        parser.error(f"{flag} must be a JSON object, got {text!r}")
    if cls is not None:
        reserved = reserved or {}
        fields = {f.name for f in dataclasses.fields(cls)} - set(reserved)
        for k in obj:
            if k in reserved:
                parser.error(f"{flag}: {k!r} must be set with {reserved[k]}")
            if k not in fields:
                parser.error(f"{flag}: {k!r} is not a {cls.__name__} field; it must be one of {sorted(fields)}")
    return obj


def embedding_files_arg(parser, flag: str, text: str) -> list[str]:
    """The comma-separated ``.npy`` paths of the option ``flag``, resolved; each must exist
    (``parser.error`` otherwise)."""
    from pathlib import Path

    files = [str(Path(f).resolve()) for f in text.split(",") if f]
    for f in files:
        if not Path(f).is_file():
            parser.error(f"{flag}: {f} must be an existing .npy file")
    return files


def check_item_embeddings(flag: str, path: str, e, num_items: int) -> None:
    """``ValueError`` naming ``flag`` unless ``e`` (loaded from ``path``) is a finite ``[num_items, d]`` array."""
    import numpy as np

    if e.ndim != 2 or len(e) != num_items or not np.isfinite(e).all():
        raise ValueError(f"{flag}: {path} must be a finite [num_items={num_items}, d] array, got shape {e.shape}")
