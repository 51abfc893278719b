"""JAX ops of the attention family: validation and dispatch.

Public functions (re-exported by ``plum_kernels.jax``):

- ``history_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=True,
  scale=None, return_lse=False, impl=None, interpret=None)``
- ``beam_decode_attention(q, k_prefix, v_prefix, prefix_lens, k_suffix,
  v_suffix, suffix_len, *, scale=None, impl=None, interpret=None)``

``impl="reference"`` is the jnp reference (differentiated by JAX);
``impl="pallas"`` the Pallas TPU kernels, wrapped in ``jax.custom_vjp``
(forward saves the padded log-sum-exp; the backward runs the dK/dV and dQ
kernels). ``interpret=None`` runs TPU interpret mode exactly when the default
backend is not a TPU.

Argument checks are ``checks.py``'s, shared with the torch ops (same errors).
Value checks on ``cu_seqlens`` / ``prefix_lens`` raise when the arrays are
concrete (eager calls). Under ``jax.jit`` the values are traced and cannot
raise; the ops then guarantee a defined result instead, as ``jnp`` does for
invalid input: invalid ``cu_seqlens`` (not starting at 0, decreasing, not
ending at T, or a sequence longer than ``max_seqlen``) make the whole output
and log-sum-exp NaN; a user whose ``prefix_lens`` is outside ``[0, S]`` (or 0
with ``suffix_len`` 0) gets NaN rows. The kernels never address memory outside
their arrays whatever the values.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from plum_kernels._checks import describe
from plum_kernels._dispatch import resolve_interpret, resolve_jax_impl
from plum_kernels.attention.checks import (
    check_cu_seqlens_values,
    check_decode,
    check_history,
    check_prefix_lens_values,
    resolve_scale,
)
from plum_kernels.attention.pallas import BlockSizes, heads_first, history_attention_fwd_padded, pack
from plum_kernels.attention.pallas_bwd import history_attention_bwd_padded
from plum_kernels.attention.pallas_decode import beam_decode_attention_pallas
from plum_kernels.attention.reference_jax import (
    band_width,
    beam_decode_attention_reference,
    history_attention_banded,
    history_attention_reference,
)

__all__ = ["history_attention", "beam_decode_attention"]


def _concrete(x) -> np.ndarray | None:
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _cu_seqlens_ok(cu, total: int, max_seqlen: int):
    """Traced scalar: ``cu_seqlens`` satisfies the contract (see ``check_cu_seqlens_values``)."""
    lens = jnp.diff(cu)
    return (cu[0] == 0) & (cu[-1] == total) & jnp.all(lens >= 0) & (jnp.max(lens) <= max_seqlen)


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
    """Packed jagged attention, the contract of ``plum_kernels.torch.history_attention``
    (docs/design.md, 'history_attention').

    q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` (same dtype), cu_seqlens int32
    ``[B+1]`` (0, non-decreasing, ends at T). Returns ``out [T, Hq, D]`` or
    ``(out, lse [Hq, T] float32)``. ``impl="pallas"`` takes D in {64, 128}
    and bf16/fp16/fp32; ``block_sizes`` overrides its tiles. The jnp
    reference reads, per block of 64 queries, only the keys within
    ``max_seqlen - 1`` tokens of it once that band is shorter than ``T``
    (``reference_jax.history_attention_banded``; ``T * band`` scores instead
    of ``T^2``), so ``max_seqlen`` must bound every sequence, as for Pallas
    (under ``jax.jit`` a longer one gives NaN outputs).
    """
    impl, interpret = _resolve(impl, interpret)
    check_history(describe("q", q, "[T, Hq, D]"), describe("k", k, "[T, Hkv, D]"), describe("v", v, "[T, Hkv, D]"),
                  describe("cu_seqlens", cu_seqlens, "[B+1]"), max_seqlen, impl)
    T, D = q.shape[0], q.shape[2]
    cu = _concrete(cu_seqlens)
    if cu is not None:
        check_cu_seqlens_values(cu.tolist(), T, int(max_seqlen))
    if impl == "pallas":
        out, lse = _history_attention_pallas(q, k, v, cu_seqlens, bool(causal), resolve_scale(scale, D),
                                             block_sizes or BlockSizes(), interpret)
    elif band_width(int(max_seqlen), causal) < T:  # short sequences in a long packed batch: the banded form
        out, lse = history_attention_banded(q, k, v, cu_seqlens, int(max_seqlen), causal=causal,
                                            scale=resolve_scale(scale, D))
    else:
        out, lse = history_attention_reference(q, k, v, cu_seqlens, causal=causal, scale=resolve_scale(scale, D))
    if cu is None:  # traced: a defined result (NaN) for invalid cu_seqlens
        ok = _cu_seqlens_ok(cu_seqlens, T, int(max_seqlen))
        out, lse = jnp.where(ok, out, jnp.nan).astype(out.dtype), jnp.where(ok, lse, jnp.nan)
    return (out, lse) if return_lse else out


def beam_decode_attention(q, k_prefix, v_prefix, prefix_lens, k_suffix, v_suffix, suffix_len: int, *,
                          scale: float | None = None, impl: str | None = None, interpret: bool | None = None,
                          block_sizes: BlockSizes | None = None):
    """Beam decoding over a shared prefix, the contract of
    ``plum_kernels.torch.beam_decode_attention`` (docs/design.md,
    'beam_decode_attention'). Returns ``[B, W, Hq, D]``.
    Forward only. ``impl="pallas"``: the prefix pass is a Pallas kernel that
    reads each user's prefix once for all beams (pallas_decode.py)."""
    impl, interpret = _resolve(impl, interpret)
    check_decode(describe("q", q, "[B, W, Hq, D]"), describe("k_prefix", k_prefix, "[B, S, Hkv, D]"),
                 describe("v_prefix", v_prefix, "[B, S, Hkv, D]"), describe("prefix_lens", prefix_lens, "[B]"),
                 describe("k_suffix", k_suffix, "[B, W, s, Hkv, D]"),
                 describe("v_suffix", v_suffix, "[B, W, s, Hkv, D]"), suffix_len, impl)
    D, S = q.shape[3], k_prefix.shape[1]
    plens = _concrete(prefix_lens)
    if plens is not None:
        check_prefix_lens_values(plens.tolist(), S, int(suffix_len))
    if impl == "pallas":
        out = beam_decode_attention_pallas(q, k_prefix, v_prefix, prefix_lens, k_suffix, v_suffix, int(suffix_len),
                                           scale=resolve_scale(scale, D), blocks=block_sizes or BlockSizes(),
                                           interpret=interpret)
    else:
        out = beam_decode_attention_reference(q, k_prefix, v_prefix, prefix_lens, k_suffix, v_suffix,
                                              int(suffix_len), scale=resolve_scale(scale, D))
    if plens is None:  # traced: NaN rows for the users whose prefix length is invalid
        bad = (prefix_lens < 0) | (prefix_lens > S) | ((prefix_lens == 0) & (int(suffix_len) == 0))
        out = jnp.where(bad[:, None, None, None], jnp.nan, out).astype(out.dtype)
    return out
