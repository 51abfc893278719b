"""The one configuration dataclass of the PLUM language model, with presets.

:class:`ModelConfig` describes a decoder-only transformer of the Qwen3 /
Qwen3-MoE family (RMSNorm, RoPE, GQA with QK-norm, SwiGLU feed-forward, top-k
softmax router over SwiGLU experts). A layer is a MoE layer when
``num_experts > 0``, ``layer not in mlp_only_layers`` and
``(layer + 1) % decoder_sparse_step == 0`` (Hugging Face's rule); otherwise
it has a dense SwiGLU FFN of width ``intermediate_size``.

Presets (:func:`preset`): ``tiny`` for the tests and ``plum demo``; ``small``
(``tiny`` twice as wide, dropout 0.1), ``medium`` (three times as wide,
dropout 0.2) and ``medium-deep`` (``medium`` with a third layer, a second
MoE layer), the CPU models of ``plum run`` on Amazon Beauty (default
``medium-deep``, ``plumrec/configs/amazon.toml``; chosen on Beauty's
validation split); and three sizes near the activated sizes of
PLUM's scaling study. "Activated" counts the
parameters a token touches: attention, router, the ``top_k`` experts (or the
dense FFN), norms and the LM head; the input embedding lookup is excluded
(it costs no FLOPs). :meth:`ModelConfig.activated_params` computes it; the
test suite checks each preset lies within 10% of its name.

=========  ======  ======  ====  ========  ==  ===  ======  =========  =========
preset     hidden  layers  Hq    Hkv x D   E   k    f_moe   activated  total
=========  ======  ======  ====  ========  ==  ===  ======  =========  =========
plum-110m  512     12      8     4 x 64    32  4    320     113M       278M
plum-370m  1024    16      16    4 x 64    64  8    448     379M       1.61B
plum-900m  1536    22      16    4 x 128   64  8    640     934M       4.57B
=========  ======  ======  ====  ========  ==  ===  ======  =========  =========

The large presets keep Qwen3's text vocabulary (151,936 tokens) plus PLUM's
SID tokens (2048 + 1024 + 512 + 256) and the special tokens; their
``vocab_size`` is a placeholder that :func:`plumrec.model.vocab.extend_vocabulary`
or the checkpoint loader replaces.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelConfig", "PRESETS", "preset"]

_KERNEL_HEAD_DIMS = (64, 128)  # head dims the Triton attention kernels take


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of :class:`plumrec.model.PlumLM` (validated on creation).

    Field names follow Hugging Face's ``Qwen3MoeConfig`` so that a
    ``config.json`` maps one to one (see :mod:`plumrec.model.hf`).
    """

    vocab_size: int = 1024
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 256          # dense SwiGLU FFN width
    moe_intermediate_size: int = 128      # per-expert SwiGLU width
    num_experts: int = 8                  # 0: every layer dense
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True           # renormalise the top-k softmax weights
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    router_aux_loss_coef: float = 0.01    # load-balance loss weight
    router_z_loss_coef: float = 1e-3      # router z-loss weight
    initializer_range: float = 0.02
    hidden_dropout: float = 0.0           # dropout on the embeddings and each residual branch (training only)
    kernel_impl: str | None = None        # impl= passed to plum_kernels.torch (None: fastest available)

    def __post_init__(self):
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "decoder_sparse_step", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                             f"got {self.num_experts_per_tok}")
        if self.num_experts and self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size must be >= 1, got {self.moe_intermediate_size}")
        if self.intermediate_size < 1 and any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            raise ValueError("intermediate_size must be >= 1 when some layer is dense")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"mlp_only_layers must index layers in [0, {self.num_hidden_layers}), got {bad}")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError("rope_theta and rms_norm_eps must be > 0")
        if not isinstance(self.hidden_dropout, (int, float)) or isinstance(self.hidden_dropout, bool) \
                or not 0.0 <= self.hidden_dropout < 1.0:
            raise ValueError(f"hidden_dropout must be a float in [0, 1), got {self.hidden_dropout!r}")
        if self.kernel_impl not in (None, "reference", "triton"):
            raise ValueError(f"kernel_impl must be None, 'reference' or 'triton', got {self.kernel_impl!r}")

    # -- structure -------------------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        """Hugging Face's rule for Qwen3-MoE sparse layers."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def kernel_head_dim_ok(self) -> bool:
        """Whether the Triton attention kernels take this head dim (else the reference runs)."""
        return self.head_dim in _KERNEL_HEAD_DIMS

    # -- sizes -----------------------------------------------------------------------
    def _attn_params(self) -> int:
        d, D = self.hidden_size, self.head_dim
        return d * self.num_attention_heads * D * 2 + 2 * d * self.num_key_value_heads * D + 2 * D + 2 * d

    def _ffn_params(self, layer: int, activated: bool) -> int:
        d = self.hidden_size
        if not self.is_moe_layer(layer):
            return 3 * d * self.intermediate_size
        experts = self.num_experts_per_tok if activated else self.num_experts
        return d * self.num_experts + experts * 3 * d * self.moe_intermediate_size

    def num_params(self) -> int:
        """Total parameters (embedding counted once when tied)."""
        body = sum(self._attn_params() + self._ffn_params(i, False) for i in range(self.num_hidden_layers))
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return body + emb + self.hidden_size

    def activated_params(self) -> int:
        """Parameters a token touches, without the input embedding lookup (LM head included)."""
        body = sum(self._attn_params() + self._ffn_params(i, True) for i in range(self.num_hidden_layers))
        return body + self.vocab_size * self.hidden_size + self.hidden_size

    def flops_per_token(self, seq_len: int, *, training: bool = True) -> float:
        """Model FLOPs per token (PaLM appendix B convention).

        ``2 * N_activated`` for the matmuls plus ``2 * layers * Hq * D *
        seq_len`` for causal attention scores and values (``4 * ... * seq_len
        / 2``: causal halves it) in the forward; training is 3x the forward.
        Router/softmax/norm elementwise work is not counted.
        """
        if seq_len < 0:
            raise ValueError(f"seq_len must be >= 0, got {seq_len}")
        dense = 2.0 * self.activated_params()
        attn = 2.0 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        fwd = dense + attn
        return 3.0 * fwd if training else fwd

    # -- (de)serialisation -----------------------------------------------------------
    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


_QWEN3_VOCAB = 151_936
_PLUM_SID_TOKENS = 2048 + 1024 + 512 + 256
_LARGE_VOCAB = _QWEN3_VOCAB + _PLUM_SID_TOKENS + 16

_MEDIUM = ModelConfig(vocab_size=1024, hidden_size=384, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=3, head_dim=64, intermediate_size=768, moe_intermediate_size=384,
                      num_experts=4, num_experts_per_tok=2, mlp_only_layers=(0,), max_position_embeddings=2048,
                      hidden_dropout=0.2)

PRESETS: dict[str, ModelConfig] = {
    # tests and `plum demo`: one dense layer first (mlp_only_layers) then MoE layers;
    # head_dim 64 so that the Triton attention kernels run it on a GPU.
    "tiny": ModelConfig(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=64, intermediate_size=256, moe_intermediate_size=128,
                        num_experts=4, num_experts_per_tok=2, mlp_only_layers=(0,), max_position_embeddings=2048),
    # Amazon Beauty (2.75M parameters with Beauty's 4,583-token vocabulary): width alone overfits there,
    # width with dropout 0.1 beats tiny on the validation split.
    "small": ModelConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, intermediate_size=512, moe_intermediate_size=256,
                         num_experts=4, num_experts_per_tok=2, mlp_only_layers=(0,), max_position_embeddings=2048,
                         hidden_dropout=0.1),
    # Amazon Beauty (5.30M parameters): tiny at three times the width with dropout 0.2; beats small on the
    # validation split at 16 and at 32 SFT epochs.
    "medium": _MEDIUM,
    # `plum run`'s default on Amazon Beauty (7.77M parameters, 6.00M activated, with its 5,239-token
    # vocabulary): medium with a third layer (dense, MoE, MoE); beats medium on the validation split over
    # three seeds at 3,200 SFT steps.
    "medium-deep": _MEDIUM.replace(num_hidden_layers=3),
    "plum-110m": ModelConfig(vocab_size=_LARGE_VOCAB, hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                             num_key_value_heads=4, head_dim=64, intermediate_size=2048, moe_intermediate_size=320,
                             num_experts=32, num_experts_per_tok=4, rope_theta=1e6, tie_word_embeddings=True),
    "plum-370m": ModelConfig(vocab_size=_LARGE_VOCAB, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
                             num_key_value_heads=4, head_dim=64, intermediate_size=4096, moe_intermediate_size=448,
                             num_experts=64, num_experts_per_tok=8, rope_theta=1e6, tie_word_embeddings=True),
    "plum-900m": ModelConfig(vocab_size=_LARGE_VOCAB, hidden_size=1536, num_hidden_layers=22, num_attention_heads=16,
                             num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=640,
                             num_experts=64, num_experts_per_tok=8, rope_theta=1e6, tie_word_embeddings=True),
}
PRESET_TARGETS = {"plum-110m": 110e6, "plum-370m": 370e6, "plum-900m": 900e6}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset, optionally with fields replaced: ``preset("tiny", vocab_size=300)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
