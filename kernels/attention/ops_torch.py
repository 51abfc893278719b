"""PyTorch ops of the attention family: validation, dispatch, ``torch.library``
registration (custom ops with fake implementations and autograd).

Public functions (re-exported by ``kernels.torch``):

- ``history_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=True,
  scale=None, return_lse=False, impl=None)``
- ``beam_decode_attention(q, k_prefix, v_prefix, prefix_lens, k_suffix,
  v_suffix, suffix_len, *, scale=None, impl=None)``

Registered ops (namespace ``plum``): ``history_attention_fwd``,
``history_attention_bwd`` (the backward of the former, registered with
``register_autograd``) and ``beam_decode_attention`` (forward only). Shape,
dtype and device checks run in the Python wrappers (so they also run while
tracing under ``torch.compile``); the checks that need values (``cu_seqlens``,
``prefix_lens``) run inside the ops, before any kernel.
"""
from __future__ import annotations

import torch

from kernels._dispatch import resolve_torch_impl
from kernels.attention.checks import resolve_scale
from kernels.attention.reference import (beam_decode_attention_reference, history_attention_reference,
                                        history_attention_reference_bwd)

__all__ = ["history_attention", "beam_decode_attention"]

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_KERNEL_HEAD_DIMS = (64, 128)


# ----------------------------------------------------------------------------- validation

def _check_tensor(name: str, t, ndim: int, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_doc}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc} ({ndim} dims), got {tuple(t.shape)}")


def _check_float_family(impl: str, named: dict[str, torch.Tensor]) -> None:
    (name0, t0), *rest = named.items()
    allowed = _FLOAT_DTYPES + ((torch.float64,) if impl == "reference" else ())
    if t0.dtype not in allowed:
        raise TypeError(f"{name0} must be one of {allowed} for impl={impl!r}, got {t0.dtype}")
    for name, t in rest:
        if t.dtype != t0.dtype:
            raise TypeError(f"{name} must have the dtype of {name0} ({t0.dtype}), got {t.dtype}")
        if t.device != t0.device:
            raise ValueError(f"{name} must be on the device of {name0} ({t0.device}), got {t.device}")


def _check_kernel_head_dim(impl: str, d: int) -> None:
    if impl != "reference" and d not in _KERNEL_HEAD_DIMS:
        raise ValueError(f"head dim D must be one of {_KERNEL_HEAD_DIMS} for impl={impl!r}, got {d} "
                         "(impl='reference' takes any D)")


def _check_index(name: str, t, device, n: int, shape_doc: str) -> None:
    _check_tensor(name, t, 1, shape_doc)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 {shape_doc}, got {t.dtype}")
    if t.shape[0] != n:
        raise ValueError(f"{name} must have shape {shape_doc} = ({n},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the device of q ({device}), got {t.device}")


def _validate_history(q, k, v, cu_seqlens, max_seqlen, impl: str) -> None:
    _check_tensor("q", q, 3, "[T, Hq, D]")
    _check_tensor("k", k, 3, "[T, Hkv, D]")
    _check_tensor("v", v, 3, "[T, Hkv, D]")
    _check_float_family(impl, {"q": q, "k": k, "v": v})
    T, Hq, D = q.shape
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k and v must have shape [T={T}, Hkv, D={D}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(f"Hq ({Hq}) must be a positive multiple of Hkv ({k.shape[1]})")
    _check_kernel_head_dim(impl, D)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError("cu_seqlens must be an int32 tensor of shape [B+1] with B >= 1, got "
                         f"{getattr(cu_seqlens, 'shape', type(cu_seqlens).__name__)}")
    _check_index("cu_seqlens", cu_seqlens, q.device, cu_seqlens.shape[0], "[B+1]")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")


def _check_cu_seqlens_values(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {cu[0]}")
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if min(lens) < 0:
        i = lens.index(min(lens))
        raise ValueError(f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {cu[i]} > "
                         f"cu_seqlens[{i + 1}] = {cu[i + 1]}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens must end at T = {total} (tokens in q), got cu_seqlens[-1] = {cu[-1]}")
    if max(lens) > max_seqlen:
        raise ValueError(f"max_seqlen ({max_seqlen}) is smaller than the longest sequence ({max(lens)})")


def _validate_decode(q, k_prefix, v_prefix, prefix_lens, k_suffix, v_suffix, suffix_len, impl: str) -> None:
    _check_tensor("q", q, 4, "[B, W, Hq, D]")
    _check_tensor("k_prefix", k_prefix, 4, "[B, S, Hkv, D]")
    _check_tensor("v_prefix", v_prefix, 4, "[B, S, Hkv, D]")
    _check_tensor("k_suffix", k_suffix, 5, "[B, W, s, Hkv, D]")
    _check_tensor("v_suffix", v_suffix, 5, "[B, W, s, Hkv, D]")
    _check_float_family(impl, {"q": q, "k_prefix": k_prefix, "v_prefix": v_prefix,
                               "k_suffix": k_suffix, "v_suffix": v_suffix})
    B, W, Hq, D = q.shape
    if B == 0 or W == 0:
        raise ValueError(f"q must have B >= 1 users and W >= 1 beams, got shape {tuple(q.shape)}")
    if k_prefix.shape != v_prefix.shape or k_prefix.shape[0] != B or k_prefix.shape[3] != D:
        raise ValueError(f"k_prefix and v_prefix must have shape [B={B}, S, Hkv, D={D}], got "
                         f"{tuple(k_prefix.shape)} and {tuple(v_prefix.shape)}")
    Hkv = k_prefix.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq ({Hq}) must be a positive multiple of Hkv ({Hkv})")
    expect = (B, W, k_suffix.shape[2], Hkv, D)
    if tuple(k_suffix.shape) != expect or k_suffix.shape != v_suffix.shape:
        raise ValueError(f"k_suffix and v_suffix must have shape [B={B}, W={W}, s, Hkv={Hkv}, D={D}], got "
                         f"{tuple(k_suffix.shape)} and {tuple(v_suffix.shape)}")
    _check_kernel_head_dim(impl, D)
    _check_index("prefix_lens", prefix_lens, q.device, B, "[B]")
    if not isinstance(suffix_len, int) or isinstance(suffix_len, bool) or not 0 <= suffix_len <= k_suffix.shape[2]:
        raise ValueError(f"suffix_len must be an int in [0, s={k_suffix.shape[2]}], got {suffix_len!r}")


def _check_prefix_lens_values(prefix_lens: torch.Tensor, capacity: int, suffix_len: int) -> None:
    lens = prefix_lens.tolist()
    bad = [i for i, n in enumerate(lens) if not 0 <= n <= capacity]
    if bad:
        raise ValueError(f"prefix_lens must lie in [0, S={capacity}], got prefix_lens[{bad[0]}] = {lens[bad[0]]}")
    if suffix_len == 0 and min(lens) == 0:
        raise ValueError("every beam needs at least one key: prefix_lens has a 0 and suffix_len is 0")



def _contiguous_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- history attention ops

@torch.library.custom_op("plum::history_attention_fwd", mutates_args=())
def _history_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_seqlen: int, causal: bool, scale: float, impl: str, check_values: bool
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [T, Hq, D] in q.dtype, lse [Hq, T] float32)``."""
    if check_values:
        _check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)
    if impl == "triton":
        from kernels.attention.triton_fwd import history_attention_fwd

        return history_attention_fwd(_contiguous_last(q), _contiguous_last(k), _contiguous_last(v), cu_seqlens,
                                     causal=causal, scale=scale)
    out, lse = history_attention_reference(q, k, v, cu_seqlens, causal=causal, scale=scale)
    return out.contiguous(), lse.to(torch.float32).contiguous()


@_history_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, scale, impl, check_values):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("plum::history_attention_bwd", mutates_args=())
def _history_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None,
                           cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool, scale: float, impl: str
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of ``history_attention_fwd`` given the
    output gradient ``do`` and the optional log-sum-exp gradient ``dlse``."""
    if impl == "triton":
        from kernels.attention.triton_bwd import history_attention_bwd

        return history_attention_bwd(_contiguous_last(do), _contiguous_last(q), _contiguous_last(k),
                                     _contiguous_last(v), _contiguous_last(out), lse.contiguous(),
                                     None if dlse is None else dlse.contiguous(), cu_seqlens,
                                     causal=causal, scale=scale)
    dq, dk, dv = history_attention_reference_bwd(do, q, k, v, dlse, cu_seqlens, causal=causal, scale=scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_history_attention_bwd.register_fake
def _(do, q, k, v, out, lse, dlse, cu_seqlens, max_seqlen, causal, scale, impl):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, scale, impl, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.args = (max_seqlen, causal, scale, impl)


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    max_seqlen, causal, scale, impl = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _history_attention_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens, max_seqlen, causal, scale, impl)
    return dq, dk, dv, None, None, None, None, None, None


_history_attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def history_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int, *, causal: bool = True, scale: float | None = None,
                      return_lse: bool = False, impl: str | None = None, check_values: bool = True):
    """Packed jagged ("varlen") multi-head attention over user histories.

    Args:
        q: ``[T, Hq, D]`` queries of B sequences packed back to back
            (bf16, fp16 or fp32; float64 with ``impl="reference"``).
        k, v: ``[T, Hkv, D]``, same dtype and device; ``Hq % Hkv == 0`` (GQA:
            query head ``h`` uses KV head ``h // (Hq // Hkv)``).
        cu_seqlens: int32 ``[B+1]``, sequence ``b`` is tokens
            ``cu_seqlens[b] : cu_seqlens[b+1]``; starts at 0, non-decreasing,
            ends at T (empty sequences allowed).
        max_seqlen: an int >= the longest sequence (checked).
        causal: token ``t`` sees only keys ``j <= t`` of its own sequence.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp ``[Hq, T]`` float32 (natural
            log, differentiable).
        impl: None (Triton on CUDA, reference elsewhere), ``"reference"`` or
            ``"triton"`` (on CPU tensors the Triton interpreter, which the
            caller enables with ``TRITON_INTERPRET=1``). The kernels take
            ``D`` in {64, 128}; the reference any D.
        check_values: check the values of ``cu_seqlens`` (one small
            device-to-host copy, i.e. a sync on CUDA). Pass False in hot loops
            whose ``cu_seqlens`` are known good; bad values are then undefined
            behaviour.

    Returns:
        ``out [T, Hq, D]`` in q.dtype, or ``(out, lse)`` with ``return_lse``.

    No token attends across sequences. The backward (dq, dk, dv) is
    deterministic: no atomics (dK/dV and dQ are separate passes).
    """
    impl = resolve_torch_impl(impl, getattr(q, "device", "cpu"))
    _validate_history(q, k, v, cu_seqlens, max_seqlen, impl)
    out, lse = _history_attention_fwd(q, k, v, cu_seqlens, max_seqlen, bool(causal),
                                      resolve_scale(scale, q.shape[2]), impl,
                                      bool(check_values))
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- beam decode op

@torch.library.custom_op("plum::beam_decode_attention", mutates_args=())
def _beam_decode_attention(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
                           prefix_lens: torch.Tensor, k_suffix: torch.Tensor, v_suffix: torch.Tensor,
                           suffix_len: int, scale: float, impl: str, check_values: bool) -> torch.Tensor:
    if check_values:
        _check_prefix_lens_values(prefix_lens, k_prefix.shape[1], suffix_len)
    if impl == "triton":
        from kernels.attention.triton_decode import beam_decode_attention_fwd

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
                          suffix_len: int, *, scale: float | None = None, impl: str | None = None,
                          check_values: bool = True) -> torch.Tensor:
    """Attention of W beams per user over a shared prefix plus per-beam suffixes.

    Args:
        q: ``[B, W, Hq, D]``, one query (the newest token) per beam.
        k_prefix, v_prefix: ``[B, S, Hkv, D]``, the user's history KV, stored
            once per user (not per beam); S is the cache capacity.
        prefix_lens: int32 ``[B]``, valid prefix tokens per user, in [0, S].
        k_suffix, v_suffix: ``[B, W, s, Hkv, D]``, each beam's generated tokens.
        suffix_len: int in [0, s], valid suffix tokens (the same for every
            beam: beams advance in lockstep). A beam must see >= 1 key.
        scale: softmax scale, default ``1 / sqrt(D)``.
        impl: None, ``"reference"`` or ``"triton"`` (see ``history_attention``).
        check_values: check the values of ``prefix_lens`` (a sync on CUDA;
            pass False inside a decoding loop once they are known good).

    Returns:
        ``[B, W, Hq, D]`` in q.dtype: softmax attention of each query over
        ``k_prefix[b, :prefix_lens[b]]`` followed by ``k_suffix[b, w, :suffix_len]``.

    The Triton kernel reads the prefix once per user for all W beams (the W x
    Hq/Hkv query rows of a KV head form one matrix), split-K over the prefix,
    and merges prefix and suffix partial results by log-sum-exp. Forward only.
    """
    impl = resolve_torch_impl(impl, getattr(q, "device", "cpu"))
    _validate_decode(q, k_prefix, v_prefix, prefix_lens, k_suffix, v_suffix, suffix_len, impl)
    return _beam_decode_attention(q, k_prefix, v_prefix, prefix_lens, k_suffix, v_suffix, int(suffix_len),
                                  resolve_scale(scale, q.shape[3]), impl, bool(check_values))
