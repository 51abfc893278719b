"""Pallas TPU forward of ``history_attention`` (splash-attention style).

Layout. The wrapper pads the packed tokens up to ``T_pad`` (a multiple of the
blocks, which are multiples of 128) and moves heads first: q ``[Hq, T_pad, D]``,
k/v ``[Hkv, T_pad, D]``. Tokens carry segment ids derived from ``cu_seqlens``;
the padding tokens form one extra segment of their own (so every row has at
least one key and nothing divides by zero; their rows are dropped). Segment
ids travel in two lane/sublane-broadcast layouts, as in splash attention:
``seg_cols [T_pad, 128]`` (a column per block row) and ``seg_rows [8, T_pad]``.

Grid ``(Hq, num_q_blocks, num_kv_blocks)``, the kv axis innermost
("arbitrary") with the online softmax in VMEM scratch. Block skipping: for q
block ``i`` the kv blocks that hold any visible key form a contiguous range
``[kv_lo[i], kv_hi[i]]`` (its segments' tokens, cut at the diagonal when
causal); both arrays are scalar-prefetched (SMEM). Blocks outside the range
skip the compute with ``pl.when`` and their index maps clamp to the range, so
the pipeline does not fetch anything new for them either.

The log-sum-exp leaves as ``[Hq, 1, T_pad]`` (lane-dense rows), which is also
the layout the backward reads.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NUM_LANES = 128
NUM_SUBLANES = 8
# Finite "minus infinity" (splash attention's choice): a row whose keys in one
# block are all masked gets finite garbage that the next real maximum scales
# by exp(-huge) = 0, instead of NaN from (-inf) - (-inf).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=["block_q", "block_kv"])
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the Pallas attention kernels (multiples of 128). The defaults
    are splash attention's 128 x 128 minimum, chosen by that rule rather than
    by timing; ``tests/kernels/attention/test_ops_jax.py`` lowers the forward, dK/dV and
    dQ kernels with them for TPU through Mosaic. A pytree without leaves (both
    sizes are static aux data), so it can be a ``jax.jit`` argument."""

    block_q: int = 128
    block_kv: int = 128

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if value <= 0 or value % 128:
                raise ValueError(f"{name} must be a positive multiple of 128, got {value}")


def interpret_params(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def compiler_params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


@dataclasses.dataclass(frozen=True)
class Packed:
    """Padded, segment-annotated view of a jagged batch (see module doc)."""

    t_pad: int
    seg_cols: jax.Array      # int32 [T_pad, 128]
    seg_rows: jax.Array      # int32 [8, T_pad]
    kv_lo: jax.Array         # int32 [num_q_blocks]: first live kv block of q block i
    kv_hi: jax.Array         # int32 [num_q_blocks]: last live kv block
    q_lo: jax.Array          # int32 [num_kv_blocks]: first q block that sees kv block j
    q_hi: jax.Array          # int32 [num_kv_blocks]


def pack(cu_seqlens: jax.Array, total_tokens: int, blocks: BlockSizes, causal: bool) -> Packed:
    bq, bkv = blocks.block_q, blocks.block_kv
    step = max(bq, bkv)
    t_pad = max(step, -(-total_tokens // step) * step)
    cu_ext = jnp.concatenate([cu_seqlens.astype(jnp.int32), jnp.array([t_pad], jnp.int32)])
    pos = jnp.arange(t_pad, dtype=jnp.int32)
    seg = (jnp.searchsorted(cu_ext, pos, side="right") - 1).astype(jnp.int32)
    # q block i -> live kv blocks
    q_first = seg[pos[::bq]]
    q_last = seg[pos[bq - 1::bq]]
    kv_start = cu_ext[q_first]
    kv_end = cu_ext[q_last + 1]
    if causal:
        kv_end = jnp.minimum(kv_end, pos[::bq] + bq)
    kv_lo, kv_hi = kv_start // bkv, (kv_end - 1) // bkv
    # kv block j -> q blocks that see it
    k_first = seg[pos[::bkv]]
    k_last = seg[pos[bkv - 1::bkv]]
    q_start = cu_ext[k_first]
    if causal:
        q_start = jnp.maximum(q_start, pos[::bkv])
    q_end = cu_ext[k_last + 1]
    q_lo, q_hi = q_start // bq, (q_end - 1) // bq
    # Block indices within the arrays whatever the values of cu_seqlens (the op
    # checks them when concrete; traced, invalid ones must not make a kernel
    # fetch a block outside q / k / v).
    nq, nk = t_pad // bq, t_pad // bkv
    kv_lo, kv_hi = jnp.clip(kv_lo, 0, nk - 1), jnp.clip(kv_hi, 0, nk - 1)
    q_lo, q_hi = jnp.clip(q_lo, 0, nq - 1), jnp.clip(q_hi, 0, nq - 1)
    return Packed(t_pad, jnp.broadcast_to(seg[:, None], (t_pad, NUM_LANES)),
                  jnp.broadcast_to(seg[None, :], (NUM_SUBLANES, t_pad)),
                  kv_lo.astype(jnp.int32), kv_hi.astype(jnp.int32), q_lo.astype(jnp.int32), q_hi.astype(jnp.int32))


def heads_first(x: jax.Array, t_pad: int) -> jax.Array:
    """``[T, H, D]`` -> zero-padded ``[H, T_pad, D]``."""
    return jnp.pad(x, ((0, t_pad - x.shape[0]), (0, 0), (0, 0))).transpose(1, 0, 2)


def dot_precision(dtype):
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def lane_broadcast(col: jax.Array, width: int) -> jax.Array:
    """``[rows, 128]`` lane-replicated column -> ``[rows, width]``."""
    if width == NUM_LANES:
        return col
    return jnp.concatenate([col] * (width // NUM_LANES), axis=1)


def _fwd_kernel(kv_lo_ref, kv_hi_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, scale, causal, bq, bkv, num_kv_blocks):
    i, j = pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((j >= kv_lo_ref[i]) & (j <= kv_hi_ref[i]))
    def _compute():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                            precision=dot_precision(q.dtype)) * scale                      # [bq, bkv]
        keep = lane_broadcast(qseg_ref[...], bkv) == kvseg_ref[0:1, :]
        if causal:
            rows = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bkv), 0)
            cols = j * bkv + lax.broadcasted_iota(jnp.int32, (bq, bkv), 1)
            keep = keep & (cols <= rows)
        s = jnp.where(keep, s, MASK_VALUE)
        m_prev = m_sc[...]                                                                  # [bq, 128]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - lane_broadcast(m_next, bkv))
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_next
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                             precision=dot_precision(v.dtype))
        acc_sc[...] = acc_sc[...] * alpha[:, 0:1] + pv

    @pl.when(j == num_kv_blocks - 1)
    def _finish():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / l[:, 0:1]).astype(o_ref.dtype)
        lse = m_sc[...] + jnp.log(l)                                                        # [bq, 128]
        lse_ref[...] = jnp.transpose(lse)[0:1, :]                                           # [1, bq]


def history_attention_fwd_padded(q_h, k_h, v_h, packed: Packed, *, causal: bool, scale: float,
                                 blocks: BlockSizes, interpret: bool):
    """Kernel call on the padded heads-first layout. Returns
    ``(out [Hq, T_pad, D], lse [Hq, 1, T_pad] float32)``."""
    hq, t_pad, d = q_h.shape
    group = hq // k_h.shape[0]
    bq, bkv = blocks.block_q, blocks.block_kv
    nq, nk = t_pad // bq, t_pad // bkv

    def kv_block(i, j, lo, hi):
        return jnp.minimum(jnp.maximum(j, lo[i]), hi[i])

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(hq, nq, nk),
        in_specs=[
            pl.BlockSpec((None, bq, d), lambda h, i, j, lo, hi: (h, i, 0)),
            pl.BlockSpec((None, bkv, d), lambda h, i, j, lo, hi: (lax.div(h, group), kv_block(i, j, lo, hi), 0)),
            pl.BlockSpec((None, bkv, d), lambda h, i, j, lo, hi: (lax.div(h, group), kv_block(i, j, lo, hi), 0)),
            pl.BlockSpec((bq, NUM_LANES), lambda h, i, j, lo, hi: (i, 0)),
            pl.BlockSpec((NUM_SUBLANES, bkv), lambda h, i, j, lo, hi: (0, kv_block(i, j, lo, hi))),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, d), lambda h, i, j, lo, hi: (h, i, 0)),
            pl.BlockSpec((None, 1, bq), lambda h, i, j, lo, hi: (h, 0, i)),
        ],
        scratch_shapes=[pltpu.VMEM((bq, NUM_LANES), jnp.float32), pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
    )
    kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, bq=bq, bkv=bkv, num_kv_blocks=nk)
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((hq, t_pad, d), q_h.dtype),
                   jax.ShapeDtypeStruct((hq, 1, t_pad), jnp.float32)],
        compiler_params=compiler_params("parallel", "parallel", "arbitrary"),
        interpret=interpret_params(interpret),
    )(packed.kv_lo, packed.kv_hi, q_h, k_h, v_h, packed.seg_cols, packed.seg_rows)
