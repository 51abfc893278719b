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
