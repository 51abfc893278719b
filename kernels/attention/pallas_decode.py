"""Pallas TPU ``beam_decode_attention``: the prefix pass as a kernel, the
suffix and the log-sum-exp merge in jnp (the suffix is a handful of tokens).

Prefix kernel, grid ``(B, Hkv, num_kv_blocks)``: the ``R = W * G`` query rows
that share KV head ``h`` (row ``r = w * G + g``, padded to a multiple of 8)
form one ``[R, D]`` matrix, so each prefix block is DMA'd into VMEM once per
user and KV head and multiplied by all beams at once (MXU). ``prefix_lens`` is
scalar-prefetched: blocks past a user's prefix skip the compute and their
index map clamps to the last live block, so they are not fetched either.
Outputs the normalized partial output ``[B, Hkv, R, D]`` and its
log-sum-exp (lane-replicated ``[B, Hkv, R, 128]``).

Prefix layout: with ``D % 128 == 0`` the kernel reads ``[B, S, Hkv, D]`` in
place (viewed as ``[B, S, Hkv * D]``, block ``(bkv, D)`` at column ``h``); for
D = 64 the wrapper first moves heads ahead of tokens (one extra copy of the
prefix). ``S`` not a multiple of ``block_kv`` is zero-padded (another copy):
allocate KV caches in multiples of ``block_kv`` to avoid both.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from plum_kernels.attention.pallas import (
    MASK_VALUE,
    NUM_LANES,
    BlockSizes,
    compiler_params,
    dot_precision,
    interpret_params,
    lane_broadcast,
)

_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


def _prefix_kernel(plens_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, bkv,
                   num_kv_blocks):
    b, j = pl.program_id(0), pl.program_id(2)
    plen = plens_ref[b]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j * bkv < plen)
    def _compute():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32, precision=dot_precision(q.dtype)) * scale
        cols = j * bkv + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        ok = cols < plen
        s = jnp.where(ok, s, MASK_VALUE)
        m_prev = m_sc[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.where(ok, jnp.exp(s - lane_broadcast(m_next, bkv)), 0.0)
        # Tail keys past the prefix may be padding garbage: zero them in v too.
        v = jnp.where((j * bkv + lax.broadcasted_iota(jnp.int32, v.shape, 0)) < plen, v, jnp.zeros_like(v))
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_next
        acc_sc[...] = acc_sc[...] * alpha[:, 0:1] + lax.dot_general(
            p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32, precision=dot_precision(v.dtype))

    @pl.when(j == num_kv_blocks - 1)
    def _finish():
        l = l_sc[...]
        has = l > 0.0
        o_ref[...] = acc_sc[...] / jnp.where(has, l, 1.0)[:, 0:1]
        lse_ref[...] = jnp.where(has, m_sc[...] + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)


def prefix_attention(q_rows, k_prefix, v_prefix, prefix_lens, *, scale: float, blocks: BlockSizes, interpret: bool):
    """``q_rows [B, Hkv, R, D]`` (R a multiple of 8) over the prefix. Returns
    ``(o [B, Hkv, R, D] float32, lse [B, Hkv, R, 128] float32)``."""
    B, Hkv, R, D = q_rows.shape
    S = k_prefix.shape[1]
    bkv = blocks.block_kv
    s_pad = -(-max(S, 1) // bkv) * bkv
    if s_pad != S:
        pad = ((0, 0), (0, s_pad - S), (0, 0), (0, 0))
        k_prefix, v_prefix = jnp.pad(k_prefix, pad), jnp.pad(v_prefix, pad)
    nk = s_pad // bkv

    def last_live(b, plens):  # clamped to the blocks that exist, whatever plens holds
        return jnp.clip(lax.div(plens[b] + (bkv - 1), bkv) - 1, 0, nk - 1)

    if D % NUM_LANES == 0:
        k_in, v_in = (x.reshape(B, s_pad, Hkv * D) for x in (k_prefix, v_prefix))

        def kv_map(b, h, j, plens):
            return (b, jnp.minimum(j, last_live(b, plens)), h)
    else:
        k_in, v_in = (x.transpose(0, 2, 1, 3).reshape(B, Hkv * s_pad, D) for x in (k_prefix, v_prefix))

        def kv_map(b, h, j, plens):
            return (b, h * nk + jnp.minimum(j, last_live(b, plens)), 0)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(B, Hkv, nk),
        in_specs=[pl.BlockSpec((None, None, R, D), lambda b, h, j, plens: (b, h, 0, 0)),
                  pl.BlockSpec((None, bkv, D), kv_map),
                  pl.BlockSpec((None, bkv, D), kv_map)],
        out_specs=[pl.BlockSpec((None, None, R, D), lambda b, h, j, plens: (b, h, 0, 0)),
                   pl.BlockSpec((None, None, R, NUM_LANES), lambda b, h, j, plens: (b, h, 0, 0))],
        scratch_shapes=[pltpu.VMEM((R, NUM_LANES), jnp.float32), pltpu.VMEM((R, NUM_LANES), jnp.float32),
                        pltpu.VMEM((R, D), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_prefix_kernel, scale=scale, bkv=bkv, num_kv_blocks=nk),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, R, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, R, NUM_LANES), jnp.float32)],
        compiler_params=compiler_params("parallel", "parallel", "arbitrary"),
        interpret=interpret_params(interpret),
    )(prefix_lens.astype(jnp.int32), q_rows, k_in, v_in)


def beam_decode_attention_pallas(q, k_prefix, v_prefix, prefix_lens, k_suffix, v_suffix, suffix_len: int, *,
                                 scale: float, blocks: BlockSizes, interpret: bool):
    """Forward of ``beam_decode_attention`` (see the module doc). Returns
    ``[B, W, Hq, D]`` in q.dtype."""
    B, W, Hq, D = q.shape
    Hkv = k_prefix.shape[2]
    G = Hq // Hkv
    R = W * G
    r_pad = -(-R // 8) * 8
    q_rows = q.reshape(B, W, Hkv, G, D).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, R, D)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, r_pad - R), (0, 0)))
    o_p, lse_p = prefix_attention(q_rows, k_prefix, v_prefix, prefix_lens, scale=scale, blocks=blocks,
                                  interpret=interpret)
    o_p = o_p[:, :, :R].reshape(B, Hkv, W, G, D).transpose(0, 2, 1, 3, 4)          # [B, W, Hkv, G, D]
    lse_p = lse_p[:, :, :R, 0].reshape(B, Hkv, W, G).transpose(0, 2, 1, 3)           # [B, W, Hkv, G]
    # Suffix part and the log-sum-exp merge (tiny: suffix_len tokens per beam).
    qf = q.astype(jnp.float32).reshape(B, W, Hkv, G, D)
    ks = k_suffix[:, :, :suffix_len].astype(jnp.float32)
    vs = v_suffix[:, :, :suffix_len].astype(jnp.float32)
    s = jnp.einsum("bwhgd,bwshd->bwhgs", qf, ks, precision=lax.Precision.HIGHEST) * scale
    m = jnp.maximum(lse_p, jnp.max(s, axis=-1, initial=-jnp.inf))
    w_p = jnp.exp(lse_p - m)
    p = jnp.exp(s - m[..., None])
    num = w_p[..., None] * o_p + jnp.einsum("bwhgs,bwshd->bwhgd", p, vs, precision=lax.Precision.HIGHEST)
    out = num / (w_p + jnp.sum(p, axis=-1))[..., None]
    return out.reshape(B, W, Hq, D).astype(q.dtype)
