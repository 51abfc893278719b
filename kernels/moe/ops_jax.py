"""JAX MoE ops: validation, dispatch and ``jax.custom_vjp`` (re-exported by
``kernels.jax``).

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
Semantics: ``kernels/moe/reference.py``.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._dispatch import resolve_interpret, resolve_jax_impl
from . import reference_jax as ref
from .pallas_gmm import DEFAULT_TILES, GmmTiles, gmm, tgmm

_SCORES = ("softmax", "sigmoid")


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
    Differentiable w.r.t. ``x`` and ``w``. The group sizes are traced values,
    so their sum cannot be checked here; rows beyond the sum are left unset
    by the Pallas kernel and zero in the reference."""
    if x.ndim != 2 or w.ndim != 3:
        raise ValueError(f"x must be [M, K] and w [E, K, N], got shapes {x.shape} and {w.shape}")
    K = x.shape[1]
    if (w.shape[2] if transpose_w else w.shape[1]) != K:
        raise ValueError(f"w must be [E, K={K}, N]{' (transposed: [E, N, K])' if transpose_w else ''}, "
                         f"got {w.shape}")
    if w.dtype != x.dtype:
        raise TypeError(f"w has dtype {w.dtype} but x has {x.dtype}; they must match")
    if group_sizes.shape != (w.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be an integer [E={w.shape[0]}] array, got {group_sizes.dtype}"
                         f"{list(group_sizes.shape)}")
    group_sizes = group_sizes.astype(jnp.int32)
    if resolve_jax_impl(impl) == "reference":
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
    """Top-k routing; see ``kernels.torch.moe_route`` for the full contract.
    ``[T, E]`` -> ``RouteOutput(weights [T, k] f32, expert_ids [T, k] int32,
    load_balance_loss, z_loss)``."""
    if router_logits.ndim != 2 or 0 in router_logits.shape:
        raise ValueError(f"router_logits must be [T >= 1, E >= 1], got shape {router_logits.shape}")
    E = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, E={E}], got {top_k!r}")
    if score not in _SCORES:
        raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
    if bias is not None and bias.shape != (E,):
        raise ValueError(f"bias must be [E={E}], got shape {bias.shape}")
    resolve_jax_impl(impl)
    return RouteOutput(*ref.route(router_logits, top_k, score, bias, renormalize))


def moe_permute(x, expert_ids, num_experts: int, *, impl: str | None = None):
    """-> ``(x_sorted [T*k, d], group_sizes [E] int32, permutation, inverse)``."""
    if x.ndim != 2 or expert_ids.ndim != 2 or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"x must be [T, d] and expert_ids [T, k], got {x.shape} and {expert_ids.shape}")
    if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
        raise TypeError(f"expert_ids must be integer, got {expert_ids.dtype}")
    resolve_jax_impl(impl)
    return ref.permute(x, expert_ids, num_experts)


def moe_unpermute(y, weights, permutation, inverse, *, impl: str | None = None):
    """``out[t] = sum_j weights[t, j] * y[inverse[t*k + j]]`` -> ``[T, d]``."""
    if y.ndim != 2 or weights.ndim != 2 or weights.size != y.shape[0]:
        raise ValueError(f"y must be [T*k, d] and weights [T, k], got {y.shape} and {weights.shape}")
    resolve_jax_impl(impl)
    return ref.unpermute(y, weights, permutation, inverse)


# ----------------------------------------------------------------------------- SwiGLU expert layer


class MoEOutput(NamedTuple):
    out: jax.Array
    load_balance_loss: jax.Array
    z_loss: jax.Array


def moe_mlp(x, router_logits, w_gate_up, w_down, top_k: int, *, score: str = "softmax", bias=None,
            renormalize: bool = True, impl: str | None = None, interpret: bool | None = None,
            tiles: GmmTiles | None = None) -> MoEOutput:
    """Dropless SwiGLU MoE layer, same contract as ``kernels.torch.moe_mlp``:
    ``x [T, d]``, ``router_logits [T, E]``, ``w_gate_up [E, d, 2f]`` (gate,
    then up), ``w_down [E, f, d]`` -> ``MoEOutput(out [T, d], load_balance_loss,
    z_loss)``."""
    if x.ndim != 2 or w_gate_up.ndim != 3 or w_down.ndim != 3:
        raise ValueError("x must be [T, d], w_gate_up [E, d, 2f] and w_down [E, f, d]")
    T, d = x.shape
    E, f = w_down.shape[0], w_down.shape[1]
    if w_gate_up.shape != (E, d, 2 * f) or w_down.shape != (E, f, d):
        raise ValueError(f"w_gate_up must be [E, d={d}, 2f] and w_down [E, f, d={d}] with matching E and f, "
                         f"got {w_gate_up.shape} and {w_down.shape}")
    if router_logits.shape != (T, E):
        raise ValueError(f"router_logits must be [T={T}, E={E}], got {router_logits.shape}")
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    r = moe_route(router_logits, top_k, score=score, bias=bias, renormalize=renormalize, impl=impl)
    xs, group_sizes, perm, inverse = ref.permute(x, r.expert_ids, E)
    gmm_ = functools.partial(grouped_matmul, impl=impl, interpret=interpret, tiles=tiles)
    h = gmm_(xs, w_gate_up, group_sizes)
    y = gmm_(ref.swiglu(h), w_down, group_sizes)
    return MoEOutput(ref.unpermute(y, r.weights, perm, inverse), r.load_balance_loss, r.z_loss)
