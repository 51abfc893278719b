"""The settings an OUT of ``plum run`` was trained with, kept in ``OUT/plan.json``, and the checks
that refuse to resume it with others (instead of mixing them).

The model and the SASRec baseline are compared by their effective configs,
field by field, not by how the options spell them (``--preset medium-deep``
resumes an OUT of ``--preset medium --model-overrides '{"num_hidden_layers":
3}'``); the training settings by the effective values of every stage's
section (defaults with ``--train-overrides`` applied), so that a changed
default is caught too. The SIDs are checked by
:meth:`plumrec.pipeline.workspace.Workspace.sid`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from plumrec.baselines import SASRecConfig
from plumrec.model.config import preset as make_preset

__all__ = ["TRAIN_STAGES", "run_settings", "model_config", "sasrec_config", "effective_train_config",
           "check_run_settings"]

TRAIN_STAGES = ("cpt", "sft", "sasrec")  # the training sections of a run, in the order of --steps


def run_settings(args, cfg: dict | None = None) -> dict:
    """The options that shape the trained models (beyond the SIDs, which ``Workspace.sid`` checks):
    kept in OUT/plan.json, so a resumed run with other ones is refused instead of mixing them. With the
    run config ``cfg`` it also keeps the effective training settings (``train_config``: the
    defaults with ``--train-overrides`` applied), so that a changed default is caught too."""
    settings = {"preset": args.preset, "model_overrides": args.model_overrides,
                "train_overrides": args.train_overrides, "sasrec_overrides": args.sasrec_overrides,
                "sasrec_config": args.sasrec_config, "sid_init_scale": args.sid_init_scale}
    if cfg is not None:
        settings["model_config"] = args.model_config
        settings["train_config"] = effective_train_config(cfg)
    return settings


def model_config(preset: str, overrides: dict) -> dict:
    """The effective model config of ``--preset`` with ``--model-overrides``, as JSON, without
    ``vocab_size`` (set by the SIDs' vocabulary): ``medium`` with ``{"num_hidden_layers": 3}`` and
    ``medium-deep`` give the same one."""
    d = json.loads(json.dumps(make_preset(preset, **overrides).to_dict()))
    del d["vocab_size"]
    return d


def sasrec_config(overrides: dict) -> dict:
    """The effective config of the SASRec baseline with ``--sasrec-overrides``, as JSON, without
    ``num_items`` (the dataset's) and ``max_len`` (``sft.max_items``). ``TypeError`` / ``ValueError``
    (from :class:`plumrec.baselines.SASRecConfig`) for an invalid one."""
    d = dataclasses.asdict(SASRecConfig(num_items=1, **overrides))
    del d["num_items"], d["max_len"]
    return json.loads(json.dumps(d))


def effective_train_config(cfg: dict) -> dict:
    """``{stage: {key: value}}`` of the run config's training sections, as JSON (steps and progress
    aside: the plan's steps are checked on their own)."""
    return json.loads(json.dumps({k: {kk: v for kk, v in cfg[k].items() if kk not in ("steps", "progress")}
                                  for k in TRAIN_STAGES}))


# What an OUT trained with when its plan has no record of a setting: the value of that setting in runs whose
# plans did not record it (sid_init_scale: off).
SETTINGS_BEFORE_RECORDED = {"sid_init_scale": 0.0}
# Training settings whose default differs from the value that OUTs without a record of them trained with:
# sft.distill is 0 (with temperature 1) in an OUT whose train_config lacks it.
TRAIN_SETTINGS_BEFORE_RECORDED = {"sft": {"distill": 0.0, "distill_temperature": 1.0}}


def check_run_settings(out: Path, plan: dict, args, cfg: dict) -> None:
    """Refuse to resume OUT with model or training settings other than its own (``ValueError`` naming
    the setting and OUT's own value). The model is compared by its effective config, field by field, not
    by how the options spell it (``--preset medium-deep`` resumes an OUT of ``--preset medium
    --model-overrides '{"num_hidden_layers": 3}'``); a plan without ``model_config`` has it rebuilt from
    its preset and overrides. A plan with ``train_config`` compares the effective training settings key
    by key: a key it has no record of is not compared, unless :data:`TRAIN_SETTINGS_BEFORE_RECORDED`
    gives the value such a plan trained with (``sft.distill`` 0). A plan without ``train_config``
    compares the ``--train-overrides`` given; a plan without ``settings`` takes this run's."""
    saved = plan.get("settings")
    if saved is None:
        return
    effective = "train_config" in saved  # else: the overrides given are what OUT has on record
    now = run_settings(args, cfg if effective else None)
    was_model = saved.get("model_config") or _recorded_model_config(saved)
    if was_model is None:  # a preset that does not exist: compare the options as given
        names = ("preset", "model_overrides")
    else:
        names = ()
        _refuse_other_config(out, "the model", was_model, args.model_config, "--preset and --model-overrides",
                             f"--preset {saved['preset']} --model-overrides '{json.dumps(saved['model_overrides'])}'")
    # the SASRec baseline (and, with --collaborative-sids, the SIDs' item table), by its effective config;
    # a plan without sasrec_config trained the defaults
    _refuse_other_config(out, "the SASRec baseline", saved.get("sasrec_config") or sasrec_config({}),
                         args.sasrec_config, "--sasrec-overrides",
                         f"--sasrec-overrides '{json.dumps(saved.get('sasrec_overrides', {}))}'")
    for k in names + ("sid_init_scale",) + (() if effective else ("train_overrides",)):
        was = saved.get(k, SETTINGS_BEFORE_RECORDED.get(k))
        if was != now[k]:
            flag = "--" + k.replace("_", "-")
            raise ValueError(f"{out} was trained with {flag} {json.dumps(was)}, not {json.dumps(now[k])}; "
                             "use a new --out, or this OUT's own setting")
    for stage, section in saved.get("train_config", {}).items():
        section = {**TRAIN_SETTINGS_BEFORE_RECORDED.get(stage, {}), **section}
        for key, was in section.items():
            is_ = now["train_config"].get(stage, {}).get(key, was)
            if is_ != was:
                raise ValueError(
                    f"{out} was trained with {stage}.{key}={json.dumps(was)}, but this run's settings give "
                    f"{json.dumps(is_)} (from --train-overrides, or a default changed since): use a new "
                    f"--out, or --train-overrides '{{\"{stage}\": {{\"{key}\": {json.dumps(was)}}}}}'")


def _refuse_other_config(out: Path, what: str, was: dict, now: dict, flags: str, given: str) -> None:
    """``ValueError`` at the first field of OUT's effective config ``was`` (of ``what``) that this run's
    ``now`` (set by ``flags``) gives otherwise, naming the field and OUT's own options ``given``. A field
    ``now`` lacks (one the config no longer has) is not compared."""
    for key, v in was.items():
        if now.get(key, v) != v:
            raise ValueError(f"{out} was trained with {what}'s {key}={json.dumps(v)} ({given}), but this run's "
                             f"{flags} give {json.dumps(now[key])}: use a new --out, or {given}")


def _recorded_model_config(saved: dict) -> dict | None:
    """The effective model config of the preset and overrides a plan has on record (``None`` when that
    preset does not exist or its overrides do not make a valid config)."""
    try:
        return model_config(saved["preset"], saved.get("model_overrides") or {})
    except (KeyError, TypeError, ValueError):
        return None
