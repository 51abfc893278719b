"""``torch.nn`` modules over the PLUM kernels, for users who place them in their own models.

- :class:`HistoryAttention`: the packed varlen attention core (no projections, no RoPE) over
  ``plum_kernels.torch.history_attention``.
- :class:`MoEMLP`: a dropless SwiGLU mixture-of-experts MLP (router, top-k routing, stacked
  experts) over ``moe_route`` + ``moe_permute`` + ``grouped_matmul`` + ``moe_unpermute``.
- :func:`swiglu_experts`: the experts part of :class:`MoEMLP` as a function of given routing
  (what ``plum_kernels.hf`` runs inside a Hugging Face sparse MoE block).

The expert weights use the layout of ``nn.Linear`` and of transformers' stacked experts
(output features first): ``w_gate_up [E, 2f, d]`` (gate rows ``[:f]``, up rows ``[f:]``) and
``w_down [E, d, f]``; the grouped matmuls read them transposed, without copies.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from plum_kernels.moe.reference import swiglu
from plum_kernels.torch import (
    MoEOutput,
    grouped_matmul,
    history_attention,
    moe_permute,
    moe_route,
    moe_unpermute,
)

__all__ = ["HistoryAttention", "MoEMLP", "swiglu_experts"]


class HistoryAttention(nn.Module):
    """Packed jagged ("varlen") multi-head attention, the core only (no projections, no RoPE).

    Args:
        causal: token ``t`` sees only keys ``j <= t`` of its own sequence.
        scale: softmax scale (flash-attn's ``softmax_scale``), default ``1 / sqrt(D)``.
        impl: ``None`` (Triton on CUDA, reference elsewhere), ``"reference"`` or ``"triton"``;
            the Triton kernels take ``D`` in {64, 128}, the reference any ``D``.
        check_values: check the values of ``cu_seqlens`` on every call (one device-to-host
            copy); pass False where they are known good.

    ``forward(q, k, v, cu_seqlens, max_seqlen)``:
        q: ``[T, Hq, D]`` queries of ``B`` sequences packed back to back (bf16, fp16 or fp32;
            float64 with ``impl="reference"``).
        k, v: ``[T, Hkv, D]``, q's dtype and device, ``Hq % Hkv == 0`` (GQA: query head ``h``
            reads KV head ``h // (Hq // Hkv)``).
        cu_seqlens: int32 ``[B+1]``, sequence ``b`` is tokens ``cu_seqlens[b]:cu_seqlens[b+1]``,
            starting at 0, non-decreasing, ending at ``T``.
        max_seqlen: int >= the longest sequence.
        Returns ``[T, Hq, D]`` in q's dtype; no token attends across sequences.
        Differentiable w.r.t. q, k and v.
    """

    def __init__(self, *, causal: bool = True, scale: float | None = None, impl: str | None = None,
                 check_values: bool = True) -> None:
        super().__init__()
        if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"scale must be a positive float or None, got {scale!r}")
        self.causal = bool(causal)
        self.scale = None if scale is None else float(scale)
        self.impl = impl
        self.check_values = bool(check_values)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        return history_attention(q, k, v, cu_seqlens, max_seqlen, causal=self.causal, scale=self.scale,
                                 impl=self.impl, check_values=self.check_values)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, scale={self.scale}, impl={self.impl}"


def swiglu_experts(x: Tensor, weights: Tensor, expert_ids: Tensor, w_gate_up: Tensor, w_down: Tensor, *,
                   impl: str | None = None, validate: bool = True) -> Tensor:
    """Routed SwiGLU experts: ``out[t] = sum_j weights[t, j] * (silu(x_t Wg_e^T) * (x_t Wu_e^T)) Wd_e^T``
    with ``e = expert_ids[t, j]``, as permute -> grouped matmul (gate|up) -> SwiGLU -> grouped
    matmul (down) -> weighted unpermute.

    Args:
        x: ``[T, d]`` tokens (bf16, fp16 or fp32; float64 with ``impl="reference"``).
        weights: ``[T, k]`` floating routing weights (not renormalized here).
        expert_ids: ``[T, k]`` int32/int64 in ``[0, E)``.
        w_gate_up: ``[E, 2f, d]``, x's dtype and device: gate rows ``[:, :f]``, up rows ``[:, f:]``
            (transformers' ``experts.gate_up_proj``).
        w_down: ``[E, d, f]``, x's dtype and device (transformers' ``experts.down_proj``).
        impl: ``None`` | ``"reference"`` | ``"triton"``, used by every op.
        validate: check the values of ``expert_ids`` (one device-to-host copy); pass False
            for ids that come from a top-k.

    Returns ``[T, d]`` in x's dtype (float32 accumulation), differentiable w.r.t. ``x``,
    ``weights``, ``w_gate_up`` and ``w_down``.
    """
    if w_gate_up.ndim != 3 or w_down.ndim != 3:
        raise ValueError(f"w_gate_up must be [E, 2f, d] and w_down [E, d, f], got shapes "
                         f"{list(w_gate_up.shape)} and {list(w_down.shape)}")
    E, two_f, d = w_gate_up.shape
    if two_f % 2 or tuple(w_down.shape) != (E, d, two_f // 2):
        raise ValueError(f"w_down must be [E, d, f] = {[E, d, two_f // 2]} for w_gate_up [E, 2f, d] = "
                         f"{list(w_gate_up.shape)}, got {list(w_down.shape)}")
    xs, group_sizes, perm, inverse = moe_permute(x, expert_ids, E, impl=impl, validate=validate)
    h = grouped_matmul(xs, w_gate_up, group_sizes, transpose_w=True, impl=impl, validate=False)
    y = grouped_matmul(swiglu(h), w_down, group_sizes, transpose_w=True, impl=impl, validate=False)
    return moe_unpermute(y, weights, perm, inverse, impl=impl, validate=False)


class MoEMLP(nn.Module):
    """Dropless SwiGLU mixture-of-experts MLP with its router.

    Args:
        hidden_size: ``d``, the model width.
        intermediate_size: ``f``, each expert's SwiGLU width.
        num_experts: ``E >= 1``.
        top_k: experts per token, ``1 <= top_k <= E``.
        score: ``"softmax"`` (Qwen3-MoE, Mixtral) or ``"sigmoid"`` router scores.
        renormalize: divide the ``k`` selected scores by their sum (Qwen3-MoE's
            ``norm_topk_prob``).
        impl: ``None`` | ``"reference"`` | ``"triton"`` for every op.
        device, dtype: of the parameters.

    Parameters: ``router.weight [E, d]`` (an ``nn.Linear(d, E, bias=False)``), ``w_gate_up
    [E, 2f, d]`` (gate rows first, then up) and ``w_down [E, d, f]``: the layout of
    transformers' ``mlp.gate.weight``, ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``.

    ``forward(x, return_aux=False)``:
        x: ``[..., d]`` in the parameters' dtype.
        Returns ``[..., d]`` in x's dtype, or with ``return_aux`` a ``MoEOutput(out,
        load_balance_loss [], z_loss [])`` (the router's Switch load-balance loss and z-loss,
        see ``plum_kernels.torch.moe_route``). Differentiable w.r.t. x and every parameter.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, *,
                 score: str = "softmax", renormalize: bool = True, impl: str | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                            ("num_experts", num_experts), ("top_k", top_k)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts = {num_experts}, got {top_k}")
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = num_experts, top_k
        self.score, self.renormalize, self.impl = score, bool(renormalize), impl
        self.router = nn.Linear(hidden_size, num_experts, bias=False, **factory)
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init per expert: uniform in ``+-1/sqrt(fan_in)``."""
        self.router.reset_parameters()
        nn.init.uniform_(self.w_gate_up, -1 / math.sqrt(self.hidden_size), 1 / math.sqrt(self.hidden_size))
        nn.init.uniform_(self.w_down, -1 / math.sqrt(self.intermediate_size), 1 / math.sqrt(self.intermediate_size))

    def forward(self, x: Tensor, return_aux: bool = False) -> Tensor | MoEOutput:
        if x.ndim < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [..., d = {self.hidden_size}], got shape {list(x.shape)}")
        flat = x.reshape(-1, self.hidden_size)
        r = moe_route(self.router(flat), self.top_k, score=self.score, renormalize=self.renormalize, impl=self.impl)
        out = swiglu_experts(flat, r.weights, r.expert_ids, self.w_gate_up, self.w_down, impl=self.impl,
                             validate=False).reshape(x.shape)
        return MoEOutput(out, r.load_balance_loss, r.z_loss) if return_aux else out

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, score={self.score!r}, "
                f"renormalize={self.renormalize}, impl={self.impl}")
