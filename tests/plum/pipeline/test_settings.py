"""The settings that shape a run's trained models, kept in its plan, and the refusal to resume an OUT with
other ones (end to end through the bench: tests/benchmarks/test_bench_retrieval.py)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from plumrec.pipeline.settings import (
    TRAIN_STAGES,
    check_run_settings,
    effective_train_config,
    model_config,
    run_settings,
    sasrec_config,
)

OUT = Path("/runs/o")
CFG = {"cpt": {"lr": 1e-3, "steps": 5, "progress": False}, "sft": {"lr": 2e-3, "distill": 0.0},
       "sasrec": {"lr": 1e-3}, "sid": {"epochs": 3}}


def _args(**kw):
    base = dict(preset="tiny", model_overrides={}, train_overrides={}, sasrec_overrides={},
                sasrec_config=sasrec_config({}), sid_init_scale=0.0)
    base.update(kw)
    return SimpleNamespace(**base, model_config=model_config(base["preset"], base["model_overrides"]))


def test_effective_configs_are_json_without_the_dataset_sizes():
    assert model_config("medium", {"num_hidden_layers": 3}) == model_config("medium-deep", {})
    assert "vocab_size" not in model_config("tiny", {}) and model_config("tiny", {})["mlp_only_layers"] == [0]
    sas = sasrec_config({"hidden_size": 12})
    assert sas["hidden_size"] == 12 and "num_items" not in sas and "max_len" not in sas
    with pytest.raises(TypeError):
        sasrec_config({"hidden": 12})
    assert effective_train_config(CFG) == {"cpt": {"lr": 1e-3}, "sft": {"lr": 2e-3, "distill": 0.0},
                                           "sasrec": {"lr": 1e-3}}
    assert TRAIN_STAGES == ("cpt", "sft", "sasrec")


def test_run_settings_record_the_effective_training_only_with_a_config():
    args = _args(sid_init_scale=0.5)
    assert set(run_settings(args)) == {"preset", "model_overrides", "train_overrides", "sasrec_overrides",
                                       "sasrec_config", "sid_init_scale"}
    full = run_settings(args, CFG)
    assert full["model_config"] == args.model_config and full["train_config"] == effective_train_config(CFG)


def test_a_resume_with_the_same_settings_passes_and_other_ones_are_refused():
    plan = {"settings": run_settings(_args(), CFG)}
    check_run_settings(OUT, plan, _args(), CFG)
    check_run_settings(OUT, {}, _args(preset="small"), CFG)  # no record: nothing to compare
    with pytest.raises(ValueError, match=r"/runs/o was trained with --sid-init-scale 0.0, not 0.5"):
        check_run_settings(OUT, plan, _args(sid_init_scale=0.5), CFG)
    with pytest.raises(ValueError, match=r"the model's hidden_size=128 \(--preset tiny --model-overrides '\{\}'\)"):
        check_run_settings(OUT, plan, _args(preset="small"), CFG)
    check_run_settings(OUT, plan, _args(preset="tiny", model_overrides={"hidden_dropout": 0.0}), CFG)
    with pytest.raises(ValueError, match=r"the SASRec baseline's hidden_size=64"):
        check_run_settings(OUT, plan, _args(sasrec_config=sasrec_config({"hidden_size": 32})), CFG)
    other = {**CFG, "sft": {"lr": 5e-3, "distill": 0.0}}
    with pytest.raises(ValueError, match=r"was trained with sft.lr=0.002, but this run's settings give 0.005"):
        check_run_settings(OUT, plan, _args(), other)


def test_a_plan_without_a_record_of_distill_trained_without_it():
    plan = {"settings": run_settings(_args(), CFG)}
    del plan["settings"]["train_config"]["sft"]["distill"]
    check_run_settings(OUT, plan, _args(), CFG)
    with pytest.raises(ValueError, match=r"sft.distill=0.0, but this run's settings give 0.5"):
        check_run_settings(OUT, plan, _args(), {**CFG, "sft": {"lr": 2e-3, "distill": 0.5}})
