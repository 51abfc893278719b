"""``plum run``: the bench's pipeline from the CLI (benchmarks/bench_retrieval.py is a thin wrapper; its
defaults from a config file: test_defaults.py)."""
from __future__ import annotations

import copy
import json

import pytest
from retrieval_data import TINY_WORDS, write_dataset
from tiny_text_model import make_tiny_bert_dir

from plumrec.pipeline.report import EXPOSURE_KEYS, RESULT_KEYS


def test_plum_run_is_the_bench_pipeline(tmp_path, capsys):
    """`plum run` takes the bench's options (its own parser's errors name the option) and runs the same
    pipeline: results.json with the command and the --config it ran with."""
    from plumrec.cli import main

    data = write_dataset(tmp_path / "data", seed=6)
    out = tmp_path / "o"
    argv = ["--dataset", str(data), "--out", str(out), "--steps", "10,10,10", "--codebook-sizes", "8,4,4",
            "--sid-epochs", "3", "--eval-batch-size", "16", "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
            "--no-progress", "--preset", "tiny", "--no-collaborative-sids",
            "--train-overrides", '{"sft": {"distill": 0}}',
            "--model-dir", str(make_tiny_bert_dir(tmp_path / "bert", words=TINY_WORDS))]
    with pytest.raises(SystemExit):
        main(["run", *argv, "--beam-width", "10"])
    assert "plum run: error: --beam-width must be >= 20" in capsys.readouterr().err
    assert main(["run", *argv]) == 0
    printed = capsys.readouterr().out
    assert "no published rows for this dataset" in printed and "Exposure of the top-10 lists" in printed
    assert "TIGER (paper)" not in printed  # the published rows are Amazon datasets', not this synthetic one's
    res = json.loads((out / "results.json").read_text())
    assert res["details"]["published"] == {}
    assert set(RESULT_KEYS) <= set(res["plum"]) and res["metadata"]["command"].startswith("plum run --dataset")
    for name in ("plum", "popularity", "sasrec"):  # exposure of the same top-10 lists, popularity from training
        assert set(EXPOSURE_KEYS) <= set(res[name]) and 0.0 < res[name]["coverage@10"] <= 1.0
    m = res["metadata"]["items"]  # popularity: everyone gets the same 10 items, the least novel ones
    assert res["popularity"]["coverage@10"] == pytest.approx(10 / m) and res["popularity"]["gini@10"] == pytest.approx(
        1 - 10 / m)
    assert res["popularity"]["novelty@10"] <= min(res["plum"]["novelty@10"], res["sasrec"]["novelty@10"]) + 1e-9
    assert res["metadata"]["config"] == "amazon" and res["metadata"]["collaborative_sids"] is False


def test_plum_run_sft_epochs_sets_the_steps_and_keeps_the_best_validation_model(tmp_path, capsys):
    """``--sft-epochs 3``: SFT's steps take three passes over its examples (the last metrics row is at epoch
    ~3, CPT and SASRec keep --steps); ``--sft-eval-every 3``: the validation recall@10 is logged every 3 steps
    and the saved SFT model is the best evaluation's weights."""
    import torch
    from safetensors.torch import load_model as load_safetensors_model

    from plumrec.cli import main
    from plumrec.pipeline.workspace import load_model
    from plumrec.train.checkpoint import load_checkpoint

    data = write_dataset(tmp_path / "data", seed=6)
    out = tmp_path / "o"
    argv = ["--dataset", str(data), "--out", str(out), "--steps", "10,10,10", "--codebook-sizes", "8,4,4",
            "--sid-epochs", "3", "--eval-batch-size", "16", "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
            "--no-progress", "--preset", "tiny", "--no-collaborative-sids", "--max-users", "8",
            "--train-overrides", '{"sft": {"distill": 0, "eval_users": 6, "max_tokens": 128}}', "--sft-epochs", "3",
            "--sft-patience", "0", "--sft-eval-every", "3",
            "--model-dir", str(make_tiny_bert_dir(tmp_path / "bert", words=TINY_WORDS))]
    with pytest.raises(SystemExit):
        main(["run", *argv[:-6], "--sft-eval-epochs", "0", "--sft-patience", "2", *argv[-2:]])
    assert "--sft-patience 2 must come with evaluations" in capsys.readouterr().err
    assert main(["run", *argv]) == 0
    assert "SFT 3 epochs" in capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    assert plan["sft_epochs"] == 3.0 and plan["steps"]["cpt"] == plan["steps"]["sasrec"] == 10
    rows = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == plan["steps"]["sft"] and 2.6 <= rows[-1]["epoch"] <= 3.4
    evals = {r["step"]: r["eval"] for r in rows if "eval" in r}
    assert set(evals) == {*range(3, plan["steps"]["sft"] + 1, 3), plan["steps"]["sft"]}
    best = max(evals, key=lambda s: (evals[s], -s))
    assert load_checkpoint(out / "sft" / "checkpoint")["extra"]["best_step"] == best
    saved, _, _ = load_model(out / "sft" / "model")
    kept = copy.deepcopy(saved)
    with torch.no_grad():
        for p in kept.parameters():
            p.zero_()
    load_safetensors_model(kept, str(out / "sft" / f"best-{best}.safetensors"))
    kept_state = kept.state_dict()
    for name, value in saved.state_dict().items():
        assert torch.equal(value, kept_state[name]), name
    assert main(["run", *argv]) == 0  # resumes the finished OUT with the same options


def test_plum_run_trains_the_same_epochs_and_evaluates_per_epoch_on_a_catalogue_a_third_the_size(tmp_path, capsys):
    """The config's recipe on two catalogues, one a third of the other's items and users: the same SFT epochs
    (steps in proportion to the examples), validation every ``--sft-eval-epochs`` (a period in steps that
    follows the catalogue), the config's patience, and the selection in the results' metadata."""
    from plumrec.cli import main

    bert = str(make_tiny_bert_dir(tmp_path / "bert", words=TINY_WORDS))
    runs = {}
    for name, items, users in (("full", 48, 120), ("third", 16, 40)):
        out = tmp_path / name
        argv = ["--dataset", str(write_dataset(tmp_path / f"data_{name}", num_items=items, num_users=users, seed=6)),
                "--out", str(out), "--steps", "10,10,10", "--codebook-sizes", "8,4,4", "--sid-epochs", "3",
                "--eval-batch-size", "16", "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--no-progress",
                "--preset", "tiny", "--no-collaborative-sids", "--max-users", "8", "--model-dir", bert,
                "--train-overrides", '{"sft": {"distill": 0, "eval_users": 6, "max_tokens": 128}}',
                "--sft-epochs", "4", "--sft-eval-epochs", "1"]
        assert main(["run", *argv]) == 0
        printed = capsys.readouterr().out
        plan = json.loads((out / "plan.json").read_text())
        rows = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
        evals = [r["step"] for r in rows if "eval" in r]
        every = plan["sft_eval_every"]
        assert plan["sft_epochs"] == 4.0 and plan["sft_eval_epochs"] == 1.0
        assert abs(every * 4 - plan["steps"]["sft"]) <= 4  # one epoch's steps, each rounded up
        assert evals[:-1] == list(range(every, rows[-1]["step"], every))[:len(evals) - 1] and evals
        assert rows[-1]["step"] == plan["steps"]["sft"] or len(evals) >= 3  # the end, or 2 evaluations past the best
        meta = json.loads((out / "results.json").read_text())["metadata"]
        assert meta["sft_selection"]["best_step"] in evals and meta["train_config"]["sft"]["patience"] == 2
        assert "chosen on validation every 1 epochs" in printed
        runs[name] = plan["steps"]["sft"]
    with pytest.raises(ValueError, match="planned with --sft-eval-epochs 1, not 0.5"):
        main(["run", *argv[:-1], "0.5"])  # a resume with another period is refused
    assert 2.2 <= runs["full"] / runs["third"] <= 4.0
