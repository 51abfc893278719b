"""jnp reference for the attention op family (same contract as reference.py).

Shapes are static under ``jax.jit``: the packed batch is handled with segment
ids derived from ``cu_seqlens`` and a dense ``[T, T]`` mask (O(T^2) memory: a
reference, not a fast path). Math in float32 (float64 when x64 is enabled and
the inputs are float64); outputs in the input dtype, the log-sum-exp
``[Hq, T]`` in float32. Differentiable with ``jax.grad``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["history_attention_reference", "beam_decode_attention_reference", "segment_ids"]


def _acc(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def segment_ids(cu_seqlens: jax.Array, total_tokens: int) -> jax.Array:
    """int32 ``[T]``: the sequence of each packed token (empty sequences own none)."""
    pos = jnp.arange(total_tokens, dtype=jnp.int32)
    return (jnp.searchsorted(cu_seqlens.astype(jnp.int32), pos, side="right") - 1).astype(jnp.int32)


def history_attention_reference(q, k, v, cu_seqlens, *, causal: bool = True, scale: float | None = None):
    """``(out [T, Hq, D] in q.dtype, lse [Hq, T] float32)``; see reference.py."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = _acc(q.dtype)
    kf = jnp.repeat(k.astype(acc), group, axis=1)
    vf = jnp.repeat(v.astype(acc), group, axis=1)
    s = jnp.einsum("thd,jhd->htj", q.astype(acc), kf) * scale
    seg = segment_ids(cu_seqlens, T)
    keep = seg[:, None] == seg[None, :]
    if causal:
        pos = jnp.arange(T)
        keep = keep & (pos[None, :] <= pos[:, None])
    s = jnp.where(keep[None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)                           # [Hq, T]
    p = jnp.exp(s - lse[..., None])
    out = jnp.einsum("htj,jhd->thd", p, vf)
    return out.astype(q.dtype), lse.astype(jnp.float32 if acc == jnp.float32 else acc)


BAND_BLOCK = 64  # queries per block of history_attention_banded


def band_width(max_seqlen: int, causal: bool, block: int = BAND_BLOCK) -> int:
    """Keys that one block of :func:`history_attention_banded` reads: the block and ``max_seqlen - 1``
    before it (and after it, without ``causal``)."""
    return block + (max_seqlen - 1) * (1 if causal else 2)


def history_attention_banded(q, k, v, cu_seqlens, max_seqlen: int, *, causal: bool = True,
                             scale: float | None = None, block: int = BAND_BLOCK):
    """:func:`history_attention_reference` computed per block of ``block`` queries over only the keys within
    ``max_seqlen - 1`` tokens of the block (where every key of its queries' sequences lies when no
    sequence is longer than ``max_seqlen``): ``T * band_width`` scores instead of ``T^2``, the same
    results up to rounding. ``(out [T, Hq, D] in q.dtype, lse [Hq, T] float32)``."""
    T, Hq, D = q.shape
    S = int(max_seqlen)
    group = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = _acc(q.dtype)
    nb = -(-T // block)
    Tp = nb * block
    before, after = S - 1, (0 if causal else S - 1)
    W = band_width(S, causal, block)
    seg = segment_ids(cu_seqlens, T)
    pad = ((before, Tp - T + after), (0, 0), (0, 0))
    kf = jnp.pad(jnp.repeat(k.astype(acc), group, axis=1), pad)
    vf = jnp.pad(jnp.repeat(v.astype(acc), group, axis=1), pad)
    idx = jnp.arange(nb)[:, None] * block + jnp.arange(W)[None, :]          # [nb, W] into the padded keys
    seg_k = jnp.pad(seg, (before, Tp - T + after), constant_values=-1)[idx]  # pad keys: segment -1
    pos_k = (jnp.arange(Tp + before + after) - before)[idx]
    qb = jnp.pad(q.astype(acc), ((0, Tp - T), (0, 0), (0, 0))).reshape(nb, block, Hq, D)
    seg_q = jnp.pad(seg, (0, Tp - T), constant_values=-2).reshape(nb, block)  # pad queries: segment -2
    pos_q = jnp.arange(Tp).reshape(nb, block)
    keep = seg_q[:, :, None] == seg_k[:, None, :]                            # [nb, block, W]
    if causal:
        keep = keep & (pos_k[:, None, :] <= pos_q[:, :, None])
    s = jnp.einsum("bihd,bjhd->bhij", qb, kf[idx]) * scale                   # [nb, Hq, block, W]
    # a pad query keeps no key: its row is left finite (uniform) and cut below, so no NaN reaches a gradient
    s = jnp.where(keep[:, None], s, jnp.where(keep.any(-1)[:, None, :, None], -jnp.inf, 0.0))
    lse = jax.nn.logsumexp(s, axis=-1)                                       # [nb, Hq, block]
    p = jnp.exp(s - lse[..., None])
    out = jnp.einsum("bhij,bjhd->bihd", p, vf[idx]).reshape(Tp, Hq, D)[:T]
    lse = lse.transpose(1, 0, 2).reshape(Hq, Tp)[:, :T]
    return out.astype(q.dtype), lse.astype(jnp.float32 if acc == jnp.float32 else acc)


def beam_decode_attention_reference(q, k_prefix, v_prefix, prefix_lens, k_suffix, v_suffix, suffix_len: int, *,
                                    scale: float | None = None):
    """``out [B, W, Hq, D]`` in q.dtype; see reference.py."""
    B, W, Hq, D = q.shape
    S, Hkv = k_prefix.shape[1], k_prefix.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = _acc(q.dtype)
    qf = q.astype(acc).reshape(B, W, Hkv, group, D)
    sp = jnp.einsum("bwhgd,bshd->bwhgs", qf, k_prefix.astype(acc)) * scale
    sp = jnp.where((jnp.arange(S)[None, :] < prefix_lens[:, None])[:, None, None, None, :], sp, -jnp.inf)
    ss = jnp.einsum("bwhgd,bwshd->bwhgs", qf, k_suffix.astype(acc)) * scale
    ss = jnp.where(jnp.arange(k_suffix.shape[2]) < suffix_len, ss, -jnp.inf)
    p = jax.nn.softmax(jnp.concatenate([sp, ss], axis=-1), axis=-1)
    out = (jnp.einsum("bwhgs,bshd->bwhgd", p[..., :S], v_prefix.astype(acc))
           + jnp.einsum("bwhgs,bwshd->bwhgd", p[..., S:], v_suffix.astype(acc)))
    return out.reshape(B, W, Hq, D).astype(q.dtype)
