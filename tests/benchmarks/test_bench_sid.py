"""benchmarks/bench_sid.py: ``--overrides`` reaches the tokenizer and
``--proxy-split valid`` measures the proxy on the validation transitions, checked against a tokenizer
fitted and scored directly with the same settings."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sid", ROOT / "benchmarks" / "bench_sid.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_sid_overrides_and_valid_proxy(tmp_path):
    from plumrec.data import cooccurrence_pairs, leave_one_out, make_synthetic_catalogue
    from plumrec.sid import SemanticIdTokenizer

    out = tmp_path / "r.json"
    res = _bench().main(["--smoke", "--overrides", '{"cooccurrence_weight": 2.0, "mask_prob": 0.25}',
                         "--proxy-split", "valid", "--json", str(out)])
    assert len(res) == 1 and res[0]["config"]["cooccurrence_weight"] == 2.0 and res[0]["config"]["mask_prob"] == 0.25
    assert json.loads(out.read_text())[0]["config"]["cooccurrence_weight"] == 2.0

    cat = make_synthetic_catalogue(num_items=600, num_users=600, seed=0)
    split = leave_one_out(cat.data)
    emb = cat.embeddings["text"]
    tok = SemanticIdTokenizer((16, 8, 8), seed=0, latent_dim=16, hidden_dims=(64,), epochs=6, warmup_epochs=2,
                              batch_size=128, cooccurrence_weight=2.0, mask_prob=0.25)
    tok.fit(emb, cooccurrence=cooccurrence_pairs(split.train, cat.data.num_items), progress=False)
    assert dataclasses.asdict(tok.config) == {**res[0]["config"], "codebook_sizes": (16, 8, 8), "hidden_dims": (64,)}
    valid = np.stack([[h[-1] for h in split.valid.histories], split.valid.targets], 1)
    test = np.stack([[h[-1] for h in split.test.histories], split.test.targets], 1)
    q_valid, q_test = tok.quality_report(emb, cooccurrence=valid), tok.quality_report(emb, cooccurrence=test)
    assert res[0]["prefix_share"] == pytest.approx(list(q_valid.prefix_share), abs=0)
    assert res[0]["uniqueness"] == q_valid.uniqueness
    assert list(q_valid.prefix_share) != list(q_test.prefix_share)  # the split really changes the proxy


@pytest.mark.parametrize("bad", [["--overrides", "[1]"], ["--overrides", '{"cooc": 1}'],
                                 ["--overrides", '{"seed": 1}'], ["--proxy-split", "train"]])
def test_bench_sid_rejects_bad_arguments(bad, capsys):
    with pytest.raises(SystemExit):
        _bench().main(["--smoke", *bad])
    err = capsys.readouterr().err
    assert "--overrides" in err or "--proxy-split" in err


def test_bench_sid_extra_embeddings(tmp_path, capsys):
    """--extra-embeddings are a second input of the tokenizer (same codes as a direct fit on
    [text, extra]); a file with the wrong number of rows is an error naming the option."""
    from plumrec.data import cooccurrence_pairs, leave_one_out, make_synthetic_catalogue
    from plumrec.sid import SemanticIdTokenizer

    rng = np.random.default_rng(0)
    np.save(tmp_path / "collab.npy", rng.normal(size=(600, 6)).astype(np.float32))
    res = _bench().main(["--smoke", "--extra-embeddings", str(tmp_path / "collab.npy")])
    assert "collab.npy (6-d)" in capsys.readouterr().out
    cat = make_synthetic_catalogue(num_items=600, num_users=600, seed=0)
    split = leave_one_out(cat.data)
    emb = [cat.embeddings["text"], np.load(tmp_path / "collab.npy")]
    tok = SemanticIdTokenizer((16, 8, 8), seed=0, latent_dim=16, hidden_dims=(64,), epochs=6, warmup_epochs=2,
                              batch_size=128)
    tok.fit(emb, cooccurrence=cooccurrence_pairs(split.train, cat.data.num_items), progress=False)
    assert tok.model.input_dims == (emb[0].shape[1], 6)
    test = np.stack([[h[-1] for h in split.test.histories], split.test.targets], 1)
    q = tok.quality_report(emb, cooccurrence=test)
    assert res[0]["prefix_share"] == pytest.approx(list(q.prefix_share), abs=0) and res[0]["uniqueness"] == q.uniqueness
    np.save(tmp_path / "short.npy", rng.normal(size=(599, 6)).astype(np.float32))
    for bad in ("short.npy", "missing.npy"):
        with pytest.raises(SystemExit):
            _bench().main(["--smoke", "--extra-embeddings", str(tmp_path / bad)])
        assert "--extra-embeddings" in capsys.readouterr().err
