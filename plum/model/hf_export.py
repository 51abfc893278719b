"""Export a :class:`PlumLM` and its vocabulary as a Hugging Face Qwen3 / Qwen3-MoE checkpoint.

:func:`export_hf` writes a folder that ``transformers.AutoModelForCausalLM`` and
``AutoTokenizer`` load with ``from_pretrained`` and that
:func:`plumrec.model.hf.load_hf_model` reads back into the same model:

- ``config.json``: ``model_type`` ``qwen3`` (no experts) or ``qwen3_moe``
  (``num_experts > 0``), every architecture field of :class:`ModelConfig`
  under its Hugging Face name, ``rope_parameters`` (default RoPE) and
  ``rope_theta``, ``dtype`` / ``torch_dtype``, and ``bos`` / ``eos`` /
  ``pad_token_id`` from the vocabulary. The two training-only settings
  Qwen3 has no field for, ``hidden_dropout`` and ``router_z_loss_coef``
  (neither changes the forward in eval mode), are written as
  ``plum_hidden_dropout`` and ``plum_router_z_loss_coef``: transformers
  keeps them as inert attributes, :func:`~plumrec.model.hf.load_hf_config`
  restores them. ``kernel_impl`` is a runtime choice and is not written.
- the weights with transformers' parameter names (``model.`` prefix, and
  ``lm_head.weight`` only when the embeddings are untied); the experts per
  expert, as ``save_pretrained`` writes them:
  ``model.layers.{i}.mlp.experts.{e}.gate_proj.weight = w_gate_up[e, :, :f].T``
  ``[f, d]``, ``up_proj = w_gate_up[e, :, f:].T`` ``[f, d]`` and
  ``down_proj = w_down[e].T`` ``[d, f]``. One ``model.safetensors`` when the
  tensors fit in ``max_shard_size``, else ``model-0000k-of-0000n.safetensors``
  shards filled in order and ``model.safetensors.index.json``
  (``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``), the
  Hugging Face convention.
- ``tokenizer.json`` (``tokenizers``): the text tokenizer with the special,
  feature and SID tokens of :class:`SIDVocab` added under the ids the model
  uses (special fillers ``<|plum_unused_k|>`` take the ids between the
  text tokenizer's vocabulary and ``vocab.base_size``, if any); special
  tokens are added as special, feature and SID tokens as plain added tokens
  (kept by ``decode``). ``tokenizer_config.json`` and
  ``special_tokens_map.json`` name the bos / eos / pad / unk tokens.

The folder is written into a temporary folder and swapped in
(:func:`plumrec.io.atomic_dir`). A model Qwen3 cannot express (parameters
beyond the Qwen3 layout, tensors whose shapes differ from its config, mixed
or non-float dtypes) or a vocabulary / tokenizer that does not fit the model
raises a ``ValueError`` naming the field.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from plumrec.io import atomic_dir
from plumrec.model.config import ModelConfig
from plumrec.model.model import PlumLM
from plumrec.model.vocab import SIDVocab, TextTokenizer

__all__ = ["export_hf", "hf_config_dict", "hf_state_dict", "hf_tokenizer", "parse_shard_size", "DEFAULT_MAX_SHARD_SIZE"]

DEFAULT_MAX_SHARD_SIZE = "5GB"
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_FILLER = "<|plum_unused_{}|>"


def parse_shard_size(size: int | str) -> int:
    """``max_shard_size`` as bytes: an int >= 1, or a string such as ``"5GB"`` (10^9), ``"500MiB"`` (2^20)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    elif isinstance(size, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)) \
            and m.group(2).upper() in _UNITS:
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    else:
        raise ValueError(f"max_shard_size must be an int of bytes or a size such as '5GB' or '500MiB', got {size!r}")
    if n < 1:
        raise ValueError(f"max_shard_size must be >= 1 byte, got {size!r}")
    return n


def hf_config_dict(cfg: ModelConfig, vocab: SIDVocab, dtype: torch.dtype) -> dict:
    """The ``config.json`` of a Hugging Face Qwen3 (``num_experts == 0``) or Qwen3-MoE checkpoint for ``cfg``.

    Args:
        cfg: the model's configuration.
        vocab: its vocabulary (``vocab.size == cfg.vocab_size``), for the bos / eos / pad ids.
        dtype: the weights' dtype (float32, bfloat16 or float16).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES.values())} to export, got {dtype}")
    vocab.check_model(cfg.vocab_size)
    moe = cfg.num_experts > 0
    special = set(vocab.special_tokens)
    out = {
        "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if moe else "qwen3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None,
        "use_cache": True, "dtype": _DTYPES[dtype], "torch_dtype": _DTYPES[dtype],
        "bos_token_id": vocab.token("<|bos|>"), "eos_token_id": vocab.token("<|eos|>"),
        "pad_token_id": vocab.token("<|pad|>") if "<|pad|>" in special else None,
        "plum_hidden_dropout": cfg.hidden_dropout, "plum_router_z_loss_coef": cfg.router_z_loss_coef,
    }
    if moe:
        out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                   decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers),
                   router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=False)
    return out


def _model_dtype(model: PlumLM) -> torch.dtype:
    dtypes = {p.dtype for p in model.state_dict().values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
        raise ValueError(f"model: the weights must share one dtype of {sorted(_DTYPES.values())} to export, "
                         f"got {sorted(map(str, dtypes))}")
    return dtypes.pop()


def _check_layout(model: PlumLM) -> dict[str, torch.Tensor]:
    """The model's state, checked against the Qwen3 layout its config describes."""
    if not isinstance(model, PlumLM):
        raise ValueError(f"model must be a PlumLM, got {type(model).__name__}")
    state = model.state_dict()
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in PlumLM(model.config).state_dict().items()}
    extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    if extra or missing:
        raise ValueError(f"model has parameters Qwen3 lacks {extra[:8]} or lacks {missing[:8]}: a Hugging Face "
                         "Qwen3 / Qwen3-MoE checkpoint cannot express it")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"model: tensor {k} has shape {tuple(state[k].shape)} but model.config implies {shape}")
    return state


def hf_state_dict(model: PlumLM) -> dict[str, torch.Tensor]:
    """The model's tensors under transformers' Qwen3 / Qwen3-MoE names (experts per expert), on the CPU,
    contiguous, in the model's dtype (see the module docstring for the mapping)."""
    state = _check_layout(model)
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if k.endswith("mlp.w_gate_up"):
            pre, f = "model." + k[: -len("w_gate_up")] + "experts.", cfg.moe_intermediate_size
            for e in range(cfg.num_experts):
                out[f"{pre}{e}.gate_proj.weight"] = v[e, :, :f].t().contiguous()
                out[f"{pre}{e}.up_proj.weight"] = v[e, :, f:].t().contiguous()
        elif k.endswith("mlp.w_down"):
            pre = "model." + k[: -len("w_down")] + "experts."
            for e in range(cfg.num_experts):
                out[f"{pre}{e}.down_proj.weight"] = v[e].t().contiguous()
        elif k == "lm_head.weight":
            out[k] = v.contiguous()
        else:
            out["model." + k] = v.contiguous()
    return out


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order into shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    return shards


def _write_weights(folder: Path, state: dict[str, torch.Tensor], max_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    shards = _shards(state, max_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]


def hf_tokenizer(text: TextTokenizer, vocab: SIDVocab):
    """A ``tokenizers.Tokenizer``: ``text`` plus the vocabulary's added tokens under their model ids.

    Args:
        text: the text tokenizer; its vocabulary (added tokens included) must fit in ``vocab.base_size``
            ids and must not already hold one of the vocabulary's token names.
        vocab: the model's vocabulary.
    """
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(text.tokenizer.to_str())
    have = tok.get_vocab(with_added_tokens=True)
    if len(have) > vocab.base_size or any(i >= vocab.base_size for i in have.values()):
        raise ValueError(f"text: the text tokenizer has {len(have)} tokens (ids up to {max(have.values(), default=-1)})"
                         f" but vocab.base_size is {vocab.base_size}")
    names = vocab.token_names()
    clash = [n for n in names if n in have]
    if clash:
        raise ValueError(f"text: the text tokenizer already has the vocabulary's tokens {clash[:5]}")
    fillers = [_FILLER.format(i) for i in range(len(have), vocab.base_size)]
    n_special = len(vocab.special_tokens)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fillers + names[:n_special]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in names[n_special:]])
    wrong = [(t, tok.token_to_id(t), vocab.base_size + i) for i, t in enumerate(names)
             if tok.token_to_id(t) != vocab.base_size + i]
    if wrong or tok.get_vocab_size(with_added_tokens=True) != vocab.size:
        raise ValueError(f"text: the exported tokenizer does not give the vocabulary's ids: {wrong[:3]}")
    return tok


def _unk_token(tok) -> str | None:
    model = json.loads(tok.to_str()).get("model", {})
    return model.get("unk_token") if isinstance(model.get("unk_token"), str) else None


def _write_tokenizer(folder: Path, tok, vocab: SIDVocab, max_len: int) -> list[str]:
    tok.save(str(folder / "tokenizer.json"))
    special = {f"{role}_token": name for role, name in (("bos", "<|bos|>"), ("eos", "<|eos|>"), ("pad", "<|pad|>"))
               if name in vocab.special_tokens}
    if _unk_token(tok) is not None:
        special["unk_token"] = _unk_token(tok)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
           "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _check_out_dir(out: Path) -> None:
    """``out`` may be new, an empty folder or an earlier export (a folder whose ``config.json`` has a Qwen3
    ``model_type``): any other folder is refused rather than replaced."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    try:
        model_type = json.loads((out / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type not in ("qwen3", "qwen3_moe"):
        raise ValueError(f"out_dir {out} is a non-empty folder that is not a Hugging Face Qwen3 checkpoint; "
                         "export_hf replaces its out_dir as a whole: choose a new or empty folder")


def export_hf(model: PlumLM, vocab: SIDVocab, text: TextTokenizer, out_dir: str | os.PathLike, *,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> dict:
    """Write ``model`` with its vocabulary as a Hugging Face Qwen3 / Qwen3-MoE checkpoint folder.

    Args:
        model: the :class:`PlumLM` (any device; all weights of one dtype: float32, bfloat16 or float16).
        vocab: its :class:`SIDVocab` (``vocab.size == model.config.vocab_size``).
        text: its text tokenizer (:class:`TextTokenizer`), whose ids are the first ``vocab.base_size``.
        out_dir: the folder to write: new, empty, or an earlier export, which is replaced as a whole,
            atomically (any other existing folder is refused).
        max_shard_size: the most bytes of tensors per safetensors file, an int or a string such as
            ``"5GB"`` / ``"500MiB"`` (a single larger tensor gets a file of its own).

    Returns:
        ``{"path": str, "model_type": str, "files": [names], "total_size": bytes}``.
    """
    if not isinstance(vocab, SIDVocab):
        raise ValueError(f"vocab must be a SIDVocab, got {type(vocab).__name__}")
    if not isinstance(text, TextTokenizer):
        raise ValueError(f"text must be a TextTokenizer, got {type(text).__name__}")
    max_bytes = parse_shard_size(max_shard_size)
    state = hf_state_dict(model)
    config = hf_config_dict(model.config, vocab, _model_dtype(model))
    tok = hf_tokenizer(text, vocab)
    out = Path(out_dir)
    _check_out_dir(out)
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        files = ["config.json"] + _write_weights(tmp, state, max_bytes)
        files += _write_tokenizer(tmp, tok, vocab, model.config.max_position_embeddings)
    return {"path": str(out), "model_type": config["model_type"], "files": files,
            "total_size": sum(v.numel() * v.element_size() for v in state.values())}
