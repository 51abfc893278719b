"""Public JAX API of the PLUM kernels.

Each op family keeps its dispatch and ``jax.custom_vjp`` wrappers next to its
kernels (``kernels/<family>/ops_jax.py``); this module is the one public
namespace users import::

    import plum_kernels.jax as KJ
    out = KJ.history_attention(q, k, v, cu_seqlens, max_seqlen)

``impl=None`` picks the Pallas TPU kernel when the default backend is a TPU and
the jnp reference otherwise; ``impl="pallas"`` forces the kernel.
``interpret=None`` means TPU interpret mode exactly when the default backend is
not a TPU; ``interpret=False`` forces the TPU lowering.
"""
from __future__ import annotations

from plum_kernels.attention.ops_jax import beam_decode_attention, history_attention
from plum_kernels.beam.ops_jax import (
    BeamStep,
    TrieAggregate,
    TrieArrays,
    children_bounds,
    constrained_beam_search,
    constrained_beam_step,
    trie_aggregate,
)
from plum_kernels.moe.ops_jax import (
    MoEOutput,
    RouteOutput,
    grouped_matmul,
    moe_mlp,
    moe_permute,
    moe_route,
    moe_unpermute,
)

__all__ = [
    # attention (docs/design.md, 'history_attention', 'beam_decode_attention')
    "history_attention", "beam_decode_attention",
    # MoE (docs/design.md, 'moe_route' .. 'moe_mlp')
    "moe_route", "moe_permute", "moe_unpermute", "grouped_matmul", "moe_mlp", "RouteOutput", "MoEOutput",
    # constrained beam search and the trie's exploration bias (docs/design.md, 'constrained_beam_step',
    # 'constrained_beam_search', 'trie_aggregate')
    "constrained_beam_step", "constrained_beam_search", "BeamStep", "children_bounds", "TrieArrays",
    "trie_aggregate", "TrieAggregate",
]
