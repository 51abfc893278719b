"""The results of a run: the protocol and beam tags in file names, cached evaluations with their ranks, and the
printed table beside the published numbers, with the exposure block of our rows."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from plumrec.pipeline.options import MIN_BEAM_WIDTH
from plumrec.pipeline.report import (
    EXPOSURE_KEYS,
    PUBLISHED,
    PUBLISHED_BY_DATASET,
    beam_tag,
    cached_evaluation,
    print_table,
    published_dataset,
    published_rows,
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
                {**meta, "dataset": "/data/amazon-beauty"}, {"codebook_sizes": [8, 4], "unique_sid_fraction": 0.9})
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


_META = {"test_users": 10, "all_test_users": 10, "subsampled_users": False, "split": "test", "items": 30,
         "beam_width": 20, "exclude_history": False, "plan": {"steps": {"cpt": 3}, "seconds_per_step": None},
         "training_seconds": 60.0, "wall_seconds_this_run": 120.0}
_OURS = {"PLUM": {"recall@5": 0.25, "recall@10": 0.5, "ndcg@5": 0.125, "ndcg@10": 0.2, "invalid_rate": 0.0}}
_SIDS = {"codebook_sizes": [8, 4], "unique_sid_fraction": 0.9}


def _published_lines(out: str) -> dict:
    """Row name -> the printed numbers of the results table's rows other than ours (lines of a name and five
    columns, each a number or ``-``)."""
    rows = {}
    for line in out.split("\nExposure")[0].splitlines():
        m = re.fullmatch(r"  (\S.*?)\s+((?:(?:\d\.\d{4}|-)\s+){4}(?:\d\.\d{4}|-))", line)
        if m and m.group(1) != "PLUM":
            rows[m.group(1)] = m.group(2).split()
    return rows


@pytest.mark.parametrize("path, dataset", [
    ("/data/amazon-beauty", "Beauty"), ("Beauty", "Beauty"), ("/x/beauty_2014/", "Beauty"),
    ("/x/Beauty/Beauty.txt", "Beauty"), ("toys", "Toys"), ("/d/Toys_and_Games", "Toys"),
    ("sports", "Sports"), ("/d/SPORTS_AND_OUTDOORS", "Sports"), ("/d/yelp", None), ("/d/beauty-and-toys", None),
    ("/data/ml-1m/ratings.dat", None)])
def test_published_dataset_is_recognised_from_the_name(path, dataset):
    assert published_dataset(path) == dataset
    assert published_rows(path) == ({} if dataset is None else PUBLISHED_BY_DATASET[dataset])


def test_published_rows_are_the_numbers_of_each_dataset_with_a_protocol():
    beauty, toys, sports = (published_rows(d) for d in ("beauty", "Toys_and_Games", "Sports_and_Outdoors"))
    assert beauty["TIGER (paper)"] == {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384,
                                       "protocol": beauty["TIGER (paper)"]["protocol"]}
    assert (toys["TIGER (paper)"]["recall@10"], toys["TIGER (paper)"]["ndcg@5"]) == (0.0712, 0.0371)
    assert (sports["SASRec (TIGER table)"]["recall@5"], sports["TIGER (paper)"]["ndcg@10"]) == (0.0233, 0.0225)
    assert (beauty["ActionPiece"]["recall@10"], beauty["SASRec well tuned"]["ndcg@10"]) == (0.0775, 0.0531)
    assert "beam 50" in beauty["ActionPiece"]["protocol"] and "ActionPiece" not in toys and len(sports) == 2
    assert all(isinstance(r["protocol"], str) and r["protocol"] for d in (beauty, toys, sports) for r in d.values())
    beauty["RPG"]["recall@10"] = 1.0  # a copy: the table itself is unchanged
    assert PUBLISHED["RPG"]["recall@10"] == 0.0809


def test_print_table_shows_beauty_rows_for_beauty(capsys):
    print_table(_OURS, {**_META, "dataset": "/data/Beauty"}, _SIDS)
    out = capsys.readouterr().out
    rows = _published_lines(out)
    assert set(rows) == set(PUBLISHED_BY_DATASET["Beauty"])
    assert rows["TIGER (paper)"] == ["0.0454", "0.0321", "0.0648", "0.0384", "-"]
    assert rows["SASRec CE (RecBole)"] == ["-", "-", "0.0821", "0.0405", "-"]
    assert "published rows (Beauty" in out and "5-way inference ensemble" in out


def test_print_table_shows_toys_rows_not_beauty_ones(capsys):
    print_table(_OURS, {**_META, "dataset": "/data/beauty-run"}, _SIDS, dataset="/data/Toys_and_Games")
    out = capsys.readouterr().out
    rows = _published_lines(out)
    assert set(rows) == set(PUBLISHED_BY_DATASET["Toys"])
    assert rows["TIGER (paper)"] == ["0.0521", "0.0371", "0.0712", "0.0432", "-"]
    assert rows["RPG"] == ["-", "-", "0.0869", "0.0490", "-"]
    assert "0.0648" not in out and "ActionPiece" not in out and "SASRec CE (RecBole)" not in out


def test_print_table_of_an_unknown_dataset_has_no_published_rows(capsys):
    print_table(_OURS, {**_META, "dataset": "/data/yelp"}, _SIDS)
    out = capsys.readouterr().out
    assert _published_lines(out) == {} and "no published rows for this dataset" in out
    assert not any(name in out for d in PUBLISHED_BY_DATASET.values() for name in d)
