"""bench_explore.py --smoke on a tiny model trained here (SIDs and a few SFT steps on the embedded synthetic
catalogue): every method's row, the files, the serving-cost ratios, and bad arguments."""
from __future__ import annotations

import csv
import json
import math

import pytest
from retrieval_data import load_script

from plumrec.pipeline import Workspace, load_run_config
from plumrec.pipeline.stages import run_sft, run_sid

bench_explore = load_script("bench_explore")

TINY = {
    "data": {"synthetic": {"num_items": 120, "num_users": 60, "num_topics": 4, "subtopics_per_topic": 2,
                           "max_length": 10}},
    "sid": {"codebook_sizes": [8, 4, 4], "epochs": 4, "warmup_epochs": 1, "hidden_dims": [32], "latent_dim": 8,
            "batch_size": 64},
    "sft": {"steps": 4, "max_tokens": 512, "warmup_steps": 1},
    "eval": {"beam_width": 12, "batch_size": 16},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A `plum` workdir with SIDs and an SFT model (from scratch), and its run config file."""
    root = tmp_path_factory.mktemp("explore")
    cfg_path = root / "run.json"
    cfg_path.write_text(json.dumps(TINY))
    ws = Workspace(load_run_config(str(cfg_path), workdir=str(root / "work")))
    run_sid(ws, progress=False)
    run_sft(ws, init="scratch", progress=False)
    return root / "work", cfg_path


def test_smoke_run_writes_every_method_and_the_serving_cost(trained, capsys):
    work, cfg = trained
    out = bench_explore.main(["--out", str(work), "--run-config", str(cfg), "--smoke", "--no-progress", "-k", "5",
                              "--results", str(work / "bench")])
    rows = out["rows"]
    methods = [(r["method"], r["param"]) for r in rows]
    assert methods == [("plain", 0.0), ("pop_penalty", 0.0), ("pop_penalty", 0.5), ("sample", 0.5), ("sample", 2.0),
                       ("maxent", 0.0), ("maxent", 0.5), ("maxent", 2.0)]
    plain = rows[0]
    for same in (rows[1], rows[5]):  # beta = 0 and lambda = 0 are plain beam search
        assert (same["recall"], same["ndcg"], same["coverage"]) == (plain["recall"], plain["ndcg"], plain["coverage"])
    assert rows[5]["components"] == 1
    assert rows[7]["coverage"] > plain["coverage"], "a large lambda spreads the exposure"
    assert all(0 <= r["coverage"] <= 1 and 0 <= r["gini"] <= 1 and r["entropy"] > 0 for r in rows)
    assert out["users"] == 24 and len(out["gaps"]["2.0"]) == 4
    cost = out["serving_cost"]
    assert cost["users"] == 16 and cost["lam"] == 2.0
    assert all(math.isfinite(cost[k]) and cost[k] > 0 for k in ("search_ratio", "recommend_ratio"))
    files = work / "bench"
    with open(files / "explore.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == [m for m, _ in methods]
    md = (files / "explore.md").read_text()
    assert "| maxent | 2 |" in md and "serving cost" in md and "target (<= 2% R@5 loss" in md
    saved = json.loads((files / "explore.json").read_text())
    assert saved["verdict"]["baseline_points"] == 4 and saved["k"] == 5
    assert (files / "explore.png").exists() or "matplotlib is not installed" in saved["plot"]
    assert "search on the same 16 users" in capsys.readouterr().out


@pytest.mark.parametrize("bad, message", [(["--lams", "0,x"], "--lams must be comma-separated"),
                                          (["--betas", "-1"], "--betas must hold finite numbers >= 0"),
                                          (["--temperatures", "0"], "--temperatures must hold finite numbers > 0"),
                                          (["--iters", "-1"], "--iters must be >= 0"), (["-k", "0"], "-k must be"),
                                          (["--max-users", "0"], "--max-users must be"),
                                          (["--preset", "tiny"], "run options need --dataset")])
def test_bad_arguments_are_refused(bad, message, capsys):
    with pytest.raises(SystemExit):
        bench_explore.parse_args(["--out", "o", *bad])
    assert message in capsys.readouterr().err


def test_an_untrained_out_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="sft/model/model.safetensors does not exist"):
        bench_explore.main(["--out", str(tmp_path), "--smoke"])
