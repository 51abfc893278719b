"""``plum run``: the bench's pipeline from the CLI (benchmarks/bench_retrieval.py is a thin wrapper; its
defaults from a config file: test_defaults.py)."""
from __future__ import annotations

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
    assert "TIGER (paper)" in printed and "Exposure of the top-10 lists" in printed
    res = json.loads((out / "results.json").read_text())
    assert set(RESULT_KEYS) <= set(res["plum"]) and res["metadata"]["command"].startswith("plum run --dataset")
    for name in ("plum", "popularity", "sasrec"):  # exposure of the same top-10 lists, popularity from training
        assert set(EXPOSURE_KEYS) <= set(res[name]) and 0.0 < res[name]["coverage@10"] <= 1.0
    m = res["metadata"]["items"]  # popularity: everyone gets the same 10 items, the least novel ones
    assert res["popularity"]["coverage@10"] == pytest.approx(10 / m) and res["popularity"]["gini@10"] == pytest.approx(
        1 - 10 / m)
    assert res["popularity"]["novelty@10"] <= min(res["plum"]["novelty@10"], res["sasrec"]["novelty@10"]) + 1e-9
    assert res["metadata"]["config"] == "amazon" and res["metadata"]["collaborative_sids"] is False
