"""The options of ``plum run`` (and ``benchmarks/bench_retrieval.py``): :func:`add_run_arguments`
declares them, :func:`check_run_arguments` checks them (``parser.error`` naming the option) and
resolves the defaults of ``--config`` (:mod:`plumrec.pipeline.defaults`)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from plumrec.baselines import SASRecConfig
from plumrec.model.config import PRESETS, ModelConfig
from plumrec.pipeline.config import DEFAULTS
from plumrec.pipeline.defaults import PACKAGED, load_defaults
from plumrec.pipeline.recipe import AUTO, LARGE_LOG_PRESET, SMALL_LOG_PRESET
from plumrec.pipeline.settings import TRAIN_STAGES, model_config, sasrec_config
from plumrec.sid.tokenizer import SIDConfig
from plumrec.train.config import TrainConfig
from plumrec.train.losses import check_distill, check_distill_temperature, check_item_loss, check_label_smoothing

__all__ = ["MIN_BEAM_WIDTH", "add_run_arguments", "check_run_arguments", "parse_run_args", "json_fields_arg",
           "embedding_files_arg", "check_item_embeddings"]

AUTO_PRESETS = (SMALL_LOG_PRESET, LARGE_LOG_PRESET)  # the presets --preset auto picks from
MIN_BEAM_WIDTH = 20  # TIGER's beam width: the published numbers are at this width
ATTRIBUTES_GLOB = "*_item2attributes.json"  # S3-Rec's item attributes beside the interactions
TRAIN_RESERVED = {"steps": "--steps or --budget-minutes", "seed": "--seed", "progress": "--no-progress",
                  "epochs": "--sft-epochs", "eval_epochs": "--sft-eval-epochs"}


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Declare the options of ``plum run`` on ``p``."""
    p.add_argument("--dataset", required=True, help="dataset directory (plumrec.data.load_dataset)")
    p.add_argument("--out", required=True, help="output / work directory (re-use it to resume)")
    p.add_argument("--config", default=PACKAGED,
                   help="the defaults: a packaged config (%(default)s: Amazon, chosen on Beauty) or a .toml file "
                        "of the same layout (plumrec.pipeline.defaults)")
    p.add_argument("--budget-minutes", type=float, default=30.0, help="total training time: CPT+SFT+SASRec")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", default=None, help="CPT,SFT,SASREC steps: pin them instead of calibrating")
    p.add_argument("--sft-epochs", type=float, default=None,
                   help="SFT's length in epochs of its examples: ceil(E * examples / examples per step) steps "
                        "(plumrec.train.steps_for_epochs), in place of the SFT steps of the budget or --steps "
                        "(default: the config's sft.epochs, unless --steps pins the steps; 0: off)")
    p.add_argument("--sft-eval-every", type=int, default=None,
                   help="score SFT's model on the validation users (recall@10, at most sft.eval_users of them) "
                        "every N steps and keep the best one (default: the config's sft.eval_every; 0: off); "
                        "replaces the config's sft.eval_epochs")
    p.add_argument("--sft-eval-epochs", type=float, default=None,
                   help="as --sft-eval-every, every E epochs of SFT's examples (steps from "
                        "plumrec.train.steps_for_epochs, so the same on any catalogue size; default: the config's "
                        "sft.eval_epochs; 0: off)")
    p.add_argument("--sft-patience", type=int, default=None,
                   help="stop SFT after N evaluations without a new best (needs --sft-eval-epochs or "
                        "--sft-eval-every; default: the config's sft.patience; 0: never early)")
    _add_model_arguments(p)
    _add_input_arguments(p)
    p.add_argument("--beam-width", type=int, default=MIN_BEAM_WIDTH,
                   help=f"beam width of the constrained search (>= {MIN_BEAM_WIDTH})")
    p.add_argument("--eval-batch-size", type=int, default=256, help="users per beam search")
    p.add_argument("--split", choices=("test", "valid"), default="test",
                   help="users to score: test (target s[-1]) or valid (target s[-2], for model selection)")
    p.add_argument("--exclude-history", action="store_true",
                   help="drop each user's history items from every ranking (RecBole's full-sort protocol); the "
                        "table's protocol, and the one SFT's validation selection scores")
    p.add_argument("--one-protocol", action="store_true",
                   help="score only the table's protocol (by default our rows are also scored under the other: "
                        "every item ranked, or history items excluded)")
    p.add_argument("--max-users", type=int, default=None, help="evaluate only the first N users (smoke)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--sft-only", action="store_true",
                   help="also run PLUM's ablation: the same SFT from a fresh model (no CPT), row sft_only")
    p.add_argument("--no-progress", action="store_true")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None,
                   help="model preset (plumrec.model.config.PRESETS), or auto: from the training log's size "
                        "(plumrec.pipeline.recipe; default: the config's model.preset)")
    p.add_argument("--model-overrides", default="{}",
                   help="JSON of ModelConfig fields replacing the preset's, e.g. '{\"num_hidden_layers\": 4}' "
                        "or '{\"hidden_dropout\": 0.2}'")
    p.add_argument("--sid-init-scale", type=float, default=None,
                   help="add the SID tokenizer's codewords, randomly projected, to the SID token embeddings "
                        "at initialisation, rows of this mean norm (plumrec.model.init_sid_embeddings; default: "
                        "the config's model.sid_init_scale, 0: off)")
    p.add_argument("--train-overrides", default="{}",
                   help="JSON of training settings replacing the config's, per stage, e.g. "
                        "'{\"sft\": {\"lr\": 1e-3}}' (stages cpt, sft, sasrec; TrainConfig fields and the "
                        "stage's data settings; steps and seed have their own flags)")
    p.add_argument("--sasrec-overrides", default="{}",
                   help="JSON of SASRecConfig fields replacing the SASRec baseline's (hidden 64, 2 layers, 1 head, "
                        "dropout 0.1), e.g. '{\"hidden_size\": 128}'; with --collaborative-sids its item table "
                        "feeds the SIDs too (max_len is --train-overrides sft.max_items)")


def _add_input_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codebook-sizes", default=None,
                   help="SID codebook sizes, coarse to fine, comma-separated, or auto: from the catalogue's size "
                        "(plumrec.pipeline.recipe; default: the config's sid.codebook_sizes)")
    p.add_argument("--sid-epochs", type=int, default=None, help="SID tokenizer epochs (default: the config's)")
    p.add_argument("--sid-overrides", default="{}",
                   help="JSON of SIDConfig fields replacing the config's, e.g. "
                        "'{\"cooccurrence_weight\": 1.0}' (codebook sizes and epochs have their own flags)")
    p.add_argument("--extra-embeddings", default="",
                   help="comma-separated .npy files of further [num_items, d] item embeddings (image, metadata, "
                        "collaborative, ...) fused with the text embedding by the SID tokenizer")
    p.add_argument("--item-attributes", default=None,
                   help="item attributes (S3-Rec's *_item2attributes.json: brand, sub-categories) fused into the "
                        "SIDs as one more input, multi-hot (plumrec.data.load_item_attributes): 'none', 'auto' "
                        "(the dataset folder's file) or a path (default: the config's run.item_attributes)")
    p.add_argument("--collaborative-sids", action=argparse.BooleanOptionalAction, default=None,
                   help="fuse the SASRec baseline's item table (trained first, on the training sequences only) "
                        "into the SIDs as one more SIDv2 input (default: the config's run.collaborative_sids)")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default ~/.cache/plum/embeddings)")
    p.add_argument("--model-dir", default=None, help="sentence-transformers directory (default all-MiniLM-L6-v2)")


def parse_run_args(argv=None, *, prog: str | None = None, description: str | None = None) -> argparse.Namespace:
    """The checked options of ``argv`` (see :func:`check_run_arguments`)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_run_arguments(p)
    return check_run_arguments(p, p.parse_args(argv))


def check_run_arguments(p: argparse.ArgumentParser, a: argparse.Namespace) -> argparse.Namespace:
    """Check the options (``p.error`` naming the option), fill in the defaults of ``--config``
    (``a.defaults``: :func:`~plumrec.pipeline.defaults.load_defaults`) and parse the JSON and list
    options into Python values (``a.model_config`` and ``a.sasrec_config``: the effective configs)."""
    try:
        a.defaults = load_defaults(a.config)
    except ValueError as e:
        p.error(f"--config: {e}")
    d = a.defaults
    a.preset = d["model"]["preset"] if a.preset is None else a.preset
    a.sid_init_scale = float(d["model"]["sid_init_scale"]) if a.sid_init_scale is None else a.sid_init_scale
    a.sid_epochs = int(d["sid"]["epochs"]) if a.sid_epochs is None else a.sid_epochs
    a.collaborative_sids = bool(d["run"]["collaborative_sids"]) if a.collaborative_sids is None \
        else a.collaborative_sids
    if a.beam_width < MIN_BEAM_WIDTH:
        p.error(f"--beam-width must be >= {MIN_BEAM_WIDTH} (TIGER's setting), got {a.beam_width}")
    if not a.budget_minutes > 0:
        p.error(f"--budget-minutes must be > 0, got {a.budget_minutes}")
    if not (math.isfinite(a.sid_init_scale) and a.sid_init_scale >= 0):
        p.error(f"--sid-init-scale must be a finite number >= 0 (0: off), got {a.sid_init_scale}")
    if a.max_users is not None and a.max_users < 1:
        p.error(f"--max-users must be >= 1, got {a.max_users}")
    _check_model_arguments(p, a)
    a.sid_overrides = json_fields_arg(p, "--sid-overrides", a.sid_overrides, SIDConfig,
                                      {"codebook_sizes": "--codebook-sizes", "epochs": "--sid-epochs",
                                       "seed": "--seed"})
    a.train_overrides = train_overrides_arg(p, _sft_selection_args(p, a), d, a.sft_eval_epochs)
    a.sasrec_overrides = json_fields_arg(p, "--sasrec-overrides", a.sasrec_overrides, SASRecConfig,
                                         {"num_items": "the dataset (its item count)",
                                          "max_len": "--train-overrides '{\"sft\": {\"max_items\": N}}'"})
    try:
        a.sasrec_config = sasrec_config(a.sasrec_overrides)  # the effective one, without num_items and max_len
    except (TypeError, ValueError) as e:
        p.error(f"--sasrec-overrides must give a valid SASRecConfig: {e}")
    a.extra_embeddings = embedding_files_arg(p, "--extra-embeddings", a.extra_embeddings)
    a.item_attributes = item_attributes_arg(p, a.dataset, a.item_attributes or d["run"]["item_attributes"])
    a.codebook_sizes = _int_list_arg(p, "--codebook-sizes", a.codebook_sizes, d["sid"]["codebook_sizes"])
    if a.steps is not None:
        try:
            steps = [int(s) for s in a.steps.split(",")]
        except ValueError:
            steps = []
        if len(steps) != 3 or min(steps) < 1:
            p.error(f"--steps must be three positive integers CPT,SFT,SASREC, got {a.steps!r}")
        a.steps = dict(zip(TRAIN_STAGES, steps))
    return a


def _sft_selection_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> dict:
    """``--train-overrides`` as a dict, with ``--sft-eval-every`` and ``--sft-patience`` as its ``sft``
    ``eval_every`` and ``patience`` (given twice: ``p.error``); sets ``a.sft_epochs`` and ``a.sft_eval_epochs``
    (the config's ``sft.epochs`` and ``sft.eval_epochs`` when not given). An explicit length or period replaces
    the config's: ``--steps`` its ``sft.epochs``, an evaluation period in steps (``--sft-eval-every`` or
    ``--train-overrides``) its ``sft.eval_epochs``; without evaluations the config's ``sft.patience`` is 0."""
    obj = json_fields_arg(p, "--train-overrides", a.train_overrides)
    for flag, key, value in (("--sft-eval-every", "eval_every", a.sft_eval_every),
                             ("--sft-patience", "patience", a.sft_patience)):
        if value is None:
            continue
        if value < 0:
            p.error(f"{flag} must be >= 0 (0: off), got {value}")
        if isinstance(obj.get("sft"), dict) and key in obj["sft"]:
            p.error(f"{flag} and --train-overrides sft.{key} both set it: give one")
        obj["sft"] = {**obj.get("sft", {}), key: value}
    sft = obj.get("sft") if isinstance(obj.get("sft"), dict) else {}
    if "eval_every" in sft and a.sft_eval_epochs:
        p.error("--sft-eval-epochs must not be given with an evaluation period in steps (--sft-eval-every or "
                "--train-overrides sft.eval_every): give one")
    if a.sft_eval_epochs is None:
        a.sft_eval_epochs = 0.0 if "eval_every" in sft else float(a.defaults["sft"].get("eval_epochs", 0))
    if not (a.sft_eval_epochs or sft.get("eval_every", a.defaults["sft"].get("eval_every", 0))):
        if sft.get("patience"):
            p.error(f"--sft-patience {sft['patience']} must come with evaluations to count: --sft-eval-epochs or "
                    "--sft-eval-every > 0")
        obj["sft"] = {**sft, "patience": 0}  # the config's patience counts evaluations: none, so it does not apply
    if a.sft_epochs is None:  # pinned --steps keep their SFT steps; --sft-epochs replaces them
        a.sft_epochs = 0.0 if a.steps is not None else float(a.defaults["sft"].get("epochs", 0))
    for flag, value in (("--sft-epochs", a.sft_epochs), ("--sft-eval-epochs", a.sft_eval_epochs)):
        if not (math.isfinite(value) and value >= 0):
            p.error(f"{flag} must be a finite number >= 0 (0: off), got {value}")
    return obj


def _check_model_arguments(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """``--preset`` and ``--model-overrides``; sets ``a.model_config``, the effective config (None for ``auto``
    until :func:`plumrec.pipeline.recipe.resolve_auto` picks the preset; the overrides must suit every pick)."""
    if a.preset not in PRESETS and a.preset != AUTO:
        p.error(f"--preset must be one of {sorted(PRESETS)} or {AUTO}, got {a.preset!r}")
    a.model_overrides = json_fields_arg(p, "--model-overrides", a.model_overrides, ModelConfig)
    if "vocab_size" in a.model_overrides:
        p.error("--model-overrides must not set 'vocab_size': the SIDs' vocabulary sets it")
    for preset in AUTO_PRESETS if a.preset == AUTO else (a.preset,):
        try:
            a.model_config = model_config(preset, a.model_overrides)  # the effective one, without vocab_size
        except (TypeError, ValueError) as e:
            p.error(f"--model-overrides must give a valid ModelConfig with --preset {preset}: {e}")
    if a.preset == AUTO:
        a.model_config = None


def _int_list_arg(parser, flag: str, text: str | None, default: list[int]) -> list[int]:
    """The comma-separated integers of ``flag`` (``default`` when not given), or ``"auto"``."""
    if text is None:
        return AUTO if default == AUTO else [int(v) for v in default]
    if text == AUTO:
        return AUTO
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        parser.error(f"{flag} must be comma-separated integers, got {text!r}")


def json_fields_arg(parser, flag: str, text: str, cls=None, reserved: dict | None = None) -> dict:
    """Parse the command-line option ``flag`` as a JSON object (``parser.error`` otherwise); with a
    dataclass ``cls`` its keys must be ``cls``'s fields, and keys of ``reserved`` (field -> the flag
    that sets it) must be set with that flag instead."""
    try:
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError
    except ValueError:
        parser.error(f"{flag} must be a JSON object, got {text!r}")
    if cls is not None:
        reserved = reserved or {}
        fields = {f.name for f in dataclasses.fields(cls)} - set(reserved)
        for k in obj:
            if k in reserved:
                parser.error(f"{flag}: {k!r} must be set with {reserved[k]}")
            if k not in fields:
                parser.error(f"{flag}: {k!r} is not a {cls.__name__} field; it must be one of {sorted(fields)}")
    return obj


def embedding_files_arg(parser, flag: str, text: str) -> list[str]:
    """The comma-separated ``.npy`` paths of the option ``flag``, resolved; each must exist
    (``parser.error`` otherwise)."""
    files = [str(Path(f).resolve()) for f in text.split(",") if f]
    for f in files:
        if not Path(f).is_file():
            parser.error(f"{flag}: {f} must be an existing .npy file")
    return files


def check_item_embeddings(flag: str, path: str, e, num_items: int) -> None:
    """``ValueError`` naming ``flag`` unless ``e`` (loaded from ``path``) is a finite ``[num_items, d]`` array."""
    if e.ndim != 2 or len(e) != num_items or not np.isfinite(e).all():
        raise ValueError(f"{flag}: {path} must be a finite [num_items={num_items}, d] array, got shape {e.shape}")


def item_attributes_arg(parser, dataset: str, value: str) -> str | None:
    """``--item-attributes``: the attribute JSON to use, resolved, or ``None`` (``none``). ``auto`` is
    the one ``*_item2attributes.json`` of the dataset folder (of the dataset file's folder), ``None``
    when it has none; two are ambiguous (``parser.error``), as is a path that does not exist."""
    if value == "none":
        return None
    if value != "auto":
        if not Path(value).is_file():
            parser.error(f"--item-attributes must be auto, none or an existing JSON file, got {value!r}")
        return str(Path(value).resolve())
    folder = Path(dataset) if Path(dataset).is_dir() else Path(dataset).parent
    found = sorted(folder.glob(ATTRIBUTES_GLOB))
    if len(found) > 1:
        parser.error(f"--item-attributes auto must find at most one {ATTRIBUTES_GLOB} in {folder}, found "
                     f"{[f.name for f in found]}: pass one, or none")
    return str(found[0].resolve()) if found else None


def train_overrides_arg(parser, obj: dict, defaults: dict, sft_eval_epochs: float = 0.0) -> dict:
    """Check ``--train-overrides``: ``{stage: {key: value}}`` with the training stages, keys that are
    ``TrainConfig`` fields or the stage's own data settings (``max_items``, ...), and values that make
    a valid ``TrainConfig`` with the stage's ``defaults`` (``parser.error`` naming the stage and key
    otherwise). ``sft_eval_epochs`` > 0 stands for an SFT ``eval_every`` that the plan sets."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for stage, over in obj.items():
        if stage not in TRAIN_STAGES:
            parser.error(f"--train-overrides: the stage {stage!r} must be one of {sorted(TRAIN_STAGES)}")
        if not isinstance(over, dict):
            parser.error(f"--train-overrides: {stage} must map to a JSON object, got {over!r}")
        allowed = (fields | set(DEFAULTS[stage]) | set(defaults[stage])) - set(TRAIN_RESERVED)
        for k in over:
            if k in TRAIN_RESERVED:
                parser.error(f"--train-overrides: {stage}.{k} must be set with {TRAIN_RESERVED[k]}")
            if k not in allowed:
                parser.error(f"--train-overrides: {stage}.{k} must be one of {sorted(allowed)}")
        try:  # the loss's own checks, before any training
            check_label_smoothing(over.get("label_smoothing", 0.0))
            check_item_loss(over.get("item_loss", 0.0))
            check_distill(over.get("distill", 0.0))
            check_distill_temperature(over.get("distill_temperature", 1.0))
        except ValueError as e:
            parser.error(f"--train-overrides: {stage}.{e}")
        merged = {k: v for k, v in {**defaults[stage], **over}.items() if k in fields}
        if stage == "sft" and sft_eval_epochs and not merged.get("eval_every"):
            merged["eval_every"] = 1  # a stand-in for the plan's period, from the epochs
        try:
            TrainConfig.from_dict(merged)
        except (TypeError, ValueError) as e:
            parser.error(f"--train-overrides: {stage} must give a valid TrainConfig: {e}")
    return {stage: over for stage, over in obj.items() if over}  # {"sft": {}} is no override
