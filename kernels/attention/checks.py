"""Argument checks of the attention ops shared by the torch and JAX front ends
(docs/design.md, 'history_attention' and 'beam_decode_attention').

Plain Python over :class:`~plum_kernels._checks.Arr` descriptors and host
integers, so that the torch reference, the Triton kernels, the jnp reference
and the Pallas kernels raise the same errors for the same mistakes.
"""
from __future__ import annotations

import math
from typing import Sequence

from plum_kernels._checks import (
    FLOAT_KERNEL_DTYPES,
    Arr,
    check_device,
    check_rank,
    is_int,
)

KERNEL_HEAD_DIMS = (64, 128)
KERNEL_IMPLS = ("triton", "pallas")


def resolve_scale(scale, head_dim: int) -> float:
    """``None`` -> ``1 / sqrt(head_dim)``; otherwise a positive finite float."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}") from None
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float, got {scale}")
    return scale


def _check_float_family(impl: str, named: dict[str, Arr]) -> None:
    (name0, a0), *rest = named.items()
    allowed = FLOAT_KERNEL_DTYPES + (() if impl in KERNEL_IMPLS else ("float64",))
    if a0.dtype not in allowed:
        raise TypeError(f"{name0} must be one of {allowed} for impl={impl!r}, got {a0.dtype}")
    for name, a in rest:
        if a.dtype != a0.dtype:
            raise TypeError(f"{name} must have the dtype of {name0} ({a0.dtype}), got {a.dtype}")
        check_device(name, a, name0, a0)


def _check_kernel_head_dim(impl: str, d: int) -> None:
    if impl in KERNEL_IMPLS and d not in KERNEL_HEAD_DIMS:
        raise ValueError(f"head dim D must be one of {KERNEL_HEAD_DIMS} for impl={impl!r}, got {d} "
                         "(impl='reference' takes any D)")


def _check_int32(name: str, a: Arr, n: int, doc: str, q: Arr) -> None:
    check_rank(name, a, 1, doc)
    if a.dtype != "int32":
        raise TypeError(f"{name} must be int32 {doc}, got {a.dtype}")
    if a.shape[0] != n:
        raise ValueError(f"{name} must have shape {doc} = ({n},), got {a.shape}")
    check_device(name, a, "q", q)


def check_history(q: Arr, k: Arr, v: Arr, cu_seqlens: Arr, max_seqlen, impl: str) -> None:
    """Shapes, dtypes and devices of ``history_attention``."""
    check_rank("q", q, 3, "[T, Hq, D]")
    check_rank("k", k, 3, "[T, Hkv, D]")
    check_rank("v", v, 3, "[T, Hkv, D]")
    _check_float_family(impl, {"q": q, "k": k, "v": v})
    T, Hq, D = q.shape
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k and v must have shape [T={T}, Hkv, D={D}], got {k.shape} and {v.shape}")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(f"Hq ({Hq}) must be a positive multiple of Hkv ({k.shape[1]})")
    _check_kernel_head_dim(impl, D)
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be an int32 array of shape [B+1] with B >= 1, got {cu_seqlens.shape}")
    _check_int32("cu_seqlens", cu_seqlens, cu_seqlens.shape[0], "[B+1]", q)
    if not is_int(max_seqlen) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")


def check_cu_seqlens_values(cu: Sequence[int], total: int, max_seqlen: int) -> None:
    """The values of ``cu_seqlens`` (host ints): 0, non-decreasing, T, and
    no sequence longer than ``max_seqlen``."""
    cu = [int(c) for c in cu]
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {cu[0]}")
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if min(lens) < 0:
        i = lens.index(min(lens))
        raise ValueError(f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {cu[i]} > "
                         f"cu_seqlens[{i + 1}] = {cu[i + 1]}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens must end at T = {total} (tokens in q), got cu_seqlens[-1] = {cu[-1]}")
    if max(lens) > max_seqlen:
        raise ValueError(f"max_seqlen ({max_seqlen}) is smaller than the longest sequence ({max(lens)})")


def check_decode(q: Arr, k_prefix: Arr, v_prefix: Arr, prefix_lens: Arr, k_suffix: Arr, v_suffix: Arr,
                 suffix_len, impl: str) -> None:
    """Shapes, dtypes and devices of ``beam_decode_attention``."""
    check_rank("q", q, 4, "[B, W, Hq, D]")
    check_rank("k_prefix", k_prefix, 4, "[B, S, Hkv, D]")
    check_rank("v_prefix", v_prefix, 4, "[B, S, Hkv, D]")
    check_rank("k_suffix", k_suffix, 5, "[B, W, s, Hkv, D]")
    check_rank("v_suffix", v_suffix, 5, "[B, W, s, Hkv, D]")
    _check_float_family(impl, {"q": q, "k_prefix": k_prefix, "v_prefix": v_prefix,
                               "k_suffix": k_suffix, "v_suffix": v_suffix})
    B, W, Hq, D = q.shape
    if B == 0 or W == 0:
        raise ValueError(f"q must have B >= 1 users and W >= 1 beams, got shape {q.shape}")
    if k_prefix.shape != v_prefix.shape or k_prefix.shape[0] != B or k_prefix.shape[3] != D:
        raise ValueError(f"k_prefix and v_prefix must have shape [B={B}, S, Hkv, D={D}], got "
                         f"{k_prefix.shape} and {v_prefix.shape}")
    Hkv = k_prefix.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq ({Hq}) must be a positive multiple of Hkv ({Hkv})")
    if k_suffix.shape != (B, W, k_suffix.shape[2], Hkv, D) or k_suffix.shape != v_suffix.shape:
        raise ValueError(f"k_suffix and v_suffix must have shape [B={B}, W={W}, s, Hkv={Hkv}, D={D}], got "
                         f"{k_suffix.shape} and {v_suffix.shape}")
    _check_kernel_head_dim(impl, D)
    _check_int32("prefix_lens", prefix_lens, B, "[B]", q)
    if not is_int(suffix_len) or not 0 <= suffix_len <= k_suffix.shape[2]:
        raise ValueError(f"suffix_len must be an int in [0, s={k_suffix.shape[2]}], got {suffix_len!r}")


def check_prefix_lens_values(lens: Sequence[int], capacity: int, suffix_len: int) -> None:
    """The values of ``prefix_lens`` (host ints): each in ``[0, S]``, and no
    beam without a key."""
    lens = [int(n) for n in lens]
    bad = [i for i, n in enumerate(lens) if not 0 <= n <= capacity]
    if bad:
        raise ValueError(f"prefix_lens must lie in [0, S={capacity}], got prefix_lens[{bad[0]}] = {lens[bad[0]]}")
    if suffix_len == 0 and min(lens) == 0:
        raise ValueError("every beam needs at least one key: prefix_lens has a 0 and suffix_len is 0")
