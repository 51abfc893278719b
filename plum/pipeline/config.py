"""The run configuration of the pipeline: :data:`DEFAULTS` updated by a JSON or TOML file and by overrides.

Sections ``data``, ``sid``, ``model``, ``cpt``, ``sft``, ``sasrec``, ``eval``;
every key has a default. ``sft.epochs`` (0: off) is read by ``plum run``'s plan (SFT's steps from
epochs of its examples); ``sft.eval_every`` / ``sft.patience`` (TrainConfig fields, 0: off) score the
model on at most ``sft.eval_users`` validation users during SFT and keep the best (``sft.eval_epochs``, read
by the plan, sets ``eval_every`` from epochs)
(:func:`plumrec.pipeline.stages.run_sft`). The training sections also take any
:class:`~plumrec.train.TrainConfig` field (``grad_accum``, ``fsdp``, ``bf16``,
...) and ``sid`` any :class:`~plumrec.sid.SIDConfig` field but ``seed`` (the
run's ``seed`` is the tokenizer's): ``cooccurrence_weight``, ``mask_prob``, ...
An unknown key is an error that names it.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from plumrec.io import read_json, read_toml, require_file
from plumrec.sid.tokenizer import SIDConfig
from plumrec.train.config import TrainConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

__all__ = ["DEFAULTS", "SFT_OBJECTIVES", "SFT_LOSSES", "load_run_config", "read_config_file", "train_config"]

# The defaults are `plum demo`'s: about 3.5 min wall on an idle 2-core CPU, 5-7 min on a shared one
# (torch CPU, 1 thread). 80 CPT steps give plum Recall@10 0.385 against 0.358 at 40 (sft_only 0.275,
# popularity 0.141) for 25 s more; SFT's "sequence" objective with the "codebook" loss gives 0.404
# (sft_only 0.400) against "next_item" with "vocab" at the same steps.
DEFAULTS: dict = {
    "workdir": "runs/plum",
    "seed": 0,
    "data": {"synthetic": {}, "path": None, "embeddings": None},
    "sid": {"codebook_sizes": [64, 32, 16], "epochs": 30, "warmup_epochs": 5, "hidden_dims": [128, 64],
            "latent_dim": 16, "batch_size": 256},
    "model": {"preset": "tiny", "hf_checkpoint": None, "overrides": {}, "sid_init_scale": 0.0},
    "cpt": {"steps": 80, "lr": 3e-3, "warmup_steps": 10, "max_tokens": 4096, "behaviour_fraction": 0.5,
            "max_items": 20},
    "sft": {"steps": 60, "lr": 3e-3, "warmup_steps": 5, "max_tokens": 4096, "max_items": 20, "init": "cpt",
            "objective": "sequence", "loss": "codebook", "label_smoothing": 0.0,
            "level_weights": None, "item_loss": 0.0, "distill": 0.0, "distill_temperature": 1.0, "epochs": 0,
            "eval_epochs": 0.0, "eval_users": 1000},
    "sasrec": {"steps": 150, "lr": 1e-3, "max_tokens": 2048},
    "eval": {"beam_width": 10, "batch_size": 100, "ks": [5, 10], "split": "test", "exclude_history": False},
}
# keys of the training sections that the stages read (data and loss settings), not TrainConfig fields
_LOADER_KEYS = {"behaviour_fraction", "max_items", "init", "objective", "loss", "label_smoothing", "level_weights",
                "item_loss", "distill", "distill_temperature", "epochs", "eval_epochs", "eval_users"}
SFT_OBJECTIVES = ("next_item", "sequence")
SFT_LOSSES = ("vocab", "codebook")
_TRAIN_SECTIONS = ("cpt.", "sft.", "sasrec.")  # also take every TrainConfig field (grad_accum, fsdp, bf16, ...)


def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = dict(base)
    allowed = set(base)
    if where in _TRAIN_SECTIONS:
        allowed |= {f.name for f in dataclasses.fields(TrainConfig)}
    elif where == "sid.":
        allowed |= {f.name for f in dataclasses.fields(SIDConfig)} - {"seed"}
    for k, v in over.items():
        if k not in allowed:
            raise ValueError(f"unknown config key {where + k!r}; known: {sorted(allowed)}")
        if k not in base:
            out[k] = v
            continue
        out[k] = _merge(base[k], v, f"{where}{k}.") if isinstance(base[k], dict) and isinstance(v, dict) and \
            k not in ("synthetic", "overrides") else v
    return out


def read_config_file(path: str | os.PathLike) -> dict:
    """The dict of a ``.json`` or ``.toml`` file (TOML needs Python >= 3.11: ``tomllib``); a file that
    does not parse, or holds no table, is a ``ValueError`` naming it (and the line)."""
    p = Path(path)
    if p.suffix not in (".json", ".toml"):
        raise ValueError(f"config file must end in .json or .toml, got {p.name}")
    if p.suffix == ".toml" and tomllib is None:
        raise ValueError("TOML configs need Python >= 3.11 (tomllib); use a .json config")
    d = read_toml(require_file(p, "the run configuration")) if p.suffix == ".toml" else \
        read_json(require_file(p, "the run configuration"))
    if not isinstance(d, dict):
        raise ValueError(f"{p}: a run configuration must be a JSON object, got {type(d).__name__}")
    return d


def load_run_config(path: str | os.PathLike | None = None, **overrides) -> dict:
    """Defaults updated by a JSON (``.json``) or TOML (``.toml``) file, then by ``overrides``."""
    cfg = DEFAULTS
    if path is not None:
        cfg = _merge(cfg, read_config_file(path))
    return _merge(cfg, overrides)


def train_config(section: dict, seed: int, progress: bool) -> TrainConfig:
    """The :class:`TrainConfig` of a training section (its TrainConfig fields; ``seed`` and
    ``progress`` unless the section sets them)."""
    fields = {k: v for k, v in section.items() if k not in _LOADER_KEYS}
    fields.setdefault("seed", seed)
    fields.setdefault("progress", progress)
    return TrainConfig.from_dict(fields)
