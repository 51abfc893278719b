"""The PLUM language model: a decoder-only transformer of the Qwen3-MoE family.

Every batch is *packed*: the tokens of B sequences lie back to back in one
``[T]`` vector delimited by ``cu_seqlens`` int32 ``[B+1]`` (no padding), and
attention is ``plum_kernels.torch.history_attention`` over those jagged sequences.
Feed-forward layers are either a dense SwiGLU FFN or a dropless mixture of
SwiGLU experts through ``plum_kernels.torch.moe_mlp`` (top-k softmax router).

Layer (pre-norm, Qwen3)::

    h = x + drop(o_proj(attn(rope(q_norm(q_proj(n1(x)))), rope(k_norm(k_proj(n1(x)))), v_proj(n1(x)))))
    y = h + drop(ffn(n2(h)))

``drop`` is dropout with ``config.hidden_dropout`` (also applied to the token
embeddings) in training mode only (0.1 in the ``small`` preset, 0.2 in
``medium`` and ``medium-deep``, 0 in the others and in checkpoints loaded
from Hugging Face), so inference is Qwen3's exactly.

Serving (generative retrieval) uses two more entry points:

- :meth:`PlumLM.forward` with ``return_kv=True`` returns every layer's keys
  (after QK-norm and RoPE) and values of the packed prompt, from which
  :meth:`PlumLM.prefix_cache` builds a ``[B, S, Hkv, D]`` cache per layer,
  stored once per user;
- :meth:`PlumLM.decode_step` advances W beams per user by one token with
  ``plum_kernels.torch.beam_decode_attention``, reading that shared prefix once
  for all beams and each beam's few generated tokens from a ``[B, W, s, Hkv,
  D]`` suffix cache (:class:`BeamCache`).

Parameter names follow Hugging Face's Qwen3 / Qwen3-MoE modules
(``layers.{i}.self_attn.q_proj.weight`` ...) except the experts, stored as
``mlp.w_gate_up [E, d, 2f]`` and ``mlp.w_down [E, f, d]`` (the layout of
``moe_mlp``); :mod:`plumrec.model.hf` does the mapping.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import plum_kernels.torch as K
from plumrec.model.config import ModelConfig

__all__ = ["PlumLM", "LMOutput", "BeamCache", "RMSNorm", "cu_seqlens_from_lengths", "positions_from_cu_seqlens"]


# ----------------------------------------------------------------------------- helpers

def cu_seqlens_from_lengths(lengths, device=None) -> Tensor:
    """``[B]`` sequence lengths -> int32 ``cu_seqlens [B+1]``."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=device)
    if lengths.dim() != 1 or lengths.numel() == 0:
        raise ValueError(f"lengths must be a non-empty 1-D sequence, got shape {tuple(lengths.shape)}")
    if (lengths < 0).any():
        raise ValueError("lengths must be >= 0")
    return F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)


def positions_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """Position of every packed token within its own sequence, int64 ``[T]``."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts


def _check_cu_seqlens(cu_seqlens) -> None:
    """Type and shape of ``cu_seqlens`` (static: also checked while tracing)."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
            or cu_seqlens.shape[0] < 2:
        got = f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} {tuple(getattr(cu_seqlens, 'shape', ()))}"
        raise ValueError(f"cu_seqlens must be an int32 tensor [B+1] with B >= 1, got {got}")


def _check_cu_seqlens_values(cu: list[int], total: int) -> None:
    """Host values of ``cu_seqlens``: 0, non-decreasing, T."""
    if cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T = {total} "
                         f"(the number of input_ids), got {cu[:4]}{'...' if len(cu) > 4 else ''}{cu[-1:]}")


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype matmul inputs have under the current autocast state."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalised in float32 (Hugging Face semantics) or, for
    float64 inputs, in float64 (so that a float64 model is float64 throughout, as tests' ground truth)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        xf = x if dtype == torch.float64 else x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class RotaryEmbedding(nn.Module):
    """Non-interleaved RoPE (``rotate_half``), ``inv_freq = theta ** (-2i / D)``.

    The frequencies are a float64 constant, not a buffer, so that casting the
    model to bf16 never degrades the rotation angles."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))

    def forward(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``positions [...]`` int -> ``(cos, sin)`` ``[..., D]`` in ``dtype`` (angles in float64)."""
        freqs = positions.to(torch.float64)[..., None] * self.inv_freq.to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x [..., H, D]`` with ``cos/sin [..., D]`` (broadcast over heads)."""
    ct = torch.promote_types(x.dtype, cos.dtype)
    cos, sin = cos.unsqueeze(-2).to(ct), sin.unsqueeze(-2).to(ct)
    half = x.shape[-1] // 2
    xc = x.to(ct)
    rot = torch.cat([-xc[..., half:], xc[..., :half]], dim=-1)
    return (xc * cos + rot * sin).to(x.dtype)


# ----------------------------------------------------------------------------- blocks

class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, D = cfg.hidden_size, cfg.head_dim
        self.hq, self.hkv, self.d_head = cfg.num_attention_heads, cfg.num_key_value_heads, D
        self.q_proj = nn.Linear(d, self.hq * D, bias=False)
        self.k_proj = nn.Linear(d, self.hkv * D, bias=False)
        self.v_proj = nn.Linear(d, self.hkv * D, bias=False)
        self.o_proj = nn.Linear(self.hq * D, d, bias=False)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        # The Triton kernels take head dims 64 and 128; with impl=None other head dims
        # (tiny test checkpoints) use the reference instead of failing on a GPU.
        self.impl = "reference" if cfg.kernel_impl is None and not cfg.kernel_head_dim_ok else cfg.kernel_impl

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [..., d]`` -> q ``[..., Hq, D]``, k, v ``[..., Hkv, D]`` (QK-norm, RoPE), one dtype."""
        lead = x.shape[:-1]
        q = self.q_norm(self.q_proj(x).view(*lead, self.hq, self.d_head))
        k = self.k_norm(self.k_proj(x).view(*lead, self.hkv, self.d_head))
        v = self.v_proj(x).view(*lead, self.hkv, self.d_head)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dt = _compute_dtype(v)
        return q.to(dt), k.to(dt), v.to(dt)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                kv_out: list | None = None) -> Tensor:
        q, k, v = self.qkv(x, cos, sin)
        if kv_out is not None:
            kv_out.append((k.detach(), v.detach()))
        # cu_seqlens is checked once per batch in PlumLM.forward: no host read in the layer.
        o = K.history_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, impl=self.impl, check_values=False)
        return self.o_proj(o.reshape(x.shape[0], self.hq * self.d_head))

    def decode(self, x: Tensor, cos: Tensor, sin: Tensor, cache: "BeamCache", layer: int) -> Tensor:
        """``x [B, W, d]``, the newest token of every beam; appends its KV to the suffix cache."""
        B, W, _ = x.shape
        q, k, v = self.qkv(x, cos[:, None], sin[:, None])
        s = cache.suffix_len
        cache.k_suffix[layer][:, :, s] = k.to(cache.k_suffix[layer].dtype)
        cache.v_suffix[layer][:, :, s] = v.to(cache.v_suffix[layer].dtype)
        kp, vp = cache.k_prefix[layer], cache.v_prefix[layer]
        # The cache's prefix_lens are checked once per step, by the first layer.
        o = K.beam_decode_attention(q.to(kp.dtype), kp, vp, cache.prefix_lens, cache.k_suffix[layer],
                                    cache.v_suffix[layer], s + 1, impl=self.impl, check_values=layer == 0)
        o = o.reshape(B, W, self.hq * self.d_head)
        if not torch.is_autocast_enabled(x.device.type):
            o = o.to(self.o_proj.weight.dtype)
        return self.o_proj(o)


class DenseMLP(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), None, None


class MoEMLP(nn.Module):
    """Top-k softmax router + dropless SwiGLU experts through ``plum_kernels.torch.moe_mlp``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        self.top_k, self.renormalize, self.impl = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.kernel_impl
        self.gate = nn.Linear(d, E, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(E, d, 2 * f))
        self.w_down = nn.Parameter(torch.empty(E, f, d))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        dt = _compute_dtype(x2)
        # The router runs in float32 (as Hugging Face's softmax(dtype=float)), float64 for float64 models,
        # also under autocast (which would run the linear in bf16 on CUDA).
        rdt = torch.float64 if x2.dtype == torch.float64 else torch.float32
        with torch.autocast(x2.device.type, enabled=False):
            logits = F.linear(x2.to(rdt), self.gate.weight.to(rdt))
        out, lb, z = K.moe_mlp(x2.to(dt), logits, self.w_gate_up.to(dt), self.w_down.to(dt), self.top_k,
                               renormalize=self.renormalize, impl=self.impl)
        return out.reshape(*lead, -1), lb, z


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MoEMLP(cfg) if cfg.is_moe_layer(layer) else DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.dropout = cfg.hidden_dropout

    def _drop(self, t: Tensor) -> Tensor:
        return F.dropout(t, self.dropout, self.training) if self.dropout else t

    def _ffn(self, h: Tensor):
        out, lb, z = self.mlp(self.post_attention_layernorm(h))
        return h + self._drop(out.to(h.dtype)), lb, z

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, kv_out=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen, kv_out)
        return self._ffn(x + self._drop(attn.to(x.dtype)))

    def decode(self, x, cos, sin, cache, layer):
        h = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, cache, layer).to(x.dtype)
        return self._ffn(h)[0]


# ----------------------------------------------------------------------------- model

class LMOutput(NamedTuple):
    hidden: Tensor               # [T, d] final-norm hidden states (or [M, d] at logits_index)
    logits: Tensor | None        # [T or M, V] when requested
    aux_loss: Tensor             # [] weighted sum of the router losses (0 without MoE layers)
    kv: list | None              # per layer (k [T, Hkv, D], v [T, Hkv, D]) with return_kv


@dataclass
class BeamCache:
    """KV cache for W beams per user that share the user's prompt.

    ``k_prefix[l] / v_prefix[l]``: ``[B, S, Hkv, D]`` (once per user);
    ``k_suffix[l] / v_suffix[l]``: ``[B, W, s, Hkv, D]`` (per beam);
    ``prefix_lens`` int32 ``[B]``; ``suffix_len``: tokens generated so far.
    """

    k_prefix: list
    v_prefix: list
    prefix_lens: Tensor
    k_suffix: list
    v_suffix: list
    suffix_len: int = 0

    def reorder(self, parent: Tensor) -> None:
        """Beams continue from ``parent [B, W]`` (index of the beam each came from)."""
        if self.suffix_len == 0:
            return
        B, W = parent.shape
        idx = parent.long().to(self.prefix_lens.device)[:, :, None, None, None]
        for cache in (self.k_suffix, self.v_suffix):
            for l, t in enumerate(cache):
                live = t[:, :, :self.suffix_len]
                cache[l][:, :, :self.suffix_len] = torch.gather(live, 1, idx.expand(-1, -1, *live.shape[2:]))


class PlumLM(nn.Module):
    """Decoder-only Qwen3(-MoE) LM over packed jagged batches.

    Example::

        model = PlumLM(preset("tiny", vocab_size=512))
        cu = cu_seqlens_from_lengths([5, 3])
        out = model(ids, cu)                    # ids int64 [8]
        out.logits                              # [8, 512]
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.reset_parameters()

    # -- init ------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, std)

    @property
    def _rope_dtype(self) -> torch.dtype:
        return torch.float64 if self.embed_tokens.weight.dtype == torch.float64 else torch.float32

    @property
    def output_embedding(self) -> Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # -- sizes -----------------------------------------------------------------------
    def flops_per_token(self, seq_len: int, *, training: bool = True) -> float:
        return self.config.flops_per_token(seq_len, training=training)

    def mfu(self, tokens_per_second: float, seq_len: int, peak_flops: float, *, training: bool = True) -> float:
        """Model FLOPs utilisation: achieved model FLOP/s over ``peak_flops`` (e.g. 989e12 for H100 bf16 dense)."""
        if peak_flops <= 0:
            raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
        return tokens_per_second * self.flops_per_token(seq_len, training=training) / peak_flops

    # -- forward ---------------------------------------------------------------------
    def _check_ids(self, input_ids: Tensor, id_range: tuple[int, int] | None = None) -> None:
        """dtype of ``input_ids``; with ``id_range`` (its host ``(min, max)``) also its values."""
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("input_ids must be an int64/int32 tensor [T], got "
                            f"{getattr(input_ids, 'dtype', input_ids)}")
        if id_range is not None and (id_range[0] < 0 or id_range[1] >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got range "
                             f"[{id_range[0]}, {id_range[1]}]")

    def _check_batch_values(self, input_ids: Tensor, cu_seqlens: Tensor, positions: Tensor | None) -> int:
        """The value checks of one packed batch from one host read of ``cu_seqlens`` and the
        ``input_ids`` (and ``positions``) range; returns the longest sequence."""
        T = input_ids.shape[0]
        parts = [cu_seqlens.long()]
        if T:
            parts.append(torch.stack([input_ids.min(), input_ids.max()]).long())
            if positions is not None:
                parts.append(positions.max().long().reshape(1))
        host = torch.cat(parts).tolist()
        n = cu_seqlens.shape[0]
        cu = host[:n]
        _check_cu_seqlens_values(cu, T)
        if T:
            self._check_ids(input_ids, (host[n], host[n + 1]))
        longest = max(b - a for a, b in zip(cu[:-1], cu[1:]))
        top = host[n + 2] if T and positions is not None else longest - 1
        if top >= self.config.max_position_embeddings:
            raise ValueError(f"a position exceeds max_position_embeddings={self.config.max_position_embeddings}")
        return longest

    def forward(self, input_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int | None = None, *,
                positions: Tensor | None = None, logits: bool = True, logits_index: Tensor | None = None,
                return_kv: bool = False) -> LMOutput:
        """Run a packed batch.

        Args:
            input_ids: int64 (or int32) ``[T]``, B sequences back to back, in ``[0, vocab_size)``.
            cu_seqlens: int32 ``[B+1]`` sequence boundaries on the model's device (see
                ``history_attention``).
            max_seqlen: Python int >= the longest sequence. When None, eager mode computes it from
                ``cu_seqlens``; under ``torch.compile`` it is T (a valid bound: the Triton
                attention kernels then launch programs for T query rows per sequence, most of
                which exit at once; pass it when compiling for a GPU).
            positions: int64 ``[T]`` RoPE positions; default the position within each sequence.
            logits: compute the LM-head logits.
            logits_index: int64 ``[M]``: compute logits (and return hidden) only at these
                token positions, e.g. the SFT targets (saves the ``[T, V]`` product).
            return_kv: also return every layer's ``(k, v)`` ``[T, Hkv, D]`` for a prefix cache.

        The values of ``input_ids``, ``cu_seqlens`` and ``positions`` are checked here, once per
        batch (one host read), in eager mode only: the layers run no value check and read nothing
        back to the host. Under ``torch.compile`` only the dtypes and shapes are checked.
        """
        self._check_ids(input_ids)
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be packed to 1-D [T], got shape {tuple(input_ids.shape)}")
        T = input_ids.shape[0]
        _check_cu_seqlens(cu_seqlens)
        if not torch.compiler.is_compiling():
            longest = self._check_batch_values(input_ids, cu_seqlens, positions)
            if max_seqlen is not None and max_seqlen < longest:
                raise ValueError(f"max_seqlen ({max_seqlen}) is smaller than the longest sequence ({longest})")
            max_seqlen = longest if max_seqlen is None else max_seqlen
        elif max_seqlen is None:
            max_seqlen = T
        if positions is None:
            positions = positions_from_cu_seqlens(cu_seqlens, T)
        cfg = self.config
        cos, sin = self.rotary(positions, self._rope_dtype)
        x = self.embed_tokens(input_ids)
        if cfg.hidden_dropout and self.training:
            x = F.dropout(x, cfg.hidden_dropout, True)
        kv = [] if return_kv else None
        aux = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, lb, z = layer(x, cos, sin, cu_seqlens, max_seqlen, kv)
            if lb is not None:
                aux = aux + cfg.router_aux_loss_coef * lb.float() + cfg.router_z_loss_coef * z.float()
        if logits_index is not None:
            x = x[logits_index]
        h = self.norm(x)
        out = self.lm_logits(h) if logits else None
        return LMOutput(h, out, aux, kv)

    def lm_logits(self, hidden: Tensor, rows: slice | Tensor | None = None) -> Tensor:
        """Logits ``hidden @ W_out[rows].T`` (all rows when None; a slice picks e.g. one SID level)."""
        w = self.output_embedding if rows is None else self.output_embedding[rows]
        dt = _compute_dtype(hidden)
        return F.linear(hidden.to(dt), w.to(dt))

    # -- serving ---------------------------------------------------------------------
    @torch.no_grad()
    def prefix_cache(self, kv: list, cu_seqlens: Tensor, beam_width: int, max_new_tokens: int) -> BeamCache:
        """Scatter the packed prompt KV of :meth:`forward` (``return_kv``) into a
        :class:`BeamCache` with room for ``max_new_tokens`` per beam."""
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        B, S = lens.shape[0], int(lens.max())
        T = int(cu_seqlens[-1])
        seq = torch.repeat_interleave(torch.arange(B, device=lens.device), lens, output_size=T)
        pos = positions_from_cu_seqlens(cu_seqlens, T)
        kp, vp, ks, vs = [], [], [], []
        for k, v in kv:
            Hkv, D = k.shape[1:]
            for src, dst in ((k, kp), (v, vp)):
                buf = src.new_zeros(B, S, Hkv, D)
                buf[seq, pos] = src
                dst.append(buf)
            ks.append(k.new_zeros(B, beam_width, max_new_tokens, Hkv, D))
            vs.append(v.new_zeros(B, beam_width, max_new_tokens, Hkv, D))
        return BeamCache(kp, vp, lens.to(torch.int32), ks, vs, 0)

    @torch.no_grad()
    def decode_step(self, tokens: Tensor, cache: BeamCache) -> Tensor:
        """Feed ``tokens [B, W]`` (one new token per beam) and return the final-norm
        hidden states ``[B, W, d]``; the beams' KV is appended to ``cache``."""
        B, W = tokens.shape
        self._check_ids(tokens)
        if tokens.numel() and not torch.compiler.is_compiling():
            self._check_ids(tokens, tuple(torch.stack([tokens.min(), tokens.max()]).tolist()))
        pos = cache.prefix_lens.long() + cache.suffix_len                      # [B]
        cos, sin = self.rotary(pos, self._rope_dtype)
        x = self.embed_tokens(tokens)
        for l, layer in enumerate(self.layers):
            x = layer.decode(x, cos, sin, cache, l)
        cache.suffix_len += 1
        return self.norm(x)
