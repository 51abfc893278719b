"""Load a local Hugging Face Qwen3 / Qwen3-MoE checkpoint into :class:`PlumLM`.

A checkpoint directory holds ``config.json``, the weights as
``model.safetensors`` or shards listed in ``model.safetensors.index.json``,
and usually ``tokenizer.json``. Nothing is downloaded.

Weight mapping (``model.`` prefix dropped, ``lm_head.weight`` kept):

- attention, norms, dense FFNs and the router (``mlp.gate.weight``): same
  names and layouts;
- experts, either per expert (``mlp.experts.{e}.gate_proj.weight [f, d]``,
  ``up_proj [f, d]``, ``down_proj [d, f]``: the layout of released checkpoints
  and of ``save_pretrained``) or fused (``mlp.experts.gate_up_proj
  [E, 2f, d]``, ``mlp.experts.down_proj [E, d, f]``: transformers 5 in
  memory), become ``mlp.w_gate_up [E, d, 2f]`` (gate then up) and
  ``mlp.w_down [E, f, d]``.

``plum_hidden_dropout`` and ``plum_router_z_loss_coef``, written by
:func:`plumrec.model.hf_export.export_hf`, restore those training-only
settings. Only what the model implements is accepted: ``model_type`` ``qwen3`` or
``qwen3_moe``, default RoPE, no attention bias, no sliding window. Anything
else, or a missing/unexpected tensor, raises a ``ValueError`` naming it; so does
a damaged file (truncated, not JSON, not safetensors), naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from plumrec.io import MissingFileError, read_json, read_tensors, require_file
from plumrec.model.config import ModelConfig
from plumrec.model.model import PlumLM
from plumrec.model.vocab import TextTokenizer

__all__ = ["load_hf_config", "load_hf_model", "load_tokenizer", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")


def _read_json(path: Path) -> dict:
    raw = read_json(require_file(path, "a Hugging Face checkpoint directory needs it"))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def load_hf_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """``config.json`` of a Qwen3 / Qwen3-MoE checkpoint -> :class:`ModelConfig`."""
    path = Path(path)
    hf = _read_json(path / "config.json")
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"checkpoint {path} has model_type {mt!r} (architectures {hf.get('architectures')}); "
                         f"plum loads only {SUPPORTED_MODEL_TYPES}")
    if hf.get("attention_bias", False):
        raise ValueError(f"checkpoint {path} has attention_bias=true, which the PLUM model does not implement")
    if hf.get("use_sliding_window", False):
        raise ValueError(f"checkpoint {path} uses sliding-window attention, which the PLUM model does not implement")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"checkpoint {path} has hidden_act {hf.get('hidden_act')!r}; only 'silu' is supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{path / 'config.json'}: rope_parameters / rope_scaling must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"checkpoint {path} uses RoPE scaling {rope_type!r}; only default RoPE is supported")
    try:
        return _config_fields(hf, rope, mt == "qwen3_moe", overrides)
    except KeyError as e:
        raise ValueError(f"{path / 'config.json'} lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        given = f" with the overrides {sorted(overrides)}" if overrides else ""
        raise ValueError(f"{path / 'config.json'}{given}: {e}") from None


def _config_fields(hf: dict, rope: dict, moe: bool, overrides: dict) -> ModelConfig:
    theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    experts = int(hf.get("num_experts", hf.get("num_local_experts", 0))) if moe else 0
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        intermediate_size=hf.get("intermediate_size", 0), rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        num_experts=experts, initializer_range=float(hf.get("initializer_range", 0.02)),
    )
    for name in ("hidden_dropout", "router_z_loss_coef"):  # training-only settings of plumrec.model.hf_export
        if f"plum_{name}" in hf:
            fields[name] = float(hf[f"plum_{name}"])
    if moe:
        fields.update(moe_intermediate_size=hf["moe_intermediate_size"],
                      num_experts_per_tok=hf["num_experts_per_tok"],
                      norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                      decoder_sparse_step=hf.get("decoder_sparse_step", 1),
                      mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
                      router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    fields.update(overrides)
    return ModelConfig(**fields)


def _open_weights(path: Path) -> dict[str, torch.Tensor]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return read_tensors(single)
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and Path(v).name == v
                                                       for v in weight_map.values()):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard files in {path}")
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            out.update(read_tensors(require_file(path / shard, f"{index} lists it")))
        return out
    raise MissingFileError(f"{path} has neither model.safetensors nor model.safetensors.index.json")


def _map_state_dict(raw: dict[str, torch.Tensor], cfg: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    raw = dict(raw)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        try:
            return raw.pop(name)
        except KeyError:
            raise ValueError(f"checkpoint {path} lacks tensor {name!r}") from None

    for k in [k for k in raw if k.startswith("model.") and ".mlp.experts." not in k]:
        out[k[len("model."):]] = raw.pop(k)
    if "lm_head.weight" in raw:
        head = raw.pop("lm_head.weight")
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = head
    for i in range(cfg.num_hidden_layers):
        if not cfg.is_moe_layer(i):
            continue
        pre = f"model.layers.{i}.mlp.experts."
        if pre + "gate_up_proj" in raw:
            out[f"layers.{i}.mlp.w_gate_up"] = take(pre + "gate_up_proj").transpose(1, 2).contiguous()
            out[f"layers.{i}.mlp.w_down"] = take(pre + "down_proj").transpose(1, 2).contiguous()
        else:
            gate = [take(f"{pre}{e}.gate_proj.weight") for e in range(cfg.num_experts)]
            up = [take(f"{pre}{e}.up_proj.weight") for e in range(cfg.num_experts)]
            down = [take(f"{pre}{e}.down_proj.weight") for e in range(cfg.num_experts)]
            out[f"layers.{i}.mlp.w_gate_up"] = torch.cat([torch.stack(gate), torch.stack(up)], 1).transpose(1, 2
                                                                                                       ).contiguous()
            out[f"layers.{i}.mlp.w_down"] = torch.stack(down).transpose(1, 2).contiguous()
    if raw:
        raise ValueError(f"checkpoint {path} has tensors the model does not know: {sorted(raw)[:8]}")
    return out


def load_hf_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu",
                  **config_overrides) -> PlumLM:
    """Build a :class:`PlumLM` from a local Qwen3 / Qwen3-MoE checkpoint directory.

    ``config_overrides`` replace config fields that do not change the weights'
    shapes (e.g. ``kernel_impl``, ``router_aux_loss_coef``)."""
    path = Path(path)
    cfg = load_hf_config(path, **config_overrides)
    state = _map_state_dict(_open_weights(path), cfg, path)
    with torch.device("meta"):
        model = PlumLM(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match its config.json: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"checkpoint {path}: tensor {k} has shape {tuple(state[k].shape)}, expected {shape}")
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return model.to(dtype)


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """The checkpoint's ``tokenizer.json`` through the ``tokenizers`` library."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    require_file(file, "the checkpoint needs a tokenizer.json (tokenizers format)")
    return TextTokenizer.load(str(file))
