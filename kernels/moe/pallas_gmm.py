"""Pallas TPU grouped matmul (megablox-style ``gmm`` / ``tgmm``).

``gmm(lhs[m, k], rhs[g, k, n], group_sizes[g])``: the rows of ``lhs`` are
sorted by group; ``tgmm(lhs[m, k], dy[m, n], group_sizes)`` is the weight
gradient ``dw[e] = lhs_e^T dy_e``.

Group metadata (computed with jnp, handed to the kernel by scalar prefetch):
the grid walks the (group, M-tile) pairs in order; an M-tile that straddles a
group boundary is visited once per group it holds, and each visit keeps only
its group's rows (a row mask built from the group offsets). The number of
visits is at most ``tiles_m + g - 1``; the grid has that static size and the
spare steps repeat the last real visit with an empty mask. Because visits of
one output tile (``gmm``) or one group (``tgmm``) are consecutive grid steps,
the output block stays resident in VMEM across them.

Shapes that are not multiples of the tiles are zero-padded by the wrappers
(padding K with zeros is exact), so every block is ``(tm, tk)`` / ``(tk, tn)``
with ``tm`` a multiple of 8 (16 for 16-bit types) and ``tk``, ``tn`` multiples
of 128. Accumulation is float32 in a VMEM scratch.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


@functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=["tm", "tk", "tn"])
@dataclasses.dataclass(frozen=True)
class GmmTiles:
    """``(tm, tk, tn)`` of both kernels. Default 128 x 128 x 128, megablox's
    default tiling, chosen by that rule rather than by timing;
    ``tests/kernels/moe/test_ops_jax.py`` lowers ``gmm`` and ``tgmm`` with it for TPU
    through Mosaic. A pytree without leaves (the tiles are static aux data), so
    it can be a ``jax.jit`` argument."""

    tm: int = 128
    tk: int = 128
    tn: int = 128

    def __post_init__(self):
        if not isinstance(self.tm, int) or self.tm < 8 or self.tm % 8:
            raise ValueError(f"tm must be a positive multiple of 8, got {self.tm!r}")
        for name in ("tk", "tn"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 128 or v % 128:
                raise ValueError(f"{name} must be a positive multiple of 128, got {v!r}")


DEFAULT_TILES = GmmTiles()


def _interpret_arg(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def group_metadata(group_sizes, m: int, tm: int):
    """-> ``(offsets [g+1], group_ids [V], m_tile_ids [V], num_visits [1])``,
    ``V = cdiv(m, tm) + g - 1`` static; spare visits repeat the last real one."""
    g = group_sizes.shape[0]
    # Offsets clamped into [0, m] (negative sizes count as 0, rows past m are
    # dropped): whatever the traced sizes hold, every visit is a real M-tile
    # and no block index leaves the arrays.
    offsets = jnp.minimum(jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                           jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0))]), m)
    gs = offsets[1:] - offsets[:-1]
    first = offsets[:-1] // tm
    last = jnp.maximum(offsets[1:] - 1, 0) // tm
    visits = jnp.where(gs > 0, last - first + 1, 0)
    ends = jnp.cumsum(visits)
    total = ends[-1]
    V = pl.cdiv(m, tm) + g - 1
    i = jnp.minimum(jnp.arange(V, dtype=jnp.int32), jnp.maximum(total - 1, 0))
    gid = jnp.minimum(jnp.searchsorted(ends, i, side="right"), g - 1).astype(jnp.int32)
    mtile = jnp.clip(first[gid] + i - (ends[gid] - visits[gid]), 0, max(pl.cdiv(m, tm) - 1, 0)).astype(jnp.int32)
    return offsets, gid, mtile, total.reshape(1).astype(jnp.int32)


def _row_mask(offsets_ref, gid, mtile, valid, tm):
    rows = mtile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    return (rows >= offsets_ref[gid]) & (rows < offsets_ref[gid + 1]) & valid


def _pad_to(x, axis, mult):
    pad = (-x.shape[axis]) % mult
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


# ----------------------------------------------------------------------------- gmm


def _gmm_kernel(offsets_ref, gid_ref, mtile_ref, total_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *,
                tm, transpose_rhs):
    i, kk = pl.program_id(1), pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    acc_ref[...] += jax.lax.dot_general(lhs_ref[...], rhs_ref[...], dims, preferred_element_type=jnp.float32)

    @pl.when(kk == pl.num_programs(2) - 1)
    def _():
        mask = _row_mask(offsets_ref, gid_ref[i], mtile_ref[i], i < total_ref[0], tm)
        out_ref[...] = jnp.where(mask, acc_ref[...].astype(out_ref.dtype), out_ref[...])


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "tiles", "interpret"))
def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, tiles: GmmTiles = DEFAULT_TILES,
        interpret: bool = False):
    """``lhs [m, k] @ rhs[g]`` per group -> ``[m, n]`` in ``lhs.dtype``;
    ``rhs [g, k, n]`` or ``[g, n, k]`` read transposed when ``transpose_rhs``."""
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiles.tm, tiles.tk, tiles.tn
    lhs_p = _pad_to(_pad_to(lhs, 0, tm), 1, tk)
    if transpose_rhs:
        rhs_p = _pad_to(_pad_to(rhs, 1, tn), 2, tk)
        rhs_spec = pl.BlockSpec((None, tn, tk), lambda nt, i, kk, offs, gid, mt, tot: (gid[i], nt, kk))
    else:
        rhs_p = _pad_to(_pad_to(rhs, 1, tk), 2, tn)
        rhs_spec = pl.BlockSpec((None, tk, tn), lambda nt, i, kk, offs, gid, mt, tot: (gid[i], kk, nt))
    mp, kp = lhs_p.shape
    np_ = pl.cdiv(n, tn) * tn
    offsets, gid, mtile, total = group_metadata(group_sizes, m, tm)
    grid = (np_ // tn, gid.shape[0], kp // tk)
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, tm=tm, transpose_rhs=transpose_rhs),
        out_shape=jax.ShapeDtypeStruct((mp, np_), lhs.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=grid,
            in_specs=[pl.BlockSpec((tm, tk), lambda nt, i, kk, offs, gid, mt, tot: (mt[i], kk)), rhs_spec],
            out_specs=pl.BlockSpec((tm, tn), lambda nt, i, kk, offs, gid, mt, tot: (mt[i], nt)),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=_interpret_arg(interpret),
    )(offsets, gid, mtile, total, lhs_p, rhs_p)
    return out[:m, :n]


# ----------------------------------------------------------------------------- tgmm


def _tgmm_kernel(offsets_ref, gid_ref, mtile_ref, total_ref, lhs_ref, dy_ref, out_ref, acc_ref, *, tm):
    i = pl.program_id(2)
    nv = pl.num_programs(2)
    gid = gid_ref[i]
    prev = gid_ref[jnp.maximum(i - 1, 0)]
    nxt = gid_ref[jnp.minimum(i + 1, nv - 1)]

    @pl.when((i == 0) | (gid != prev))
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    mask = _row_mask(offsets_ref, gid, mtile_ref[i], i < total_ref[0], tm)
    lhs = jnp.where(mask, lhs_ref[...], 0)
    acc_ref[...] += jax.lax.dot_general(lhs, dy_ref[...], (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

    @pl.when((i == nv - 1) | (gid != nxt))
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def tgmm(lhs, dy, group_sizes, *, tiles: GmmTiles = DEFAULT_TILES, interpret: bool = False):
    """``dw[e] = lhs_e^T dy_e``: ``lhs [m, k]``, ``dy [m, n]`` -> ``[g, k, n]`` in
    ``lhs.dtype``; empty groups give zeros."""
    m, k = lhs.shape
    n = dy.shape[1]
    g = group_sizes.shape[0]
    tm, tk, tn = tiles.tm, tiles.tk, tiles.tn
    lhs_p = _pad_to(_pad_to(lhs, 0, tm), 1, tk)
    dy_p = _pad_to(_pad_to(dy, 0, tm), 1, tn)
    kp, np_ = lhs_p.shape[1], dy_p.shape[1]
    offsets, gid, mtile, total = group_metadata(group_sizes, m, tm)
    grid = (kp // tk, np_ // tn, gid.shape[0])
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm),
        out_shape=jax.ShapeDtypeStruct((g, kp, np_), lhs.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=grid,
            in_specs=[pl.BlockSpec((tm, tk), lambda kt, nt, i, offs, gid, mt, tot: (mt[i], kt)),
                      pl.BlockSpec((tm, tn), lambda kt, nt, i, offs, gid, mt, tot: (mt[i], nt))],
            out_specs=pl.BlockSpec((None, tk, tn), lambda kt, nt, i, offs, gid, mt, tot: (gid[i], kt, nt)),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret_arg(interpret),
    )(offsets, gid, mtile, total, lhs_p, dy_p)
    # groups with no rows are never visited: their blocks are never written
    return jnp.where((group_sizes > 0)[:, None, None], out[:, :k, :n], 0).astype(lhs.dtype)
