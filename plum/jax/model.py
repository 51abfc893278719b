"""The PLUM LM in JAX: :class:`plumrec.model.PlumLM`'s forward as one function over a plain pytree.

``params`` is a flat dict keyed by the torch model's ``state_dict`` names, every array in the torch
layout (no transposes): ``nn.Linear`` weights stay ``[out, in]`` and the forward contracts their
second axis (``x @ w.T``, one ``dot_general`` for XLA either way); the experts are
``mlp.w_gate_up [E, d, 2f]`` and ``mlp.w_down [E, f, d]`` (the layout of ``plum_kernels.jax.moe_mlp``).
So a checkpoint that :func:`plumrec.pipeline.workspace.save_model` writes (``model.safetensors``) or a
live ``state_dict`` loads with :func:`params_from_torch_state` unchanged, and gradients carry the same
names as the torch parameters.

Batches are packed as in torch: ``input_ids [T]`` holds B sequences back to back, delimited by
``cu_seqlens`` int32 ``[B+1]``; attention is ``plum_kernels.jax.history_attention`` and MoE layers
``plum_kernels.jax.moe_mlp``. :func:`forward` is jit-able with ``cfg``, ``max_seqlen``, ``impl`` and
``interpret`` static.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

import plum_kernels.jax as KJ
from plumrec.io import read_tensors
from plumrec.model.config import ModelConfig

__all__ = ["param_shapes", "init_params", "params_from_torch_state", "forward", "decode_step", "lm_logits",
           "output_embedding", "positions_from_cu_seqlens", "rope_tables", "rms_norm"]


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name (the torch ``state_dict`` name) and shape, in the torch model's order."""
    d, D, V = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    shapes = {"embed_tokens.weight": (V, d)}
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hq * D, d), p + "self_attn.k_proj.weight": (hkv * D, d),
                       p + "self_attn.v_proj.weight": (hkv * D, d), p + "self_attn.o_proj.weight": (d, hq * D),
                       p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)})
        if cfg.is_moe_layer(i):
            E, f = cfg.num_experts, cfg.moe_intermediate_size
            shapes.update({p + "mlp.w_gate_up": (E, d, 2 * f), p + "mlp.w_down": (E, f, d),
                           p + "mlp.gate.weight": (E, d)})
        else:
            f = cfg.intermediate_size
            shapes.update({p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                           p + "mlp.down_proj.weight": (d, f)})
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
    shapes["norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, d)
    return shapes


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight") or name.endswith("layernorm.weight")


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Fresh parameters as ``PlumLM.reset_parameters`` draws them: norms 1, every other weight
    ``N(0, initializer_range^2)``. ``key``: a ``jax.random`` key; ``dtype``: the arrays' dtype."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    return _init(cfg, key, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(cfg: ModelConfig, key: jax.Array, dtype) -> dict[str, jax.Array]:
    shapes = param_shapes(cfg)
    keys = jax.random.split(key, len(shapes))
    return {name: (jnp.ones(shape, dtype) if _is_norm(name)
                   else cfg.initializer_range * jax.random.normal(k, shape, dtype))
            for k, (name, shape) in zip(keys, shapes.items())}


def params_from_torch_state(state, cfg: ModelConfig, dtype=None) -> dict[str, jax.Array]:
    """Parameters from a torch ``PlumLM.state_dict()`` (a mapping name -> tensor) or from the path of a
    ``model.safetensors`` that ``save_model`` wrote. Names and shapes must be those of
    :func:`param_shapes` ``(cfg)`` exactly (a ``ValueError`` names the first difference); layouts are kept.
    ``dtype``: cast every array to it (default: keep the checkpoint's dtype; bfloat16 stays bfloat16)."""
    shapes = param_shapes(cfg)
    if isinstance(state, (str, os.PathLike)):
        state = read_tensors(state, expected=shapes, config="cfg")
    if not hasattr(state, "items"):
        raise TypeError(f"state must be a state_dict mapping or a safetensors path, got {type(state).__name__}")
    missing, unknown = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or unknown:
        raise ValueError(f"state does not match cfg: missing {missing[:8]}, unexpected {unknown[:8]}")
    out = {}
    for name, shape in shapes.items():
        t = state[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"state[{name!r}] has shape {tuple(t.shape)}, cfg needs {shape}")
        src = str(t.dtype).replace("torch.", "")
        if hasattr(t, "detach"):  # a torch tensor (numpy has no bfloat16: it goes through float32)
            t = t.detach().cpu()
            t = t.float().numpy() if src == "bfloat16" else t.numpy()
        # a copy: on the CPU jnp.asarray may alias the numpy buffer, and so the torch tensor's storage, which
        # an in-place torch optimizer step would then change under the JAX parameters
        out[name] = jnp.array(np.array(t, copy=True), dtype if dtype is not None else jnp.dtype(src))
    return out


# ----------------------------------------------------------------------------- pieces


def positions_from_cu_seqlens(cu_seqlens: jax.Array, total: int) -> jax.Array:
    """Position of every packed token within its own sequence, int32 ``[total]``."""
    t = jnp.arange(total, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_seqlens, t, side="right") - 1
    return t - cu_seqlens[seq]


@functools.lru_cache(maxsize=8)
def rope_tables(head_dim: int, theta: float, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` float32 ``[max_positions, head_dim]`` of non-interleaved RoPE, angles in float64
    (as the torch model computes them), ``inv_freq = theta ** (-2i / head_dim)``."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = np.arange(max_positions, dtype=np.float64)[:, None] * inv_freq
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x [..., H, D]`` rotated by ``cos/sin [..., D]`` (``rotate_half``), in float32 or wider."""
    ct = jnp.promote_types(x.dtype, jnp.float32)
    xc, c, s = x.astype(ct), cos[..., None, :].astype(ct), sin[..., None, :].astype(ct)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xc[..., half:], xc[..., :half]], axis=-1)
    return (xc * c + rot * s).astype(x.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """``w * x / sqrt(mean(x^2) + eps)`` over the last axis, normalised in float32 (float64 stays)."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def _linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., in] @ w[out, in].T`` (the torch ``nn.Linear`` layout)."""
    return jnp.einsum("...i,oi->...o", x, w)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or not rate:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _qkv(p, pre, x, cos, sin, cfg):
    """``x [..., d]``, ``cos/sin [..., D]`` -> q ``[..., Hq, D]``, k, v ``[..., Hkv, D]`` (QK-norm, RoPE)."""
    lead, D = x.shape[:-1], cfg.head_dim
    q = _linear(x, p[pre + "q_proj.weight"]).reshape(*lead, cfg.num_attention_heads, D)
    k = _linear(x, p[pre + "k_proj.weight"]).reshape(*lead, cfg.num_key_value_heads, D)
    v = _linear(x, p[pre + "v_proj.weight"]).reshape(*lead, cfg.num_key_value_heads, D)
    q = _rope(rms_norm(q, p[pre + "q_norm.weight"], cfg.rms_norm_eps), cos, sin)
    k = _rope(rms_norm(k, p[pre + "k_norm.weight"], cfg.rms_norm_eps), cos, sin)
    return q, k, v.astype(q.dtype)


def _attention(p, pre, x, cos, sin, cu_seqlens, max_seqlen, cfg, impl, interpret):
    """-> ``(out [T, d], k [T, Hkv, D], v [T, Hkv, D])``."""
    q, k, v = _qkv(p, pre, x, cos, sin, cfg)
    o = KJ.history_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, impl=impl, interpret=interpret)
    return _linear(o.reshape(x.shape[0], -1), p[pre + "o_proj.weight"]), k, v


def _router_losses(logits: jax.Array, top_k: int, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The softmax router's ``(load_balance, z_loss)`` over the tokens where ``mask [T]`` is True only (the
    formulas of ``plum_kernels.jax.moe_route`` with every mean taken over those tokens)."""
    E = logits.shape[-1]
    m = mask.astype(logits.dtype)
    n = jnp.maximum(jnp.sum(m), 1.0)
    p = jax.nn.softmax(logits, axis=-1)
    _, ids = jax.lax.top_k(jax.lax.stop_gradient(p), top_k)
    counts = jnp.zeros((E,), logits.dtype).at[ids].add(jnp.broadcast_to(m[:, None], ids.shape))
    lb = E * jnp.sum(counts / (n * top_k) * (jnp.sum(p * m[:, None], axis=0) / n))
    z = jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * m) / n
    return lb, z


def _mlp(p, pre, x, cfg, moe: bool, impl, interpret, token_mask=None):
    """-> ``(out [T, d], load_balance_loss, z_loss)`` (the losses 0 for a dense layer); with ``token_mask``
    the router losses average over the masked-in tokens only."""
    if not moe:
        h = jax.nn.silu(_linear(x, p[pre + "gate_proj.weight"])) * _linear(x, p[pre + "up_proj.weight"])
        zero = jnp.zeros((), jnp.float32)
        return _linear(h, p[pre + "down_proj.weight"]), zero, zero
    rdt = jnp.promote_types(x.dtype, jnp.float32)  # the router runs in float32 (float64 stays)
    logits = _linear(x.astype(rdt), p[pre + "gate.weight"].astype(rdt))
    out, lb, z = KJ.moe_mlp(x, logits, p[pre + "w_gate_up"].astype(x.dtype), p[pre + "w_down"].astype(x.dtype),
                            cfg.num_experts_per_tok, renormalize=cfg.norm_topk_prob, impl=impl, interpret=interpret)
    if token_mask is not None:
        lb, z = _router_losses(logits, cfg.num_experts_per_tok, token_mask)
    return out, lb, z


# ----------------------------------------------------------------------------- model


def forward(params: dict, cfg: ModelConfig, input_ids: jax.Array, cu_seqlens: jax.Array, max_seqlen: int, *,
            positions: jax.Array | None = None, logits_index: jax.Array | None = None, logits: bool = True,
            impl: str | None = None, interpret: bool | None = None, dropout_key: jax.Array | None = None,
            return_kv: bool = False, token_mask: jax.Array | None = None):
    """Run a packed batch; the twin of ``PlumLM.forward``.

    Args:
        params: the dict of :func:`param_shapes` names (:func:`init_params`, :func:`params_from_torch_state`).
        cfg: the model's :class:`~plumrec.model.config.ModelConfig` (static under ``jax.jit``).
        input_ids: int32 ``[T]``, B sequences back to back, in ``[0, vocab_size)``.
        cu_seqlens: int32 ``[B+1]``: 0, non-decreasing, ends at T (see ``plum_kernels.jax.history_attention``:
            under ``jax.jit`` invalid values give NaN outputs instead of an error).
        max_seqlen: Python int >= the longest sequence and <= ``cfg.max_position_embeddings`` (static).
        positions: int ``[T]`` RoPE positions in ``[0, max_position_embeddings)``; default the position of
            each token within its sequence.
        logits_index: int ``[M]``: return hidden states and logits only at these packed positions (e.g.
            the SFT loss positions).
        logits: compute the LM-head logits (else ``None`` is returned in their place).
        impl, interpret: passed to the ``plum_kernels.jax`` ops (``impl=None``: Pallas on a TPU, the jnp
            reference elsewhere; ``"pallas"`` with ``interpret=None`` runs interpret mode off a TPU).
        dropout_key: a ``jax.random`` key turns on ``cfg.hidden_dropout`` (training); None: no dropout.
        return_kv: also return every layer's keys and values (for a decoding cache, see :func:`decode_step`).
        token_mask: bool ``[T]``: False marks padding tokens, left out of the router's aux losses (their
            outputs are computed and meaningless); None: every token counts.

    Returns:
        ``(hidden [T or M, d], logits [T or M, V] or None, aux_loss [] float32)``: the final-norm hidden
        states, their logits against the output embedding and ``sum over MoE layers of
        router_aux_loss_coef * load_balance + router_z_loss_coef * z_loss`` (0 without MoE layers).
        With ``return_kv`` a fourth element: per layer ``(k, v)``, each ``[T, Hkv, D]`` (after QK-norm and
        RoPE, as the attention reads them).
    """
    if input_ids.ndim != 1 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be an integer array [T], got {input_ids.dtype} {input_ids.shape}")
    if cu_seqlens.ndim != 1 or cu_seqlens.dtype != jnp.int32 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be an int32 array [B+1] with B >= 1, got {cu_seqlens.dtype} "
                         f"{cu_seqlens.shape}")
    if not isinstance(max_seqlen, int) or not 1 <= max_seqlen <= cfg.max_position_embeddings:
        raise ValueError(f"max_seqlen must be a Python int in [1, max_position_embeddings="
                         f"{cfg.max_position_embeddings}], got {max_seqlen!r}")
    T = input_ids.shape[0]
    if token_mask is not None and (token_mask.shape != (T,) or token_mask.dtype != jnp.bool_):
        raise ValueError(f"token_mask must be a bool array [T={T}], got {token_mask.dtype} {token_mask.shape}")
    if positions is None:
        positions = positions_from_cu_seqlens(cu_seqlens, T)
    cos_t, sin_t = rope_tables(cfg.head_dim, float(cfg.rope_theta), cfg.max_position_embeddings)
    cos, sin = jnp.asarray(cos_t)[positions], jnp.asarray(sin_t)[positions]
    keys = [None] * (2 * cfg.num_hidden_layers + 1) if dropout_key is None else \
        list(jax.random.split(dropout_key, 2 * cfg.num_hidden_layers + 1))
    x = _dropout(params["embed_tokens.weight"][input_ids], cfg.hidden_dropout, keys[0])
    aux = jnp.zeros((), jnp.float32)
    kv = []
    for i in range(cfg.num_hidden_layers):
        pre = f"layers.{i}."
        h = rms_norm(x, params[pre + "input_layernorm.weight"], cfg.rms_norm_eps)
        a, k, v = _attention(params, pre + "self_attn.", h, cos, sin, cu_seqlens, max_seqlen, cfg, impl, interpret)
        kv.append((k, v))
        x = x + _dropout(a.astype(x.dtype), cfg.hidden_dropout, keys[2 * i + 1])
        h = rms_norm(x, params[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        out, lb, z = _mlp(params, pre + "mlp.", h, cfg, cfg.is_moe_layer(i), impl, interpret, token_mask)
        x = x + _dropout(out.astype(x.dtype), cfg.hidden_dropout, keys[2 * i + 2])
        if cfg.is_moe_layer(i):
            aux = aux + cfg.router_aux_loss_coef * lb.astype(jnp.float32) \
                + cfg.router_z_loss_coef * z.astype(jnp.float32)
    if logits_index is not None:
        x = x[logits_index]
    hidden = rms_norm(x, params["norm.weight"], cfg.rms_norm_eps)
    out = hidden, (lm_logits(params, hidden) if logits else None), aux
    return (*out, kv) if return_kv else out


def decode_step(params: dict, cfg: ModelConfig, tokens: jax.Array, k_prefix: list, v_prefix: list,
                prefix_lens: jax.Array, k_suffix: list, v_suffix: list, suffix_len: int, *, impl: str | None = None,
                interpret: bool | None = None):
    """Feed one new token per beam, the twin of ``PlumLM.decode_step`` (functional: returns the caches).

    Args:
        params, cfg: as in :func:`forward` (``cfg`` static under ``jax.jit``).
        tokens: int ``[B, W]``, the newest token of each of the W beams of B users, in ``[0, vocab_size)``.
        k_prefix, v_prefix: per layer ``[B, S, Hkv, D]``, each user's prompt keys / values (the
            ``return_kv`` of :func:`forward` scattered per user; rows ``>= prefix_lens[b]`` are ignored).
        prefix_lens: int32 ``[B]`` in ``[1, S]``, each user's prompt length.
        k_suffix, v_suffix: per layer ``[B, W, s, Hkv, D]`` with ``s > suffix_len``: the keys / values
            of each beam's generated tokens, rows ``< suffix_len`` filled.
        suffix_len: Python int, the tokens each beam has generated before ``tokens`` (static).
        impl, interpret: passed to ``plum_kernels.jax.beam_decode_attention`` and ``moe_mlp``.

    Returns:
        ``(hidden [B, W, d], k_suffix, v_suffix)``: the final-norm hidden states of ``tokens`` (RoPE
        position ``prefix_lens[b] + suffix_len``) and the suffix caches with row ``suffix_len`` written.
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array [B, W], got {tokens.dtype} {tokens.shape}")
    L = cfg.num_hidden_layers
    if not all(len(c) == L for c in (k_prefix, v_prefix, k_suffix, v_suffix)):
        raise ValueError(f"k_prefix, v_prefix, k_suffix and v_suffix must hold one array per layer ({L})")
    if not isinstance(suffix_len, int) or not 0 <= suffix_len < k_suffix[0].shape[2]:
        raise ValueError(f"suffix_len must be a Python int in [0, {k_suffix[0].shape[2]}), got {suffix_len!r}")
    B, W = tokens.shape
    cos_t, sin_t = rope_tables(cfg.head_dim, float(cfg.rope_theta), cfg.max_position_embeddings)
    pos = prefix_lens.astype(jnp.int32) + suffix_len
    cos, sin = jnp.asarray(cos_t)[pos][:, None], jnp.asarray(sin_t)[pos][:, None]   # [B, 1, D]
    x = params["embed_tokens.weight"][tokens]
    k_suffix, v_suffix = list(k_suffix), list(v_suffix)
    for i in range(L):
        pre = f"layers.{i}."
        h = rms_norm(x, params[pre + "input_layernorm.weight"], cfg.rms_norm_eps)
        q, k, v = _qkv(params, pre + "self_attn.", h, cos, sin, cfg)
        k_suffix[i] = k_suffix[i].at[:, :, suffix_len].set(k.astype(k_suffix[i].dtype))
        v_suffix[i] = v_suffix[i].at[:, :, suffix_len].set(v.astype(v_suffix[i].dtype))
        kp = k_prefix[i]
        o = KJ.beam_decode_attention(q.astype(kp.dtype), kp, v_prefix[i], prefix_lens, k_suffix[i], v_suffix[i],
                                     suffix_len + 1, impl=impl, interpret=interpret)
        x = x + _linear(o.reshape(B, W, -1), params[pre + "self_attn.o_proj.weight"]).astype(x.dtype)
        h = rms_norm(x, params[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        out, _, _ = _mlp(params, pre + "mlp.", h.reshape(B * W, -1), cfg, cfg.is_moe_layer(i), impl, interpret)
        x = x + out.reshape(B, W, -1).astype(x.dtype)
    return rms_norm(x, params["norm.weight"], cfg.rms_norm_eps), k_suffix, v_suffix


def output_embedding(params: dict) -> jax.Array:
    """The LM head ``[V, d]``: ``lm_head.weight``, or the token embeddings when tied."""
    return params.get("lm_head.weight", params["embed_tokens.weight"])


def lm_logits(params: dict, hidden: jax.Array, rows: slice | None = None) -> jax.Array:
    """``hidden [M, d] @ W_out[rows].T`` -> ``[M, V]`` (all rows when None; a slice picks e.g. one SID level)."""
    w = output_embedding(params)
    return _linear(hidden, w if rows is None else w[rows])
