"""compare_retrieval.py: two runs' per-user ranks compared with paired standard errors, on ranks files written
here (on real runs: test_bench_retrieval.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from retrieval_data import load_script

from plumrec.metrics import per_user_metric

compare_retrieval = load_script("compare_retrieval")


@pytest.mark.parametrize("bad", [["o:foo", "o"], ["o", "o", "--ks", "5,x"], ["o", "o", "--ks", "0"],
                                 ["o", "o", "--beam-width", "0"]])
def test_compare_retrieval_rejects_bad_arguments(bad, capsys):
    with pytest.raises(SystemExit):
        load_script("compare_retrieval").parse_args(bad)
    assert "must" in capsys.readouterr().err


def _ranks(out, model, ranks, targets, k=10, name="eval_{model}.ranks.npz"):
    out.mkdir(exist_ok=True)
    np.savez(out / name.format(model=model), ranks=np.asarray(ranks), targets=np.asarray(targets), k=k)


def test_files_are_named_by_split_protocol_and_beam(tmp_path):
    f = compare_retrieval.ranks_file
    assert f(tmp_path, "plum", "test", False, 20) == tmp_path / "eval_plum.ranks.npz"
    assert f(tmp_path, "plum", "valid", True, 50) == tmp_path / "eval_plum_valid_xh_beam50.ranks.npz"
    assert f(tmp_path, "sasrec", "test", False, 50) == tmp_path / "eval_sasrec.ranks.npz"  # no beam


def test_two_runs_on_the_same_users_are_compared(tmp_path, capsys):
    targets = np.arange(6)
    a, b = np.array([0, 3, -1, 7, -1, 1]), np.array([0, 1, 2, -1, 4, 0])
    _ranks(tmp_path / "a", "plum", a, targets)
    _ranks(tmp_path / "a", "sasrec", b, targets)
    res = compare_retrieval.main([str(tmp_path / "a"), f"{tmp_path / 'a'}:sasrec", "--ks", "5",
                                  "--json", str(tmp_path / "c.json")])
    assert set(res) == {"recall@5", "ndcg@5"}
    r = res["recall@5"]
    assert (r["a"], r["b"]) == (pytest.approx(3 / 6), pytest.approx(5 / 6))
    assert r["b_minus_a"] == pytest.approx(2 / 6)
    assert res["ndcg@5"]["a"] == pytest.approx(float(per_user_metric(a, 5, "ndcg").mean()))
    assert json.loads((tmp_path / "c.json").read_text())["users"] == 6
    assert "6 test users" in capsys.readouterr().out


def test_runs_on_other_users_or_missing_ranks_are_refused(tmp_path):
    _ranks(tmp_path / "a", "plum", [0, 1], [3, 4])
    _ranks(tmp_path / "b", "plum", [0, 1, 2], [3, 4, 5])
    with pytest.raises(SystemExit, match="were scored on different users or targets"):
        compare_retrieval.main([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(SystemExit, match=r"eval_plum_valid.ranks.npz does not exist"):
        compare_retrieval.main([str(tmp_path / "a"), str(tmp_path / "b"), "--split", "valid"])
    _ranks(tmp_path / "c", "plum", [0, 1], [3, 4], k=5)
    with pytest.raises(SystemExit, match=r"the ranks were kept within the top 5 only"):
        compare_retrieval.main([str(tmp_path / "a"), str(tmp_path / "c"), "--ks", "10"])
