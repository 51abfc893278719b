"""Public PyTorch API of the PLUM kernels.

Each op family keeps its dispatch and ``torch.library`` registration next to
its kernels (``kernels/<family>/ops_torch.py``); this module is the one public
namespace users import::

    import plum_kernels.torch as K
    out = K.history_attention(q, k, v, cu_seqlens, max_seqlen)

``impl=None`` picks Triton for CUDA tensors and the torch reference
otherwise; ``impl="triton"`` forces the Triton kernel (on CPU tensors it runs
under the Triton interpreter, which the caller enables with
``TRITON_INTERPRET=1`` before importing triton), ``impl="reference"`` the
reference.
"""
from __future__ import annotations

from plum_kernels._autotune import set_autotune
from plum_kernels.attention.ops_torch import beam_decode_attention, history_attention
from plum_kernels.beam.ops_torch import (
    BeamStep,
    TrieAggregate,
    constrained_beam_search,
    constrained_beam_step,
    trie_aggregate,
)
from plum_kernels.moe.ops_torch import (
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
    "constrained_beam_step", "constrained_beam_search", "BeamStep", "trie_aggregate", "TrieAggregate",
    # autotuning of the Triton kernels on a GPU (on by default)
    "set_autotune",
]
