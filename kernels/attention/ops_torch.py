"""PyTorch ops of the attention family: validation, dispatch, ``torch.library``
registration (custom ops with fake implementations and autograd).

Public functions (re-exported by ``plum_kernels.torch``):

- ``history_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=True,
  softmax_scale=None, return_lse=False, impl=None, check_values=True,
  deterministic=True)``
- ``beam_decode_attention(q, k_prefix, v_prefix, prefix_lens, k_suffix,
  v_suffix, suffix_len, *, softmax_scale=None, impl=None, check_values=True)``

``softmax_scale`` is flash-attn's name; ``scale`` is accepted as a keyword
alias (passing both raises ``ValueError``).

Registered ops (namespace ``plum_kernels``): ``history_attention_fwd``,
``history_attention_bwd`` (the backward of the former, registered with
``register_autograd``) and ``beam_decode_attention`` (forward only).
Contracts: docs/design.md, 'history_attention' and 'beam_decode_attention'.
All three are opaque custom ops (``torch.compile`` does not trace into their
Triton launches): the varlen launches refill their longest-first schedule for
each autotuned tile configuration through a Triton ``pre_hook``, which
``torch.library.wrap_triton`` does not support, and the decode launch sizes its
split-K grid on CUDA by compiling the kernel for the actual arguments.

Shape, dtype and device checks run in the Python wrappers on static shapes
(so they also run while tracing under ``torch.compile``). The checks that need
values (``cu_seqlens``, ``prefix_lens``, with ``check_values=True``) read them
on the host: in eager mode in the wrapper, before the op; under
``torch.compile`` inside the op at run time (the op is opaque to the tracer,
so the check costs no graph break).
"""
from __future__ import annotations

import torch

from plum_kernels._checks import describe
from plum_kernels._dispatch import resolve_torch_impl
from plum_kernels.attention.checks import (
    check_cu_seqlens_values,
    check_decode,
    check_history,
    check_prefix_lens_values,
    resolve_scale,
)
from plum_kernels.attention.reference import (
    beam_decode_attention_reference,
    history_attention_reference,
    history_attention_reference_bwd,
)

__all__ = ["history_attention", "beam_decode_attention"]

# ----------------------------------------------------------------------------- validation

def _validate_history(q, k, v, cu_seqlens, max_seqlen, impl: str) -> None:
    check_history(describe("q", q, "[T, Hq, D]"), describe("k", k, "[T, Hkv, D]"), describe("v", v, "[T, Hkv, D]"),
                  describe("cu_seqlens", cu_seqlens, "[B+1]"), max_seqlen, impl)


def _validate_decode(q, k_prefix, v_prefix, prefix_lens, k_suffix, v_suffix, suffix_len, impl: str) -> None:
    check_decode(describe("q", q, "[B, W, Hq, D]"), describe("k_prefix", k_prefix, "[B, S, Hkv, D]"),
                 describe("v_prefix", v_prefix, "[B, S, Hkv, D]"), describe("prefix_lens", prefix_lens, "[B]"),
                 describe("k_suffix", k_suffix, "[B, W, s, Hkv, D]"),
                 describe("v_suffix", v_suffix, "[B, W, s, Hkv, D]"), suffix_len, impl)


def _softmax_scale(softmax_scale, scale, head_dim: int) -> float:
    """flash-attn's ``softmax_scale`` or its alias ``scale`` (not both), as a float."""
    if softmax_scale is not None and scale is not None:
        raise ValueError("pass softmax_scale or its alias scale, not both")
    return resolve_scale(scale if softmax_scale is None else softmax_scale, head_dim)


def _check_here(check_values: bool) -> bool:
    """Whether the wrapper checks the values itself (eager mode) rather than the op (under tracing)."""
    return bool(check_values) and not torch.compiler.is_compiling()


def _contiguous_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- history attention ops

@torch.library.custom_op("plum_kernels::history_attention_fwd", mutates_args=())
def _history_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_seqlen: int, causal: bool, scale: float, impl: str, check_values: bool,
                           deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [T, Hq, D] in q.dtype, lse [Hq, T] float32)``."""
    if check_values:
        check_cu_seqlens_values(cu_seqlens.tolist(), q.shape[0], max_seqlen)
    if impl == "triton":
        from plum_kernels.attention.triton_fwd import history_attention_fwd

        return history_attention_fwd(_contiguous_last(q), _contiguous_last(k), _contiguous_last(v), cu_seqlens,
                                     causal=causal, scale=scale, max_seqlen=max_seqlen)
    out, lse = history_attention_reference(q, k, v, cu_seqlens, causal=causal, scale=scale)
    return out.contiguous(), lse.to(torch.float32).contiguous()


@_history_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, scale, impl, check_values, deterministic):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("plum_kernels::history_attention_bwd", mutates_args=())
def _history_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None,
                           cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool, scale: float, impl: str,
                           deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of ``history_attention_fwd`` given the
    output gradient ``do`` and the optional log-sum-exp gradient ``dlse``."""
    if impl == "triton":
        from plum_kernels.attention.triton_bwd import history_attention_bwd

        return history_attention_bwd(_contiguous_last(do), _contiguous_last(q), _contiguous_last(k),
                                     _contiguous_last(v), _contiguous_last(out), lse.contiguous(),
                                     None if dlse is None else dlse.contiguous(), cu_seqlens,
                                     causal=causal, scale=scale, max_seqlen=max_seqlen,
                                     deterministic=deterministic)
    dq, dk, dv = history_attention_reference_bwd(do, q, k, v, dlse, cu_seqlens, causal=causal, scale=scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_history_attention_bwd.register_fake
def _(do, q, k, v, out, lse, dlse, cu_seqlens, max_seqlen, causal, scale, impl, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, scale, impl, _, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.args = (max_seqlen, causal, scale, impl, deterministic)


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    max_seqlen, causal, scale, impl, deterministic = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _history_attention_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens, max_seqlen, causal, scale, impl,
                                        deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None


_history_attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def history_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int, *, causal: bool = True, softmax_scale: float | None = None,
                      return_lse: bool = False, impl: str | None = None, check_values: bool = True,
                      deterministic: bool = True, scale: float | None = None):
    """Packed jagged ("varlen") multi-head attention over user histories.

    Args:
        q: ``[T, Hq, D]`` queries of B sequences packed back to back
            (bf16, fp16 or fp32; float64 with ``impl="reference"``). The
            Triton kernels take head dims ``D`` in {64, 128}; the reference
            any ``D``.
        k, v: ``[T, Hkv, D]``, same dtype and device; ``Hq % Hkv == 0`` (GQA:
            query head ``h`` uses KV head ``h // (Hq // Hkv)``).
        cu_seqlens: **int32** ``[B+1]`` on q's device (int64 raises
            ``TypeError``), sequence ``b`` is tokens
            ``cu_seqlens[b] : cu_seqlens[b+1]``; starts at 0, non-decreasing,
            ends at T (empty sequences allowed).
        max_seqlen: a Python int >= the longest sequence (checked with
            ``check_values``); the Triton kernels size their grid with it.
        causal: token ``t`` sees only keys ``j <= t`` of its own sequence.
        softmax_scale: float, the scale of ``q k^T`` before the softmax,
            default ``1 / sqrt(D)`` (flash-attn's name).
        return_lse: also return the log-sum-exp ``[Hq, T]`` float32 (natural
            log, differentiable).
        impl: None (Triton on CUDA, reference elsewhere), ``"reference"`` or
            ``"triton"`` (on CPU tensors the Triton interpreter, which the
            caller enables with ``TRITON_INTERPRET=1``). The kernels take
            ``D`` in {64, 128}; the reference any D.
        check_values: check the values of ``cu_seqlens`` (one small
            device-to-host copy, i.e. a sync on CUDA; in eager mode before the
            op, under ``torch.compile`` inside it). Pass False in hot loops
            (e.g. every layer of a model) whose ``cu_seqlens`` are checked
            once per batch. With bad values the output and
            gradients are then undefined (any values, rows left unwritten) but
            memory-safe: the kernels clamp every token index to ``[0, T)``, and
            the reference raises or returns garbage.
        deterministic: the Triton backward computes dQ in its own pass, with
            no atomics, so gradients are bitwise reproducible (default).
            ``False`` accumulates dQ with float32 atomics inside the dK/dV
            pass: two fewer block products per (query, key) block pair
            (5 instead of 7), with dQ's last bits varying run to run. The
            reference ignores it.
        scale: keyword alias of ``softmax_scale`` (passing both raises
            ``ValueError``).

    Returns:
        ``out [T, Hq, D]`` in q.dtype, or ``(out, lse)`` with ``return_lse``.

    No token attends across sequences. On a GPU the kernels' tiles are
    autotuned per (longest sequence rounded to a power of two, head dims,
    causality, dtype) unless ``plum_kernels.torch.set_autotune(False)``.
    """
    impl = resolve_torch_impl(impl, getattr(q, "device", "cpu"))
    _validate_history(q, k, v, cu_seqlens, max_seqlen, impl)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    sm_scale = _softmax_scale(softmax_scale, scale, q.shape[2])
    if _check_here(check_values):
        check_cu_seqlens_values(cu_seqlens.tolist(), q.shape[0], max_seqlen)
    out, lse = _history_attention_fwd(q, k, v, cu_seqlens, int(max_seqlen), bool(causal), sm_scale, impl,
                                      bool(check_values) and torch.compiler.is_compiling(), deterministic)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- beam decode op

@torch.library.custom_op("plum_kernels::beam_decode_attention", mutates_args=())
def _beam_decode_attention(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
                           prefix_lens: torch.Tensor, k_suffix: torch.Tensor, v_suffix: torch.Tensor,
                           suffix_len: int, scale: float, impl: str, check_values: bool) -> torch.Tensor:
    if check_values:
        check_prefix_lens_values(prefix_lens.tolist(), k_prefix.shape[1], suffix_len)
    if impl == "triton":
        from plum_kernels.attention.triton_decode import beam_decode_attention_fwd

        return beam_decode_attention_fwd(*(_contiguous_last(t) for t in (q, k_prefix, v_prefix)), prefix_lens,
                                         _contiguous_last(k_suffix), _contiguous_last(v_suffix), suffix_len,
                                         scale=scale)
    return beam_decode_attention_reference(q, k_prefix, v_prefix, prefix_lens, k_suffix, v_suffix, suffix_len,
                                           scale=scale).contiguous()


@_beam_decode_attention.register_fake
def _(q, k_prefix, v_prefix, prefix_lens, k_suffix, v_suffix, suffix_len, scale, impl, check_values):
    return torch.empty_like(q)


def beam_decode_attention(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
                          prefix_lens: torch.Tensor, k_suffix: torch.Tensor, v_suffix: torch.Tensor,
                          suffix_len: int, *, softmax_scale: float | None = None, impl: str | None = None,
                          check_values: bool = True, scale: float | None = None) -> torch.Tensor:
    """Attention of W beams per user over a shared prefix plus per-beam suffixes.

    Args:
        q: ``[B, W, Hq, D]``, one query (the newest token) per beam (bf16,
            fp16 or fp32; float64 with ``impl="reference"``). The Triton
            kernel takes ``D`` in {64, 128}; the reference any ``D``.
        k_prefix, v_prefix: ``[B, S, Hkv, D]``, q's dtype and device, the
            user's history KV, stored once per user (not per beam); S is the
            cache capacity; ``Hq % Hkv == 0``.
        prefix_lens: **int32** ``[B]`` on q's device, valid prefix tokens per
            user, in [0, S].
        k_suffix, v_suffix: ``[B, W, s, Hkv, D]``, q's dtype and device, each
            beam's generated tokens.
        suffix_len: Python int in [0, s], valid suffix tokens (the same for
            every beam: beams advance in lockstep). A beam must see >= 1 key.
        softmax_scale: float, default ``1 / sqrt(D)`` (flash-attn's name).
        impl: None, ``"reference"`` or ``"triton"`` (see ``history_attention``).
        check_values: check the values of ``prefix_lens`` (a sync on CUDA;
            pass False inside a decoding loop once they are known good). With
            bad values the output is undefined but memory-safe: the kernels
            clamp each prefix length to ``[0, S]`` when they address keys.
            In eager mode the check runs before the op, under
            ``torch.compile`` inside it.
        scale: keyword alias of ``softmax_scale`` (passing both raises
            ``ValueError``).

    Returns:
        ``[B, W, Hq, D]`` in q.dtype: softmax attention of each query over
        ``k_prefix[b, :prefix_lens[b]]`` followed by ``k_suffix[b, w, :suffix_len]``.

    The Triton kernel reads the prefix once per user for all W beams (the W x
    Hq/Hkv query rows of a KV head form one matrix), split-K over the prefix,
    and merges prefix and suffix partial results by log-sum-exp. Forward only.
    """
    impl = resolve_torch_impl(impl, getattr(q, "device", "cpu"))
    _validate_decode(q, k_prefix, v_prefix, prefix_lens, k_suffix, v_suffix, suffix_len, impl)
    sm_scale = _softmax_scale(softmax_scale, scale, q.shape[3])
    if _check_here(check_values):
        check_prefix_lens_values(prefix_lens.tolist(), k_prefix.shape[1], suffix_len)
    return _beam_decode_attention(q, k_prefix, v_prefix, prefix_lens, k_suffix, v_suffix, int(suffix_len),
                                  sm_scale, impl, bool(check_values) and torch.compiler.is_compiling())
