"""Pallas TPU kernel of the trie-constrained beam step (semantics: ``reference.py``).

TPU split of the work. Mosaic has no general lane gather, so the sparse part
(walking the CSR and fetching each child's logit) stays in XLA, which gathers
``[B, W_in, C]`` child logits (``C`` = static bound on the child count at the
level, ``children_bound``); the dense part is one kernel per user
(``grid=(B,)``) that

1. reads the user's ``[W_in, V]`` logits tile once from HBM into VMEM and takes
   each row's log-sum-exp in float32 (``normalize="codebook"``), or the
   log-sum-exp of the children (``"children"``),
2. adds the beam scores,
3. selects the best ``W`` of the ``W_in x C`` candidates by ``W`` rounds of
   (max, lowest flat index among the maxima, knock out), which is exactly the
   documented order: score descending, then parent, then token (the flat index
   is ``w * C + p``, children being token-sorted). NaN candidates (semantics
   5 of ``reference.py``) are set aside and, only when a user has any, fill
   the slots left free in a second round, lowest flat index first.

Blocks equal the full trailing dims (``[1, W_in, V]``, ``[1, W_in, C]``,
``[1, 1, W]``), which Mosaic accepts for any size; VMEM use is about
``2 * W_in * (V + C) * 4`` bytes (2 MiB at W = 256, V = 2048), well within
the default scoped limit. Outputs: scores ``[B, W]`` float32 and the flat index
``[B, W]`` int32 (``-1`` in empty slots), decoded by the caller.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_BIG = 2**31 - 1


def _select_kernel(logits_ref, cand_ref, beam_ref, *refs, W: int, children_norm: bool, has_bias: bool):
    bias_ref, score_ref, index_ref = refs if has_bias else (None, *refs)
    cl = cand_ref[0]                                    # [W_in, C] float32, -inf = no child
    W_in, C = cl.shape
    if children_norm:
        m = jnp.max(cl, axis=1, keepdims=True)
        m_safe = jnp.where(m == -jnp.inf, 0.0, m)
        s = jnp.sum(jnp.exp(cl - m_safe), axis=1, keepdims=True)
        lse = jnp.where(m == -jnp.inf, 0.0, m_safe + jnp.log(s))
    else:
        x = logits_ref[0].astype(jnp.float32)           # [W_in, V]
        m = jnp.max(x, axis=1, keepdims=True)
        lse = m + jnp.log(jnp.sum(jnp.exp(x - m), axis=1, keepdims=True))
    score = beam_ref[0] + (cl - lse)                    # [W_in, 1] + [W_in, C]
    if has_bias:
        score = score + bias_ref[0]                     # after the normalisation (reference.py, semantics 3)
    score = jnp.where(cl == -jnp.inf, -jnp.inf, score)
    nan = score != score
    flat = (jax.lax.broadcasted_iota(jnp.int32, (W_in, C), 0) * C
            + jax.lax.broadcasted_iota(jnp.int32, (W_in, C), 1))
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, W), 1)

    def body(i, carry):
        sc, out_s, out_i = carry
        m = jnp.max(jnp.max(sc, axis=1, keepdims=True), axis=0, keepdims=True)          # [1, 1]
        hit = jnp.where(sc == m, flat, _BIG)
        idx = jnp.min(jnp.min(hit, axis=1, keepdims=True), axis=0, keepdims=True)       # [1, 1]
        ok = m > -jnp.inf
        out_s = jnp.where(lane == i, m, out_s)
        out_i = jnp.where(lane == i, jnp.where(ok, idx, -1), out_i)
        sc = jnp.where(flat == idx, -jnp.inf, sc)
        return sc, out_s, out_i

    # numbers first (NaN set aside as -inf) ...
    init = (jnp.where(nan, -jnp.inf, score), jnp.full((1, W), -jnp.inf, jnp.float32), jnp.full((1, W), -1, jnp.int32))
    _, out_s, out_i = jax.lax.fori_loop(0, W, body, init)
    score_ref[0] = out_s
    index_ref[0] = out_i
    nan_count = jnp.sum(jnp.sum(nan.astype(jnp.int32), axis=1, keepdims=True), axis=0, keepdims=True)

    # ... then, only if there are NaN candidates, they fill the free slots in flat order
    @pl.when(nan_count[0, 0] > 0)
    def _nan_fill():
        filled = jnp.sum((index_ref[0] >= 0).astype(jnp.int32), axis=1, keepdims=True)   # [1, 1]

        def fill(i, carry):
            left, out_s, out_i = carry
            idx = jnp.min(jnp.min(jnp.where(left > 0, flat, _BIG), axis=1, keepdims=True), axis=0, keepdims=True)
            take = (lane == i) & (i >= filled) & (idx < _BIG)
            out_s = jnp.where(take, jnp.nan, out_s)
            out_i = jnp.where(take, idx, out_i)
            left = jnp.where((flat == idx) & (i >= filled), 0, left)
            return left, out_s, out_i

        _, s2, i2 = jax.lax.fori_loop(0, W, fill, (nan.astype(jnp.int32), score_ref[0], index_ref[0]))
        score_ref[0] = s2
        index_ref[0] = i2


@functools.partial(jax.jit, static_argnames=("W", "normalize", "interpret"))
def beam_select(x, cand_logits, beam_scores, cand_bias=None, *, W: int, normalize: str = "codebook",
                interpret: bool = False):
    """Fused log-softmax + score add (+ edge bias) + top-``W`` selection.

    ``x [B, W_in, V]`` the level's logits (any float dtype), ``cand_logits
    [B, W_in, C]`` float32 child logits (``-inf`` = none), ``beam_scores
    [B, W_in]`` float32, ``cand_bias`` optional float32 ``[B, W_in, C]`` (each
    candidate's edge bias, gathered by the caller; without it the kernel has
    no bias input). Returns ``(scores [B, W] f32, flat [B, W] int32)``.
    ``interpret=True`` runs TPU interpret mode (CPU tests)."""
    B, W_in, V = x.shape
    C = cand_logits.shape[2]
    has_bias = cand_bias is not None
    kernel = functools.partial(_select_kernel, W=W, children_norm=normalize == "children", has_bias=has_bias)
    spec = lambda *blk: pl.BlockSpec(blk, lambda b: (b, 0, 0), memory_space=pltpu.VMEM)  # noqa: E731
    inputs = (x, cand_logits, beam_scores.astype(jnp.float32)[..., None]) + ((cand_bias,) if has_bias else ())
    scores, flat = pl.pallas_call(
        kernel,
        grid=(B,),
        in_specs=[spec(1, W_in, V), spec(1, W_in, C), spec(1, W_in, 1)] + ([spec(1, W_in, C)] if has_bias else []),
        out_specs=[spec(1, 1, W), spec(1, 1, W)],
        out_shape=[jax.ShapeDtypeStruct((B, 1, W), jnp.float32), jax.ShapeDtypeStruct((B, 1, W), jnp.int32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(*inputs)
    return scores[:, 0], flat[:, 0]


# ----------------------------------------------------------------------------- trie_aggregate
# The segmented sums (gathers and scatters over the CSR, which Mosaic cannot express) run in XLA
# (``reference_jax.aggregate_masses``); the kernel smooths and takes the log-ratio of every edge, the
# edges laid out as ``[R, 128]`` lane-dense rows, ``RATIO_ROWS`` rows per grid step.

RATIO_ROWS = 64       # 64 x 128 float32 = 32 KiB per operand and step


def _ratio_kernel(em_ref, ec_ref, pm_ref, pc_ref, out_ref, *, eps: float):
    e = jnp.float32(eps)
    out_ref[...] = jnp.log(em_ref[...] + e * ec_ref[...]) - jnp.log(pm_ref[...] + e * pc_ref[...])


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def log_ratio(edge_mass, edge_count, parent_mass, parent_count, *, eps: float, interpret: bool = False):
    """``log(edge_mass + eps * edge_count) - log(parent_mass + eps * parent_count)``
    float32 ``[E]`` from four float32 ``[E]`` arrays (``reference_jax.log_ratio``)."""
    E = edge_mass.shape[0]
    rows = max(RATIO_ROWS, -(-E // (128 * RATIO_ROWS)) * RATIO_ROWS)
    pad = rows * 128 - E
    # padding edges read mass 1 (log 1 - log 1 = 0), never 0
    args = [jnp.pad(a.astype(jnp.float32), (0, pad), constant_values=1.0).reshape(rows, 128)
            for a in (edge_mass, edge_count, parent_mass, parent_count)]
    spec = pl.BlockSpec((RATIO_ROWS, 128), lambda i: (i, 0), memory_space=pltpu.VMEM)
    out = pl.pallas_call(
        functools.partial(_ratio_kernel, eps=float(eps)),
        grid=(rows // RATIO_ROWS,),
        in_specs=[spec] * 4,
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct((rows, 128), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(*args)
    return out.reshape(-1)[:E]
