"""A small PLUM LM config (three layers, the first dense, then MoE) that the model tests share."""
from __future__ import annotations

from plumrec.model import ModelConfig


def small_config(**kw) -> ModelConfig:
    """97 tokens, width 32, 4 query / 2 KV heads of 16, 4 experts (top 2) from layer 1; ``kw`` replaces fields."""
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                mlp_only_layers=(0,), initializer_range=0.2)
    base.update(kw)
    return ModelConfig(**base)
