"""jnp reference of the MoE ops (same semantics as ``reference.py``, the
contract): routing, permutation, weighted combine, grouped matmul (via
``jax.lax.ragged_dot``) and the SwiGLU expert layer. float32 math; plain
``jax.numpy``, differentiable with ``jax.grad`` (the selection is not)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

RENORM_EPS = 1e-20


def route(logits, top_k: int, score: str = "softmax", bias=None, renormalize: bool = True):
    """``[T, E]`` -> ``(weights [T, k] f32, ids [T, k] int32, load_balance, z_loss)``."""
    T, E = logits.shape
    l = logits.astype(jnp.float32)
    if score == "softmax":
        s = jax.nn.softmax(l, axis=-1)
        p = s
    else:
        s = jax.nn.sigmoid(l)
        p = s / jnp.sum(s, axis=-1, keepdims=True)
    sel = jax.lax.stop_gradient(s if bias is None else s + bias.astype(jnp.float32))
    _, ids = jax.lax.top_k(sel, top_k)
    w = jnp.take_along_axis(s, ids, axis=-1)
    if renormalize:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + RENORM_EPS)
    counts = jnp.zeros((E,), jnp.float32).at[ids.reshape(-1)].add(1.0)
    f = counts / (T * top_k)
    lb = E * jnp.sum(f * jnp.mean(p, axis=0))
    z = jnp.mean(jax.nn.logsumexp(l, axis=-1) ** 2)
    return w, ids.astype(jnp.int32), lb, z


def permute(x, expert_ids, num_experts: int):
    """-> ``(x_sorted [T*k, d], group_sizes [E] int32, permutation [T*k], inverse [T*k])``
    (stable sort by expert; see ``reference.permute``)."""
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    perm = jnp.argsort(flat, stable=True).astype(jnp.int32)
    # an id outside [0, E) (possible only unchecked, under jit) belongs to no group
    valid = (flat >= 0) & (flat < num_experts)
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[jnp.where(valid, flat, num_experts)].add(1, mode="drop")
    inverse = jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=jnp.int32))
    return x[perm // k], group_sizes, perm, inverse


def unpermute(y, weights, permutation, inverse):
    """``out[t] = sum_j weights[t, j] * y[inverse[t*k + j]]`` (float32 accumulation).
    An out-of-range ``inverse`` entry (possible only unchecked, under jit) reads a NaN row."""
    T, k = weights.shape
    M = y.shape[0]
    idx = jnp.where((inverse >= 0) & (inverse < M), inverse, M)
    rows = y.at[idx].get(mode="fill", fill_value=jnp.nan).astype(jnp.float32).reshape(T, k, y.shape[1])
    return jnp.sum(rows * weights.astype(jnp.float32)[..., None], axis=1).astype(y.dtype)


def grouped_matmul(x, w, group_sizes, transpose_w: bool = False):
    """``x [M, K]``, ``w [E, K, N]`` (``[E, N, K]`` if ``transpose_w``) -> ``[M, N]``."""
    if transpose_w:
        w = jnp.swapaxes(w, 1, 2)
    out = jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


def grouped_matmul_dw(x, dy, group_sizes):
    """``dw[e] = x_e^T dy_e`` -> ``[E, K, N]`` (masked per expert; zero for empty groups)."""
    E = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    row_e = jnp.searchsorted(ends, jnp.arange(x.shape[0]), side="right")
    mask = (row_e[None, :] == jnp.arange(E)[:, None]).astype(jnp.float32)
    return jnp.einsum("em,mk,mn->ekn", mask, x.astype(jnp.float32), dy.astype(jnp.float32)).astype(x.dtype)


def swiglu(h):
    f = h.shape[-1] // 2
    hf = h.astype(jnp.float32)
    return (jax.nn.silu(hf[:, :f]) * hf[:, f:]).astype(h.dtype)
