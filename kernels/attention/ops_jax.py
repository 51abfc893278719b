"""JAX ops of the attention family: validation and dispatch.

Public functions (re-exported by ``kernels.jax``):

- ``history_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=True,
  scale=None, return_lse=False, impl=None, interpret=None)``
- ``beam_decode_attention(q, k_prefix, v_prefix, prefix_lens, k_suffix,
  v_suffix, suffix_len, *, scale=None, impl=None, interpret=None)``

``impl="reference"`` is the jnp reference (differentiated by JAX);
``impl="pallas"`` the Pallas TPU kernels, wrapped in ``jax.custom_vjp``
(forward saves the padded log-sum-exp; the backward runs the dK/dV and dQ
kernels). ``interpret=None`` runs TPU interpret mode exactly when the default
backend is not a TPU.

Value checks on ``cu_seqlens`` / ``prefix_lens`` run when the arrays are
concrete (eager calls); under ``jax.jit`` they are traced and only shapes and
dtypes are checked.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels._dispatch import resolve_interpret, resolve_jax_impl
from kernels.attention.pallas import BlockSizes, heads_first, history_attention_fwd_padded, pack
from kernels.attention.pallas_bwd import history_attention_bwd_padded
from kernels.attention.pallas_decode import beam_decode_attention_pallas
from kernels.attention.reference_jax import beam_decode_attention_reference, history_attention_reference
from kernels.attention.checks import resolve_scale

__all__ = ["history_attention", "beam_decode_attention"]

_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)


def _concrete(x) -> np.ndarray | None:
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_rank(name, x, ndim, doc):
    if not hasattr(x, "shape") or len(x.shape) != ndim:
        raise ValueError(f"{name} must have shape {doc} ({ndim} dims), got {getattr(x, 'shape', type(x).__name__)}")


def _check_dtypes(named):
    (n0, x0), *rest = named.items()
    if x0.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{n0} must be bfloat16, float16, float32 or float64, got {x0.dtype}")
    for n, x in rest:
        if x.dtype != x0.dtype:
            raise TypeError(f"{n} must have the dtype of {n0} ({x0.dtype}), got {x.dtype}")


_KERNEL_HEAD_DIMS = (64, 128)


def _resolve(impl, interpret):
    impl = resolve_jax_impl(impl)
    return impl, resolve_interpret(interpret)


# ----------------------------------------------------------------------------- Pallas + custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _history_attention_pallas(q, k, v, cu_seqlens, causal, scale, blocks, interpret):
    out, lse, _ = _pallas_fwd_impl(q, k, v, cu_seqlens, causal, scale, blocks, interpret)
    return out, lse


def _pallas_fwd_impl(q, k, v, cu_seqlens, causal, scale, blocks, interpret):
    T = q.shape[0]
    packed = pack(cu_seqlens, T, blocks, causal)
    out_h, lse_p = history_attention_fwd_padded(heads_first(q, packed.t_pad), heads_first(k, packed.t_pad),
                                                heads_first(v, packed.t_pad), packed, causal=causal, scale=scale,
                                                blocks=blocks, interpret=interpret)
    return out_h.transpose(1, 0, 2)[:T], lse_p[:, 0, :T], lse_p


def _pallas_vjp_fwd(q, k, v, cu_seqlens, causal, scale, blocks, interpret):
    out, lse, lse_p = _pallas_fwd_impl(q, k, v, cu_seqlens, causal, scale, blocks, interpret)
    return (out, lse), (q, k, v, cu_seqlens, out, lse_p)


def _pallas_vjp_bwd(causal, scale, blocks, interpret, res, cts):
    q, k, v, cu_seqlens, out, lse_p = res
    dout, dlse = cts
    T = q.shape[0]
    packed = pack(cu_seqlens, T, blocks, causal)
    t_pad = packed.t_pad
    di = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).T - dlse.astype(jnp.float32)
    di = jnp.pad(di, ((0, 0), (0, t_pad - T)))[:, None, :]
    dq_h, dk_h, dv_h = history_attention_bwd_padded(
        heads_first(q, t_pad), heads_first(k, t_pad), heads_first(v, t_pad), heads_first(dout.astype(q.dtype), t_pad),
        lse_p, di, packed, causal=causal, scale=scale, blocks=blocks, interpret=interpret)
    dq, dk, dv = (x.transpose(1, 0, 2)[:T] for x in (dq_h, dk_h, dv_h))
    return dq, dk, dv, np.zeros(cu_seqlens.shape, jax.dtypes.float0)


_history_attention_pallas.defvjp(_pallas_vjp_fwd, _pallas_vjp_bwd)



def history_attention(q, k, v, cu_seqlens, max_seqlen: int, *, causal: bool = True, scale: float | None = None,
                      return_lse: bool = False, impl: str | None = None, interpret: bool | None = None,
                      block_sizes: BlockSizes | None = None):
    """Packed jagged attention (contract of ``kernels.torch.history_attention``).

    q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` (same dtype), cu_seqlens int32
    ``[B+1]`` (0, non-decreasing, ends at T). Returns ``out [T, Hq, D]`` or
    ``(out, lse [Hq, T] float32)``. ``impl="pallas"`` takes D in {64, 128}
    and bf16/fp16/fp32; ``block_sizes`` overrides its tiles.
    """
    impl, interpret = _resolve(impl, interpret)
    _check_rank("q", q, 3, "[T, Hq, D]")
    _check_rank("k", k, 3, "[T, Hkv, D]")
    _check_rank("v", v, 3, "[T, Hkv, D]")
    _check_dtypes({"q": q, "k": k, "v": v})
    T, Hq, D = q.shape
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k and v must have shape [T={T}, Hkv, D={D}], got {k.shape} and {v.shape}")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"Hq ({Hq}) must be a positive multiple of Hkv ({k.shape[1]})")
    _check_rank("cu_seqlens", cu_seqlens, 1, "[B+1]")
    if cu_seqlens.dtype != jnp.int32:
        raise TypeError(f"cu_seqlens must be int32 [B+1], got {cu_seqlens.dtype}")
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have shape [B+1] with B >= 1, got {cu_seqlens.shape}")
    cu = _concrete(cu_seqlens)
    if cu is not None:
        lens = np.diff(cu)
        if cu[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {cu[0]}")
        if (lens < 0).any():
            raise ValueError("cu_seqlens must be non-decreasing")
        if cu[-1] != T:
            raise ValueError(f"cu_seqlens must end at T = {T} (tokens in q), got cu_seqlens[-1] = {cu[-1]}")
        if lens.max() > max_seqlen:
            raise ValueError(f"max_seqlen ({max_seqlen}) is smaller than the longest sequence ({lens.max()})")
    if impl == "pallas":
        if D not in _KERNEL_HEAD_DIMS:
            raise ValueError(f"head dim D must be one of {_KERNEL_HEAD_DIMS} for impl='pallas', got {D}")
        if q.dtype == jnp.float64:
            raise TypeError("q must be bfloat16, float16 or float32 for impl='pallas', got float64")
        out, lse = _history_attention_pallas(q, k, v, cu_seqlens, bool(causal), resolve_scale(scale, D),
                                             block_sizes or BlockSizes(), interpret)
    else:
        out, lse = history_attention_reference(q, k, v, cu_seqlens, causal=causal, scale=resolve_scale(scale, D))
    return (out, lse) if return_lse else out


def beam_decode_attention(q, k_prefix, v_prefix, prefix_lens, k_suffix, v_suffix, suffix_len: int, *,
                          scale: float | None = None, impl: str | None = None, interpret: bool | None = None,
                          block_sizes: BlockSizes | None = None):
    """Beam decoding over a shared prefix (contract of
    ``kernels.torch.beam_decode_attention``). Returns ``[B, W, Hq, D]``.
    Forward only. ``impl="pallas"``: the prefix pass is a Pallas kernel that
    reads each user's prefix once for all beams (pallas_decode.py)."""
    impl, interpret = _resolve(impl, interpret)
    _check_rank("q", q, 4, "[B, W, Hq, D]")
    _check_rank("k_prefix", k_prefix, 4, "[B, S, Hkv, D]")
    _check_rank("v_prefix", v_prefix, 4, "[B, S, Hkv, D]")
    _check_rank("k_suffix", k_suffix, 5, "[B, W, s, Hkv, D]")
    _check_rank("v_suffix", v_suffix, 5, "[B, W, s, Hkv, D]")
    _check_dtypes({"q": q, "k_prefix": k_prefix, "v_prefix": v_prefix, "k_suffix": k_suffix, "v_suffix": v_suffix})
    B, W, Hq, D = q.shape
    if k_prefix.shape != v_prefix.shape or k_prefix.shape[0] != B or k_prefix.shape[3] != D:
        raise ValueError(f"k_prefix and v_prefix must have shape [B={B}, S, Hkv, D={D}]")
    S, Hkv = k_prefix.shape[1], k_prefix.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"Hq ({Hq}) must be a positive multiple of Hkv ({Hkv})")
    if tuple(k_suffix.shape) != (B, W, k_suffix.shape[2], Hkv, D) or k_suffix.shape != v_suffix.shape:
        raise ValueError(f"k_suffix and v_suffix must have shape [B={B}, W={W}, s, Hkv={Hkv}, D={D}]")
    _check_rank("prefix_lens", prefix_lens, 1, "[B]")
    if prefix_lens.dtype != jnp.int32 or prefix_lens.shape[0] != B:
        raise TypeError(f"prefix_lens must be int32 [B={B}], got {prefix_lens.dtype} {prefix_lens.shape}")
    if not isinstance(suffix_len, int) or isinstance(suffix_len, bool) or not 0 <= suffix_len <= k_suffix.shape[2]:
        raise ValueError(f"suffix_len must be an int in [0, s={k_suffix.shape[2]}], got {suffix_len!r}")
    pl_ = _concrete(prefix_lens)
    if pl_ is not None:
        if ((pl_ < 0) | (pl_ > S)).any():
            raise ValueError(f"prefix_lens must lie in [0, S={S}]")
        if suffix_len == 0 and (pl_ == 0).any():
            raise ValueError("every beam needs at least one key: prefix_lens has a 0 and suffix_len is 0")
    if impl == "pallas":
        if D not in _KERNEL_HEAD_DIMS:
            raise ValueError(f"head dim D must be one of {_KERNEL_HEAD_DIMS} for impl='pallas', got {D}")
        return beam_decode_attention_pallas(q, k_prefix, v_prefix, prefix_lens, k_suffix, v_suffix, suffix_len,
                                            scale=resolve_scale(scale, D), blocks=block_sizes or BlockSizes(),
                                            interpret=interpret)
    return beam_decode_attention_reference(q, k_prefix, v_prefix, prefix_lens, k_suffix, v_suffix, suffix_len,
                                           scale=resolve_scale(scale, D))
