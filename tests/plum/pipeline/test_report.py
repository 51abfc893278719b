"""The results of a run: the protocol and beam tags in file names, cached evaluations with their ranks, and the
printed table beside the published numbers, with the exposure block of our rows."""
from __future__ import annotations

import json

import numpy as np

from plumrec.pipeline.options import MIN_BEAM_WIDTH
from plumrec.pipeline.report import (
    EXPOSURE_KEYS,
    PUBLISHED,
    beam_tag,
    cached_evaluation,
    print_table,
    ranks_path,
    split_tag,
)


def test_tags_and_ranks_path(tmp_path):
    assert [split_tag("test", False), split_tag("valid", False), split_tag("test", True),
            split_tag("valid", True)] == ["", "_valid", "_xh", "_valid_xh"]
    assert beam_tag(MIN_BEAM_WIDTH) == "" and beam_tag(50) == "_beam50"
    assert ranks_path(tmp_path / "eval_plum_valid.json") == tmp_path / "eval_plum_valid.ranks.npz"


def test_cached_evaluation_runs_once_and_keeps_the_ranks(tmp_path):
    calls = []

    def evaluate():
        calls.append(1)
        return {"recall@10": 0.5}, np.array([0, 3, -1])

    path = tmp_path / "eval.json"
    res, seconds = cached_evaluation(path, evaluate, np.array([4, 5, 6]), 10)
    assert res == {"recall@10": 0.5} and seconds >= 0 and json.loads(path.read_text()) == res
    saved = np.load(ranks_path(path))
    assert saved["ranks"].tolist() == [0, 3, -1] and saved["targets"].tolist() == [4, 5, 6] and int(saved["k"]) == 10
    assert cached_evaluation(path, evaluate, np.array([4, 5, 6]), 10) == (res, 0.0) and len(calls) == 1


def test_print_table_shows_our_rows_beside_the_published_ones(capsys):
    meta = {"test_users": 10, "all_test_users": 20, "subsampled_users": True, "split": "valid", "items": 30,
            "beam_width": 20, "exclude_history": True, "plan": {"steps": {"cpt": 3}, "seconds_per_step": None},
            "training_seconds": 60.0, "wall_seconds_this_run": 120.0}
    print_table({"PLUM": {"recall@5": 0.25, "recall@10": 0.5, "ndcg@5": 0.125, "ndcg@10": 0.2, "invalid_rate": 0.0}},
                meta, {"codebook_sizes": [8, 4], "unique_sid_fraction": 0.9})
    out = capsys.readouterr().out
    assert "30 items, SIDs (8, 4) (90.0% unique), 10 valid users (FIRST 10 OF 20: subsampled)" in out
    assert "history items excluded" in out and "steps pinned by --steps (no budget)" in out
    assert "training took 1.0 min, this run 2.0 min wall" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("PLUM"))
    assert row.split()[1:] == ["0.2500", "0.1250", "0.5000", "0.2000", "0.0000"]
    assert all(name in out for name in PUBLISHED) and "the published rows are test-split numbers" in out


def test_print_table_adds_an_exposure_block_for_rows_that_have_it(capsys):
    meta = {"test_users": 10, "all_test_users": 10, "subsampled_users": False, "split": "test", "items": 30,
            "beam_width": 20, "exclude_history": False, "plan": {"steps": {"cpt": 3}, "seconds_per_step": 1.0},
            "budget_minutes": 5, "training_seconds": 60.0, "wall_seconds_this_run": 120.0}
    base = {"recall@5": 0.25, "recall@10": 0.5, "ndcg@5": 0.125, "ndcg@10": 0.2, "invalid_rate": 0.0}
    exposure = dict(zip(EXPOSURE_KEYS, (0.6, 3.5, 0.9, 0.4, 0.3, 11.25)))
    print_table({"PLUM": {**base, **exposure}, "cached": base, "partial": {**base, "gini@10": 0.7}}, meta,
                {"codebook_sizes": [8, 4], "unique_sid_fraction": 0.9})
    lines = capsys.readouterr().out.splitlines()
    block = lines[next(i for i, line in enumerate(lines) if line.startswith("Exposure of the top-10 lists")):]
    assert all(k in block[1] for k in EXPOSURE_KEYS)
    rows = {line.split()[0]: line.split()[1:] for line in block[3:]}
    assert rows["PLUM"] == ["0.6000", "3.5000", "0.9000", "0.4000", "0.3000", "11.2500"]
    assert rows["partial"] == ["-", "-", "-", "0.7000", "-", "-"] and "cached" not in rows
    assert next(line for line in lines if line.strip().startswith("PLUM")).split()[1:] == [
        "0.2500", "0.1250", "0.5000", "0.2000", "0.0000"]
