"""Put the PLUM kernels into a Hugging Face transformers Qwen3 / Qwen3-MoE model.

::

    from transformers import AutoModelForCausalLM
    from plum_kernels.hf import apply_plum_kernels

    model = apply_plum_kernels(AutoModelForCausalLM.from_pretrained(path))

What :func:`apply_plum_kernels` changes:

- attention: registers ``"plum_history_attention"`` with transformers' ``AttentionInterface``
  (and a mask function with ``AttentionMaskInterface``) and makes it the model's attention
  implementation. Each layer's q/k/v (after its projections, q/k norms and RoPE) go to
  ``plum_kernels.torch.history_attention`` as one packed batch. The sequences are taken from,
  in this order: the flash-attn kwargs ``cu_seq_lens_q`` / ``max_length_q`` (what
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` adds; batch size 1); else
  ``position_ids``, a new sequence starting wherever a position is not its predecessor's + 1
  (packed rows as ``DataCollatorWithFlattening`` makes them, or ordinary rows); else each row
  is one sequence. Deriving them from ``position_ids`` costs one device-to-host copy per layer;
  the flash-attn kwargs avoid it. Refused with a ``ValueError`` naming the argument: an
  ``attention_mask`` with padding (or any 4-D mask), ``past_key_values`` with cached tokens
  (decoding), attention dropout, a sliding window. For generation, switch back first:
  ``model.set_attn_implementation("sdpa")``.
- MoE: every ``Qwen3MoeSparseMoeBlock`` becomes a :class:`PlumQwen3MoeBlock` that holds the same
  ``gate`` (the router, whose own top-k routing it keeps, so ``output_router_logits`` and the
  auxiliary loss work as before) and the same ``experts`` module, whose stacked weights
  (``gate_up_proj [E, 2f, d]``, ``down_proj [E, d, f]``, transformers >= 5) feed
  ``plum_kernels.nn.swiglu_experts`` directly: no copies, same ``state_dict`` keys. The
  per-expert ``nn.ModuleList`` layout of transformers 4 is refused with a ``ValueError``.

Importing this module needs transformers (``pip install transformers``, >= 5 for the MoE part);
``plum_kernels`` itself does not.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("plum_kernels.hf needs Hugging Face transformers with AttentionInterface and "
                      "AttentionMaskInterface (>= 4.53; >= 5 for the MoE swap): pip install transformers") from exc

from plum_kernels.nn import swiglu_experts
from plum_kernels.torch import history_attention

__all__ = ["apply_plum_kernels", "PlumQwen3MoeBlock", "ATTN_IMPLEMENTATION", "SUPPORTED_MODEL_TYPES"]

ATTN_IMPLEMENTATION = "plum_history_attention"
SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")


# ----------------------------------------------------------------------------- attention

def _plum_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                         mask_function=None, attention_mask: Tensor | None = None, **kwargs) -> None:
    """Mask function of ``ATTN_IMPLEMENTATION``, run once per forward: refuses a 2-D padding mask
    (one device-to-host read of ``attention_mask``) and returns None (the layers get the
    sequence boundaries from ``position_ids`` or the flash-attn kwargs instead)."""
    if attention_mask is not None:
        if attention_mask.shape[-1] != kv_length or not bool(attention_mask.all()):
            raise ValueError(
                f"attention_mask: {ATTN_IMPLEMENTATION} takes no padding; got a mask with padded positions "
                f"(shape {list(attention_mask.shape)}, kv_length {kv_length}). Pack the batch instead (batch size 1, "
                "position_ids restarting at 0 per sequence, as DataCollatorWithFlattening does) or pass rows of "
                "equal length without a mask")
    return None


def _varlen_metadata(batch: int, seqlen: int, device: torch.device, kwargs: dict) -> tuple[Tensor, int, bool]:
    """``(cu_seqlens int32 [n+1], max_seqlen, known_good)`` of the ``batch * seqlen`` tokens,
    flattened row-major (see the module docstring for the sources, in order)."""
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q: packed flash-attn kwargs need batch size 1, got batch size {batch}")
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        if max_q is None:
            raise ValueError("max_length_q: required with cu_seq_lens_q")
        cu_k = kwargs.get("cu_seq_lens_k")
        if (cu_k is not None and cu_k.shape != cu_q.shape) or (max_k is not None and int(max_k) != int(max_q)):
            raise ValueError("cu_seq_lens_k / max_length_k: must equal cu_seq_lens_q / max_length_q (self-attention)")
        return cu_q.to(device=device, dtype=torch.int32), int(max_q), False
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device), seqlen, True
    if position_ids.ndim != 2 or position_ids.shape[1] != seqlen or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids must be [batch, seq_len] = [{batch}, {seqlen}] (or [1, seq_len]), "
                         f"got shape {list(position_ids.shape)}")
    pos = position_ids.to(device).expand(batch, seqlen)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    idx = starts.reshape(-1).nonzero().flatten()
    cu = torch.cat([idx, idx.new_full((1,), batch * seqlen)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max()), True


def plum_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           sliding_window: int | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers attention function over ``history_attention``.

    Args:
        module: the attention module (its ``is_causal``, default True, is used).
        query: ``[B, Hq, S, D]``; key, value: ``[B, Hkv, S, D]`` (after RoPE), same dtype.
        attention_mask: must be None (the registered mask function refuses padding masks).
        scaling: softmax scale, default ``1 / sqrt(D)``.
        dropout: must be 0. sliding_window: must be None.
        kwargs: ``position_ids [B or 1, S]`` and/or flash-attn ``cu_seq_lens_q`` (int ``[n+1]``),
            ``max_length_q``, ``cu_seq_lens_k``, ``max_length_k``.

    Returns ``(out [B, S, Hq, D] in query's dtype, None)``.
    """
    if attention_mask is not None:
        raise ValueError(f"attention_mask: {ATTN_IMPLEMENTATION} takes no explicit mask, got one of shape "
                         f"{list(attention_mask.shape)}; pack the batch with position_ids instead")
    if dropout:
        raise ValueError(f"attention_dropout: {ATTN_IMPLEMENTATION} has no attention dropout, got {dropout}")
    if sliding_window is not None:
        raise ValueError(f"sliding_window: {ATTN_IMPLEMENTATION} has no sliding window, got {sliding_window}")
    B, Hq, S, D = query.shape
    if key.shape[2] != S or value.shape[2] != S:
        raise ValueError(f"past_key_values: {ATTN_IMPLEMENTATION} does not decode from a cache (query length {S}, "
                         f"key length {key.shape[2]}); use model.set_attn_implementation('sdpa') to generate")
    cu_seqlens, max_seqlen, known_good = _varlen_metadata(B, S, query.device, kwargs)
    q = query.transpose(1, 2).reshape(B * S, Hq, D)
    k = key.transpose(1, 2).reshape(B * S, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * S, value.shape[1], D)
    out = history_attention(q, k, v, cu_seqlens, max_seqlen, causal=bool(getattr(module, "is_causal", True)),
                            scale=scaling, check_values=not known_good)
    return out.view(B, S, Hq, D), None


# ----------------------------------------------------------------------------- MoE

class PlumQwen3MoeBlock(nn.Module):
    """A Qwen3-MoE sparse MoE block on the PLUM grouped-GEMM experts.

    Holds the original block's ``gate`` (router: ``weight [E, d]``, returns ``(router_logits
    [T, E], weights [T, k], expert_ids [T, k])``) and ``experts`` (``gate_up_proj [E, 2f, d]``,
    ``down_proj [E, d, f]``) modules themselves, so parameters and ``state_dict`` keys are the
    block's. ``forward(hidden_states [B, S, d]) -> [B, S, d]`` in the input's dtype.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        experts = block.experts
        config = getattr(experts, "config", None)
        gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
            raise ValueError(f"model: the sparse MoE block's experts must hold stacked gate_up_proj [E, 2f, d] and "
                             f"down_proj [E, d, f] (transformers >= 5); got {type(experts).__name__} "
                             f"(transformers {transformers.__version__})")
        E, two_f, d = gate_up.shape
        if (getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True)
                or getattr(experts, "has_bias", False) or tuple(down.shape) != (E, d, two_f // 2)):
            raise ValueError(f"model: unsupported expert layout gate_up_proj {list(gate_up.shape)}, down_proj "
                             f"{list(down.shape)} (need concatenated [E, 2f, d] and [E, d, f], no bias)")
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"model: hidden_act must be 'silu' (SwiGLU experts), got {act!r}")
        children = dict(block.named_children())
        if set(children) != {"gate", "experts"}:
            raise ValueError(f"model: the sparse MoE block must hold exactly 'gate' and 'experts', "
                             f"got {sorted(children)}")
        for name, child in children.items():  # the block's order, so state_dict keys keep their order
            self.add_module(name, child)

    def forward(self, hidden_states: Tensor) -> Tensor:
        d = hidden_states.shape[-1]
        x = hidden_states.reshape(-1, d)
        _, weights, expert_ids = self.gate(x)
        out = swiglu_experts(x, weights, expert_ids, self.experts.gate_up_proj, self.experts.down_proj,
                             validate=False)
        return out.reshape(hidden_states.shape)


# ----------------------------------------------------------------------------- entry point

def _use_plum_attention(model: nn.Module) -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, plum_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _plum_attention_mask)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError(f"model: {type(model).__name__} does not accept attention implementations from "
                         f"transformers' AttentionInterface (it kept {model.config._attn_implementation!r})")


def _swap_moe_blocks(model: nn.Module) -> None:
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, Qwen3MoeSparseMoeBlock)]
    replacements = [PlumQwen3MoeBlock(child) for _, _, child in targets]  # all checked before any swap
    for (parent, name, _), new in zip(targets, replacements):
        setattr(parent, name, new)


def apply_plum_kernels(model: nn.Module, *, attention: bool = True, moe: bool = True) -> nn.Module:
    """Swap the PLUM kernels into an instantiated transformers Qwen3 or Qwen3-MoE model, in place.

    Args:
        model: a transformers model whose ``config.model_type`` is ``"qwen3"`` or ``"qwen3_moe"``
            (``Qwen3ForCausalLM``, ``Qwen3MoeForCausalLM``, their base models, ...), on any
            device and dtype; already loaded or freshly built.
        attention: use ``history_attention`` for every attention layer (packed batches, see the
            module docstring for what it accepts and refuses).
        moe: run every ``Qwen3MoeSparseMoeBlock`` on the grouped-GEMM experts (no effect on a
            dense Qwen3).

    Returns the same model. Idempotent: calling it again changes nothing. Parameters, their
    ``state_dict`` keys and the router's outputs stay as they were.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model, nn.Module) or model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model must be a transformers model with config.model_type in {SUPPORTED_MODEL_TYPES}, "
                         f"got {type(model).__name__} (model_type {model_type!r})")
    if attention:
        _use_plum_attention(model)
    if moe:
        _swap_moe_blocks(model)
    return model
