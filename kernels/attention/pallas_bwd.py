"""Pallas TPU backward of ``history_attention`` (layout and block skipping as
in pallas.py).

Two kernels, both computing the transposed scores ``s^T = K Q^T [bkv, bq]``
so that the forward's log-sum-exp and ``delta = rowsum(dO * O) - dLSE`` are
used as lane-dense rows ``[1, bq]`` (no per-step transposes of them):

- ``_dkv_kernel``, grid ``(Hkv, num_kv_blocks, G, num_q_blocks)``: dK and dV
  of one kv block accumulate in VMEM over the G query heads of its group and
  the live q blocks (``q_lo[j] .. q_hi[j]``, scalar-prefetched); no atomics.
- ``_dq_kernel``, grid ``(Hq, num_q_blocks, num_kv_blocks)``: dQ of one q
  block accumulates over its live kv blocks; ``dQ += (dS^T)^T K``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from plum_kernels.attention.pallas import (
    NUM_LANES,
    NUM_SUBLANES,
    BlockSizes,
    Packed,
    compiler_params,
    dot_precision,
    interpret_params,
    lane_broadcast,
)

_NT = (((1,), (1,)), ((), ()))   # a @ b^T
_NN = (((1,), (0,)), ((), ()))   # a @ b


def _probs_t(q, k, lse_row, qseg_row, kvseg_col, *, scale, causal, i, j, bq, bkv):
    """``p^T [bkv, bq] = exp(scale * k q^T - lse)`` with the segment/causal mask."""
    s_t = lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32, precision=dot_precision(q.dtype)) * scale
    keep = lane_broadcast(kvseg_col, bq) == qseg_row
    if causal:
        k_pos = j * bkv + lax.broadcasted_iota(jnp.int32, (bkv, bq), 0)
        q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bkv, bq), 1)
        keep = keep & (k_pos <= q_pos)
    return jnp.where(keep, jnp.exp(s_t - lse_row), 0.0)


def _dkv_kernel(q_lo_ref, q_hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kvseg_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, scale, causal, bq, bkv, group, num_q_blocks):
    j, g, i = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when((i >= q_lo_ref[j]) & (i <= q_hi_ref[j]))
    def _compute():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        p_t = _probs_t(q, k, lse_ref[...], qseg_ref[0:1, :], kvseg_ref[...], scale=scale, causal=causal,
                       i=i, j=j, bq=bq, bkv=bkv)
        prec = dot_precision(q.dtype)
        dv_sc[...] += lax.dot_general(p_t.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32,
                                      precision=prec)
        dp_t = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32, precision=prec)
        ds_t = p_t * (dp_t - di_ref[...])
        dk_sc[...] += lax.dot_general(ds_t.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32,
                                      precision=prec)

    @pl.when((g == group - 1) & (i == num_q_blocks - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(kv_lo_ref, kv_hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kvseg_ref,
               dq_ref, dq_sc, *, scale, causal, bq, bkv, num_kv_blocks):
    i, j = pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when((j >= kv_lo_ref[i]) & (j <= kv_hi_ref[i]))
    def _compute():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        p_t = _probs_t(q, k, lse_ref[...], qseg_ref[0:1, :], kvseg_ref[...], scale=scale, causal=causal,
                       i=i, j=j, bq=bq, bkv=bkv)
        prec = dot_precision(q.dtype)
        dp_t = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32, precision=prec)
        ds = jnp.transpose(p_t * (dp_t - di_ref[...]))                                     # [bq, bkv]
        dq_sc[...] += lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32,
                                      precision=prec)

    @pl.when(j == num_kv_blocks - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def history_attention_bwd_padded(q_h, k_h, v_h, do_h, lse, di, packed: Packed, *, causal: bool, scale: float,
                                 blocks: BlockSizes, interpret: bool):
    """Gradients on the padded heads-first layout: ``lse`` and ``di`` are
    ``[Hq, 1, T_pad]`` float32. Returns ``(dq_h, dk_h, dv_h)``."""
    hq, t_pad, d = q_h.shape
    hkv = k_h.shape[0]
    group = hq // hkv
    bq, bkv = blocks.block_q, blocks.block_kv
    nq, nk = t_pad // bq, t_pad // bkv

    def clamp(x, lo, hi, idx):
        return jnp.minimum(jnp.maximum(x, lo[idx]), hi[idx])

    # dK / dV: grid (h_kv, j, g, i)
    def q_map(h, j, g, i, lo, hi):
        return (h * group + g, clamp(i, lo, hi, j), 0)

    def row_map(h, j, g, i, lo, hi):
        return (h * group + g, 0, clamp(i, lo, hi, j))

    def kv_map(h, j, g, i, lo, hi):
        return (h, j, 0)

    dkv_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(hkv, nk, group, nq),
        in_specs=[
            pl.BlockSpec((None, bq, d), q_map),
            pl.BlockSpec((None, bkv, d), kv_map),
            pl.BlockSpec((None, bkv, d), kv_map),
            pl.BlockSpec((None, bq, d), q_map),
            pl.BlockSpec((None, 1, bq), row_map),
            pl.BlockSpec((None, 1, bq), row_map),
            pl.BlockSpec((NUM_SUBLANES, bq), lambda h, j, g, i, lo, hi: (0, clamp(i, lo, hi, j))),
            pl.BlockSpec((bkv, NUM_LANES), lambda h, j, g, i, lo, hi: (j, 0)),
        ],
        out_specs=[pl.BlockSpec((None, bkv, d), kv_map), pl.BlockSpec((None, bkv, d), kv_map)],
        scratch_shapes=[pltpu.VMEM((bkv, d), jnp.float32), pltpu.VMEM((bkv, d), jnp.float32)],
    )
    dk_h, dv_h = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, causal=causal, bq=bq, bkv=bkv, group=group, num_q_blocks=nq),
        grid_spec=dkv_spec,
        out_shape=[jax.ShapeDtypeStruct(k_h.shape, k_h.dtype), jax.ShapeDtypeStruct(v_h.shape, v_h.dtype)],
        compiler_params=compiler_params("parallel", "parallel", "arbitrary", "arbitrary"),
        interpret=interpret_params(interpret),
    )(packed.q_lo, packed.q_hi, q_h, k_h, v_h, do_h, lse, di, packed.seg_rows, packed.seg_cols)

    # dQ: grid (h, i, j)
    def kvb(h, i, j, lo, hi):
        return (lax.div(h, group), clamp(j, lo, hi, i), 0)

    dq_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(hq, nq, nk),
        in_specs=[
            pl.BlockSpec((None, bq, d), lambda h, i, j, lo, hi: (h, i, 0)),
            pl.BlockSpec((None, bkv, d), kvb),
            pl.BlockSpec((None, bkv, d), kvb),
            pl.BlockSpec((None, bq, d), lambda h, i, j, lo, hi: (h, i, 0)),
            pl.BlockSpec((None, 1, bq), lambda h, i, j, lo, hi: (h, 0, i)),
            pl.BlockSpec((None, 1, bq), lambda h, i, j, lo, hi: (h, 0, i)),
            pl.BlockSpec((NUM_SUBLANES, bq), lambda h, i, j, lo, hi: (0, i)),
            pl.BlockSpec((bkv, NUM_LANES), lambda h, i, j, lo, hi: (clamp(j, lo, hi, i), 0)),
        ],
        out_specs=pl.BlockSpec((None, bq, d), lambda h, i, j, lo, hi: (h, i, 0)),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
    )
    dq_h = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, causal=causal, bq=bq, bkv=bkv, num_kv_blocks=nk),
        grid_spec=dq_spec,
        out_shape=jax.ShapeDtypeStruct(q_h.shape, q_h.dtype),
        compiler_params=compiler_params("parallel", "parallel", "arbitrary"),
        interpret=interpret_params(interpret),
    )(packed.kv_lo, packed.kv_hi, q_h, k_h, v_h, do_h, lse, di, packed.seg_rows, packed.seg_cols)
    return dq_h, dk_h, dv_h
