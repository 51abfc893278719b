"""JAX MoE ops: validation, dispatch and ``jax.custom_vjp`` (re-exported by
``plum_kernels.jax``).

- ``grouped_matmul``: ``impl="pallas"`` runs the Pallas TPU ``gmm`` forward and
  ``gmm`` (transposed weight) / ``tgmm`` backward under one ``custom_vjp``;
  ``impl="reference"`` is ``jax.lax.ragged_dot``.
- ``moe_route``, ``moe_permute``, ``moe_unpermute``: jnp for both impls. On a
  TPU these are a softmax/top-k, a sort and gathers that XLA fuses well; the
  FLOPs of the layer are in the grouped matmuls (the Triton side has kernels
  for them because a GPU launch per small op costs more there).
- ``moe_mlp``: the SwiGLU expert layer composed from the above.

``impl=None`` picks Pallas when the default backend is a TPU; ``interpret=None``
means TPU interpret mode exactly when the default backend is not a TPU.
The argument checks are ``checks.py``'s, shared with the torch ops; value
checks (ids, indices, group sizes) raise on concrete arrays (eager calls) and
are replaced under ``jax.jit`` by the defined results each op documents.
Semantics: ``kernels/moe/reference.py``.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import describe
from .._dispatch import resolve_interpret, resolve_jax_impl
from . import reference_jax as ref
from .checks import (
    check_expert_ids_values,
    check_group_sizes_values,
    check_grouped_matmul,
    check_mlp,
    check_permute,
    check_route,
    check_unpermute,
    check_unpermute_values,
)
from .pallas_gmm import DEFAULT_TILES, GmmTiles, gmm, tgmm


def _concrete(x) -> np.ndarray | None:
    """Host copy of a concrete array; ``None`` for a traced one (under ``jax.jit``)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


# ----------------------------------------------------------------------------- grouped matmul (custom_vjp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm_pallas(x, w, group_sizes, transpose_w, tiles, interpret):
    return gmm(x, w, group_sizes, transpose_rhs=transpose_w, tiles=tiles, interpret=interpret)


def _gmm_pallas_fwd(x, w, group_sizes, transpose_w, tiles, interpret):
    return _gmm_pallas(x, w, group_sizes, transpose_w, tiles, interpret), (x, w, group_sizes)


def _gmm_pallas_bwd(transpose_w, tiles, interpret, res, dy):
    x, w, group_sizes = res
    dy = dy.astype(x.dtype)
    dx = gmm(dy, w, group_sizes, transpose_rhs=not transpose_w, tiles=tiles, interpret=interpret)
    if transpose_w:
        dw = tgmm(dy, x, group_sizes, tiles=tiles, interpret=interpret)
    else:
        dw = tgmm(x, dy, group_sizes, tiles=tiles, interpret=interpret)
    return dx, dw.astype(w.dtype), None


_gmm_pallas.defvjp(_gmm_pallas_fwd, _gmm_pallas_bwd)


def grouped_matmul(x, w, group_sizes, *, transpose_w: bool = False, impl: str | None = None,
                   interpret: bool | None = None, tiles: GmmTiles | None = None):
    """Grouped (ragged) matmul: ``x [M, K]`` rows sorted by group, ``w [E, K, N]``
    (``[E, N, K]`` read transposed when ``transpose_w``), ``group_sizes [E]``
    int32 summing to ``M`` -> ``[M, N]`` in ``x.dtype`` (float32 accumulation).
    Differentiable w.r.t. ``x`` and ``w``. Concrete group sizes are checked
    as in torch (non-negative, summing to M). Traced ones (under ``jax.jit``)
    cannot be: negative sizes count as 0 and rows beyond the sum are left
    unset by the Pallas kernel (its row ranges are clamped into ``[0, M)``, so
    no block outside ``x`` is read) and zero in the reference."""
    impl = resolve_jax_impl(impl)
    check_grouped_matmul(describe("x", x, "[M, K]"), describe("w", w, "[E, K, N]"),
                         describe("group_sizes", group_sizes, "[E]"), bool(transpose_w), impl)
    sizes = _concrete(group_sizes)
    if sizes is not None:
        check_group_sizes_values(sizes.tolist(), x.shape[0])
    return _gmm_dispatch(x, w, group_sizes, transpose_w, impl, interpret, tiles)


def _gmm_dispatch(x, w, group_sizes, transpose_w, impl, interpret, tiles):
    """``grouped_matmul`` after its checks (``moe_mlp`` calls it directly: its
    sizes come from ``moe_permute``, and an eager layer must not sync)."""
    group_sizes = group_sizes.astype(jnp.int32)
    if impl == "reference":
        return ref.grouped_matmul(x, w, group_sizes, transpose_w)
    return _gmm_pallas(x, w, group_sizes, bool(transpose_w), tiles or DEFAULT_TILES, resolve_interpret(interpret))


# ----------------------------------------------------------------------------- routing and permutation


class RouteOutput(NamedTuple):
    weights: jax.Array
    expert_ids: jax.Array
    load_balance_loss: jax.Array
    z_loss: jax.Array


def moe_route(router_logits, top_k: int, *, score: str = "softmax", bias=None, renormalize: bool = True,
              impl: str | None = None) -> RouteOutput:
    """Top-k routing; the contract of ``plum_kernels.torch.moe_route``
    (docs/design.md, 'moe_route').
    ``[T, E]`` -> ``RouteOutput(weights [T, k] f32, expert_ids [T, k] int32,
    load_balance_loss, z_loss)``."""
    check_route(describe("router_logits", router_logits, "[T, E]"), top_k, score,
                None if bias is None else describe("bias", bias, "[E]"), resolve_jax_impl(impl))
    return RouteOutput(*ref.route(router_logits, top_k, score, bias, renormalize))


def moe_permute(x, expert_ids, num_experts: int, *, impl: str | None = None):
    """-> ``(x_sorted [T*k, d], group_sizes [E] int32, permutation, inverse)``;
    the contract of ``plum_kernels.torch.moe_permute`` (docs/design.md,
    'moe_permute'). Concrete ids are checked to lie in ``[0, num_experts)``;
    traced ones cannot be: a copy with an id outside that range belongs to no
    group (``group_sizes`` then sums to less than ``T*k``)."""
    check_permute(describe("x", x, "[T, d]"), describe("expert_ids", expert_ids, "[T, k]"), num_experts)
    resolve_jax_impl(impl)
    ids = _concrete(expert_ids)
    if ids is not None and ids.size:
        check_expert_ids_values(int(ids.min()), int(ids.max()), num_experts)
    return ref.permute(x, expert_ids, int(num_experts))


def moe_unpermute(y, weights, permutation, inverse, *, impl: str | None = None):
    """``out[t] = sum_j weights[t, j] * y[inverse[t*k + j]]`` -> ``[T, d]``;
    the contract of ``plum_kernels.torch.moe_unpermute`` (docs/design.md,
    'moe_unpermute'). Concrete ``permutation`` / ``inverse`` are checked as in
    torch (in range, inverse of each other); traced ones cannot be: a copy
    whose ``inverse`` index is out of range contributes NaN to its token."""
    check_unpermute(describe("y", y, "[T*k, d]"), describe("weights", weights, "[T, k]"),
                    describe("permutation", permutation, "[T*k]"), describe("inverse", inverse, "[T*k]"))
    resolve_jax_impl(impl)
    perm, inv = _concrete(permutation), _concrete(inverse)
    if perm is not None and inv is not None and perm.size:
        M = perm.shape[0]
        consistent = bool((perm[np.clip(inv, 0, M - 1)] == np.arange(M)).all())
        check_unpermute_values(M, (int(perm.min()), int(perm.max())), (int(inv.min()), int(inv.max())), consistent)
    return ref.unpermute(y, weights, permutation, inverse)


# ----------------------------------------------------------------------------- SwiGLU expert layer


class MoEOutput(NamedTuple):
    out: jax.Array
    load_balance_loss: jax.Array
    z_loss: jax.Array


def moe_mlp(x, router_logits, w_gate_up, w_down, top_k: int, *, score: str = "softmax", bias=None,
            renormalize: bool = True, impl: str | None = None, interpret: bool | None = None,
            tiles: GmmTiles | None = None) -> MoEOutput:
    """Dropless SwiGLU MoE layer, the contract of ``plum_kernels.torch.moe_mlp``
    (docs/design.md, 'moe_mlp'):
    ``x [T, d]``, ``router_logits [T, E]``, ``w_gate_up [E, d, 2f]`` (gate,
    then up), ``w_down [E, f, d]`` -> ``MoEOutput(out [T, d], load_balance_loss,
    z_loss)``."""
    impl = resolve_jax_impl(impl)
    check_mlp(describe("x", x, "[T, d]"), describe("router_logits", router_logits, "[T, E]"),
              describe("w_gate_up", w_gate_up, "[E, d, 2f]"), describe("w_down", w_down, "[E, f, d]"), impl)
    E = w_down.shape[0]
    r = moe_route(router_logits, top_k, score=score, bias=bias, renormalize=renormalize, impl=impl)
    xs, group_sizes, perm, inverse = ref.permute(x, r.expert_ids, E)
    h = _gmm_dispatch(xs, w_gate_up, group_sizes, False, impl, interpret, tiles)
    y = _gmm_dispatch(ref.swiglu(h), w_down, group_sizes, False, impl, interpret, tiles)
    return MoEOutput(ref.unpermute(y, r.weights, perm, inverse), r.load_balance_loss, r.z_loss)
