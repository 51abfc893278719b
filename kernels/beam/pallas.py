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
   is ``w * C + p``, children being token-sorted).

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


def _select_kernel(logits_ref, cand_ref, beam_ref, score_ref, index_ref, *, W: int, children_norm: bool):
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
    score = jnp.where(cl == -jnp.inf, -jnp.inf, score)
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

    init = (score, jnp.full((1, W), -jnp.inf, jnp.float32), jnp.full((1, W), -1, jnp.int32))
    _, out_s, out_i = jax.lax.fori_loop(0, W, body, init)
    score_ref[0] = out_s
    index_ref[0] = out_i


@functools.partial(jax.jit, static_argnames=("W", "normalize", "interpret"))
def beam_select(x, cand_logits, beam_scores, *, W: int, normalize: str = "codebook", interpret: bool = False):
    """Fused log-softmax + score add + top-``W`` selection.

    ``x [B, W_in, V]`` the level's logits (any float dtype), ``cand_logits
    [B, W_in, C]`` float32 child logits (``-inf`` = none), ``beam_scores
    [B, W_in]`` float32. Returns ``(scores [B, W] f32, flat [B, W] int32)``.
    ``interpret=True`` runs TPU interpret mode (CPU tests)."""
    B, W_in, V = x.shape
    C = cand_logits.shape[2]
    kernel = functools.partial(_select_kernel, W=W, children_norm=normalize == "children")
    spec = lambda *blk: pl.BlockSpec(blk, lambda b: (b, 0, 0), memory_space=pltpu.VMEM)  # noqa: E731
    scores, flat = pl.pallas_call(
        kernel,
        grid=(B,),
        in_specs=[spec(1, W_in, V), spec(1, W_in, C), spec(1, W_in, 1)],
        out_specs=[spec(1, 1, W), spec(1, 1, W)],
        out_shape=[jax.ShapeDtypeStruct((B, 1, W), jnp.float32), jax.ShapeDtypeStruct((B, 1, W), jnp.int32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(x, cand_logits, beam_scores.astype(jnp.float32)[..., None])
    return scores[:, 0], flat[:, 0]
