"""The options of ``plum run`` (and ``bench_retrieval.py``): their checks, each error naming the option, and the
values they parse into."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from plumrec.pipeline.defaults import load_defaults
from plumrec.pipeline.options import (
    MIN_BEAM_WIDTH,
    check_item_embeddings,
    embedding_files_arg,
    json_fields_arg,
    parse_run_args,
)
from plumrec.train import TrainConfig


@pytest.mark.parametrize("bad", [["--beam-width", "10"], ["--budget-minutes", "0"], ["--steps", "1,2"],
                                 ["--codebook-sizes", "8,x"], ["--model-overrides", "[1]"],
                                 ["--model-overrides", "{x"], ["--preset", "huge"],
                                 ["--model-overrides", '{"layers": 3}'], ["--model-overrides", '{"vocab_size": 9}'],
                                 ["--model-overrides", '{"num_hidden_layers": 0}'], ["--sid-overrides", "[1]"],
                                 ["--sid-overrides", '{"epochs": 3}'], ["--sid-overrides", '{"cooc_weight": 1}'],
                                 ["--train-overrides", '{"dpo": {}}'], ["--train-overrides", '{"sft": 3}'],
                                 ["--train-overrides", '{"sft": {"steps": 5}}'],
                                 ["--train-overrides", '{"sft": {"seed": 5}}'],
                                 ["--train-overrides", '{"sasrec": {"max_items": 5}}'],
                                 ["--train-overrides", '{"sft": {"lr": -1}}'],
                                 ["--train-overrides", '{"cpt": {"lr": "fast"}}'],
                                 ["--train-overrides", '{"sft": {"label_smoothing": 1.0}}'],
                                 ["--train-overrides", '{"sft": {"item_loss": -0.5}}'],
                                 ["--train-overrides", '{"sft": {"ema_decay": 1.0}}'],
                                 ["--sasrec-overrides", "[64]"], ["--sasrec-overrides", '{"hidden": 128}'],
                                 ["--sasrec-overrides", '{"num_items": 9}'], ["--sasrec-overrides", '{"max_len": 9}'],
                                 ["--sasrec-overrides", '{"hidden_size": 0}'],
                                 ["--sasrec-overrides", '{"hidden_size": 6, "num_heads": 4}'],
                                 ["--sasrec-overrides", '{"hidden_size": true}'],
                                 ["--sasrec-overrides", '{"num_layers": 2.0}'],
                                 ["--sasrec-overrides", '{"dropout": "high"}'],
                                 ["--sid-init-scale", "-0.5"], ["--sid-init-scale", "nan"],
                                 ["--sft-eval-epochs", "-1"], ["--sft-eval-epochs", "nan"],
                                 ["--sft-eval-epochs", "1", "--sft-eval-every", "5"],
                                 ["--train-overrides", '{"sft": {"eval_epochs": 1}}'],
                                 ["--sft-eval-epochs", "0", "--sft-patience", "2"],
                                 ["--preset", "auto", "--model-overrides", '{"num_attention_heads": 7}']])
def test_bad_options_are_refused_naming_the_option(tmp_path, bad, capsys):
    with pytest.raises(SystemExit):
        parse_run_args(["--dataset", str(tmp_path), "--out", str(tmp_path / "o"), *bad])
    err = capsys.readouterr().err
    assert "must" in err and bad[0] in err  # the error names the option


def test_the_sft_recipe_comes_from_the_config_unless_an_option_pins_it(tmp_path):
    """The config's SFT epochs, evaluation period in epochs and patience; pinned --steps keep their SFT steps, a
    period in steps replaces the one in epochs, and without evaluations the config's patience is 0."""
    base = ["--dataset", str(tmp_path), "--out", str(tmp_path / "o")]
    d = load_defaults()["sft"]
    a = parse_run_args(base)
    assert (a.sft_epochs, a.sft_eval_epochs) == (d["epochs"], d["eval_epochs"]) and d["patience"] > 0
    assert "sft" not in a.train_overrides
    assert parse_run_args([*base, "--steps", "1,2,3"]).sft_epochs == 0
    assert parse_run_args([*base, "--steps", "1,2,3", "--sft-epochs", "3"]).sft_epochs == 3
    a = parse_run_args([*base, "--sft-eval-every", "5"])
    assert a.sft_eval_epochs == 0 and a.train_overrides["sft"] == {"eval_every": 5}
    a = parse_run_args([*base, "--sft-eval-epochs", "0"])
    assert a.sft_eval_epochs == 0 and a.train_overrides["sft"] == {"patience": 0}
    assert parse_run_args([*base, "--sft-eval-epochs", "0.5"]).sft_eval_epochs == 0.5


def test_defaults_fill_in_and_lists_parse(tmp_path):
    base = ["--dataset", str(tmp_path), "--out", str(tmp_path / "o")]
    d = load_defaults()
    a = parse_run_args(base)
    assert a.defaults == d and a.preset == d["model"]["preset"] and a.beam_width == MIN_BEAM_WIDTH
    assert a.codebook_sizes == d["sid"]["codebook_sizes"] and a.steps is None and a.item_attributes is None
    assert a.model_config is None and a.preset == a.codebook_sizes == "auto"  # the dataset sets them at run time
    a = parse_run_args([*base, "--steps", "3,4,5", "--codebook-sizes", "8,4", "--preset", "tiny",
                        "--train-overrides", '{"sft": {"lr": 0.02}, "cpt": {}}'])
    assert a.steps == {"cpt": 3, "sft": 4, "sasrec": 5} and a.codebook_sizes == [8, 4]
    assert a.train_overrides == {"sft": {"lr": 0.02}}  # an empty stage is no override
    attrs = tmp_path / "x_item2attributes.json"
    attrs.write_text("{}")
    assert parse_run_args([*base, "--item-attributes", "auto"]).item_attributes == str(attrs.resolve())


def test_json_and_file_options(tmp_path):
    p = argparse.ArgumentParser(prog="t")
    assert json_fields_arg(p, "--o", '{"lr": 1}', TrainConfig) == {"lr": 1}
    for text, message in (("[1]", "--o must be a JSON object"), ('{"lr": 1}', r"--o: 'lr' must be set with --lr"),
                          ('{"x": 1}', "--o: 'x' is not a TrainConfig field")):
        with pytest.raises(SystemExit):
            json_fields_arg(p, "--o", text, TrainConfig, {"lr": "--lr"} if "lr" in text else None)
    f = tmp_path / "e.npy"
    np.save(f, np.zeros((3, 2)))
    assert embedding_files_arg(p, "--e", f"{f},") == [str(f.resolve())]
    with pytest.raises(SystemExit):
        embedding_files_arg(p, "--e", str(tmp_path / "missing.npy"))
    check_item_embeddings("--e", str(f), np.zeros((3, 2)), 3)
    for bad in (np.zeros((2, 2)), np.zeros(3), np.full((3, 2), np.nan)):
        with pytest.raises(ValueError, match=r"--e: .*e.npy must be a finite \[num_items=3, d\] array"):
            check_item_embeddings("--e", str(f), bad, 3)
