"""Framework-free argument checks shared by the torch and JAX front ends."""
from __future__ import annotations

import math


def resolve_scale(scale, head_dim: int) -> float:
    """``None`` -> ``1 / sqrt(head_dim)``; otherwise a positive finite float."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float, got {scale}")
    return scale
