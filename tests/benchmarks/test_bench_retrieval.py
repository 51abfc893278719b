"""Smoke test of benchmarks/bench_retrieval.py (``plum run``'s pipeline, :mod:`plumrec.pipeline.run`): the
whole pipeline end to end on a tiny dataset in the S3-Rec text format with an item json, then a resumed
re-run that must skip every finished stage and give the same results."""
from __future__ import annotations

import json

import numpy as np
import pytest
from retrieval_data import TINY_WORDS, load_bench, load_script, write_dataset
from tiny_text_model import make_tiny_bert_dir

from plumrec.pipeline import stages
from plumrec.pipeline.defaults import load_defaults
from plumrec.pipeline.plan import ATTR_FILE, COLLAB_FILE, run_config
from plumrec.pipeline.report import RESULT_KEYS
from plumrec.pipeline.settings import model_config
from plumrec.pipeline.workspace import Workspace
from plumrec.train.checkpoint import load_checkpoint


def test_bench_retrieval_end_to_end_and_resume(tmp_path, capsys):
    bench = load_bench()
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--dataset", str(data), "--out", str(out), "--budget-minutes", "0.05", "--seed", "0",
            "--beam-width", "20", "--codebook-sizes", "8,4,4", "--sid-epochs", "4", "--eval-batch-size", "16",
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--no-progress", "--preset", "tiny",
            "--model-dir", str(make_tiny_bert_dir(tmp_path / "bert", words=TINY_WORDS))]
    res = bench.main(argv)
    text = capsys.readouterr().out
    assert "no published rows for this dataset" in text and "TIGER (paper)" not in text and "sasrec" in text
    on_disk = json.loads((out / "results.json").read_text())
    for model in ("plum", "popularity", "sasrec"):
        row = on_disk[model]
        assert set(RESULT_KEYS) <= set(row)
        assert all(0.0 <= row[k] <= 1.0 for k in RESULT_KEYS)
        assert row["recall@5"] <= row["recall@10"] and row["ndcg@5"] <= row["ndcg@10"]
    meta = on_disk["metadata"]
    assert meta["test_users"] == meta["all_test_users"] == 40 and not meta["subsampled_users"]
    assert meta["budget_minutes"] == 0.05 and meta["beam_width"] == 20 and meta["device"] == "cpu"
    assert meta["train_config"]["sft"]["objective"] == "sequence" and meta["train_config"]["sft"]["loss"] == "codebook"
    steps = meta["plan"]["steps"]
    assert set(steps) == {"cpt", "sft", "sasrec"} and min(steps["cpt"], steps["sasrec"]) >= 10
    # the config's recipe: SFT's length in epochs, validation every 2 epochs with patience 2
    assert meta["plan"]["sft_epochs"] == 16 and meta["plan"]["sft_eval_epochs"] == 2
    assert meta["train_config"]["sft"]["patience"] == 2 and meta["sft_selection"]["evaluations"] >= 1
    for stage in ("cpt", "sft", "sasrec"):
        assert (out / stage / "checkpoint" / "state.json").exists()
    # collaborative SIDs (the default): the trained SASRec's item table is the tokenizer's second input

    table = load_checkpoint(out / "sasrec" / "checkpoint", tensors=True)["model"]["item_embedding.weight"]
    np.testing.assert_array_equal(np.load(out / COLLAB_FILE), table.numpy())
    text_dim = np.load(out / "item_embeddings.npy").shape[1]
    assert json.loads((out / "sid" / "config.json").read_text())["input_dims"] == [text_dim, table.shape[1]]
    assert meta["collaborative_sids"] is True
    assert json.loads((out / "cpt" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == steps["cpt"]
    # a resumed run skips every finished stage and reproduces the numbers
    times = json.loads((out / "timings.json").read_text())
    res2 = bench.main(argv)
    for model in ("plum", "popularity", "sasrec"):
        assert res2[model] == res[model]
    assert json.loads((out / "timings.json").read_text()) == times
    assert res2["metadata"]["wall_seconds_this_run"] < res["metadata"]["wall_seconds_this_run"]
    # --split valid on the same OUT scores the saved models on the validation users, beside the test results
    test_json = (out / "results.json").read_text()
    res_v = bench.main([*argv, "--split", "valid"])
    assert "valid users" in capsys.readouterr().out
    assert (out / "results.json").read_text() == test_json and (out / "eval_plum_valid.json").exists()
    assert json.loads((out / "results_valid.json").read_text())["metadata"]["split"] == "valid"
    assert json.loads((out / "timings.json").read_text())["sasrec_train"] == times["sasrec_train"]
    ws = Workspace(run_config(bench.parse_args(argv), out, out / "item_embeddings.npy", steps))
    valid = ws.split.valid
    assert not np.array_equal(valid.targets, ws.split.test.targets)
    expect = stages.retriever(ws, out / "sft" / "model").evaluate(list(valid.histories), np.asarray(valid.targets),
                                                                   [5, 10])
    assert {k: res_v["plum"][k] for k in RESULT_KEYS} == {k: expect.get(k, 0.0) for k in RESULT_KEYS}
    # --exclude-history on the same OUT scores the saved models with history items dropped, beside the rest
    res_x = bench.main([*argv, "--exclude-history"])
    assert "history items excluded" in capsys.readouterr().out
    assert (out / "results.json").read_text() == test_json and (out / "eval_plum_xh.json").exists()
    assert json.loads((out / "results_xh.json").read_text())["metadata"]["exclude_history"] is True
    assert json.loads((out / "timings.json").read_text())["sasrec_train"] == times["sasrec_train"]
    test = ws.split.test
    expect = stages.retriever(ws, out / "sft" / "model").evaluate(list(test.histories), np.asarray(test.targets),
                                                                   [5, 10], exclude_history=True)
    assert {k: res_x["plum"][k] for k in RESULT_KEYS} == {k: expect.get(k, 0.0) for k in RESULT_KEYS}
    # another beam width is another evaluation (its own files), not beam 20's cached one
    _check_both_protocols(on_disk, res_x)
    res_b = bench.main([*argv, "--beam-width", "24", "--one-protocol"])
    assert "other_protocol" not in res_b["details"] and not (out / "eval_plum_xh_beam24.json").exists()
    assert (out / "eval_plum_beam24.json").exists() and (out / "results_beam24.json").exists()
    assert (out / "results.json").read_text() == test_json and res_b["metadata"]["beam_width"] == 24
    ws.cfg["eval"]["beam_width"] = 24
    expect = stages.retriever(ws, out / "sft" / "model").evaluate(list(test.histories), np.asarray(test.targets),
                                                                   [5, 10])
    assert {k: res_b["plum"][k] for k in RESULT_KEYS} == {k: expect.get(k, 0.0) for k in RESULT_KEYS}


def _check_both_protocols(first: dict, excluded: dict) -> None:
    """The first run scored our rows under both protocols: the other one's rows are the --exclude-history
    run's, and that run's other rows are the first run's."""
    other = first["details"]["other_protocol"]
    assert other["exclude_history"] is True and set(other["rows"]) == {"plum", "popularity", "sasrec"}
    for model in other["rows"]:
        assert other["rows"][model] == excluded[model], model
        assert excluded["details"]["other_protocol"]["rows"][model] == first[model], model


def test_bench_retrieval_is_deterministic_for_a_seed(tmp_path):
    """Two fresh runs (new OUT each) with pinned steps and one seed give the same SIDs and numbers."""
    bench = load_bench()
    data = write_dataset(tmp_path / "data", seed=1)
    bert = make_tiny_bert_dir(tmp_path / "bert", words=TINY_WORDS)
    runs = []
    for name in ("a", "b"):
        argv = ["--dataset", str(data), "--out", str(tmp_path / name), "--steps", "12,12,12", "--seed", "3",
                "--codebook-sizes", "8,4,4", "--sid-epochs", "3", "--eval-batch-size", "16",
                "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--no-progress", "--model-dir", str(bert),
                "--preset", "tiny", "--model-overrides", '{"num_hidden_layers": 2}',
                "--train-overrides", '{"sft": {"lr": 0.02}}',
                "--sid-overrides", '{"cooccurrence_weight": 0.5}', "--sft-only"]
        runs.append(bench.main(argv))
    assert (np.load(tmp_path / "a" / "sid" / "codes.npy") == np.load(tmp_path / "b" / "sid" / "codes.npy")).all()
    for model in ("plum", "sft_only", "popularity", "sasrec"):
        assert runs[0][model] == runs[1][model]
    _check_compare_retrieval(tmp_path, runs[0])
    _check_run_metadata(tmp_path, runs[0])
    _check_resume_training_settings(bench, tmp_path, argv, runs[0])
    _check_resume_model_settings(bench, tmp_path, argv, runs[0])


def _check_compare_retrieval(tmp_path, run):
    # per-user ranks kept beside each evaluation: compare_retrieval pairs two runs (identical here: 0 +- 0)
    # and two models of one run (PLUM vs SASRec: the difference of their table rows)
    cmp_mod = load_script("compare_retrieval")
    for model in ("plum", "sft_only", "sasrec"):
        with np.load(tmp_path / "a" / f"eval_{model}.ranks.npz") as z:
            assert int(z["k"]) == 10 and len(z["ranks"]) == run["metadata"]["test_users"]
            assert float(((z["ranks"] >= 0) & (z["ranks"] < 10)).mean()) == run[model]["recall@10"]
    same = cmp_mod.main([str(tmp_path / "a"), str(tmp_path / "b")])
    assert all(r["b_minus_a"] == 0.0 and r["paired_se"] == 0.0 for r in same.values())
    vs = cmp_mod.main([str(tmp_path / "a"), f"{tmp_path / 'a'}:sasrec", "--json", str(tmp_path / "cmp.json")])
    for m in ("recall@5", "ndcg@5", "recall@10", "ndcg@10"):
        assert vs[m]["a"] == pytest.approx(run["plum"][m], abs=1e-12)
        assert vs[m]["b_minus_a"] == pytest.approx(run["sasrec"][m] - run["plum"][m], abs=1e-12)
    assert json.loads((tmp_path / "cmp.json").read_text())["metrics"]["recall@10"] == vs["recall@10"]
    with pytest.raises(SystemExit, match="eval_plum_valid.ranks.npz does not exist"):
        cmp_mod.main([str(tmp_path / "a"), str(tmp_path / "b"), "--split", "valid"])
    with pytest.raises(SystemExit, match="kept within the top 10 only"):
        cmp_mod.main([str(tmp_path / "a"), str(tmp_path / "b"), "--ks", "20"])


def _check_run_metadata(tmp_path, run):
    assert run["metadata"]["plan"]["steps"] == {"cpt": 12, "sft": 12, "sasrec": 12}
    assert run["metadata"]["budget_minutes"] is None  # pinned steps: no budget
    assert run["metadata"]["model_preset"] == "tiny"
    assert run["metadata"]["model_overrides"] == {"num_hidden_layers": 2}
    assert run["metadata"]["model_config"]["num_hidden_layers"] == 2
    assert run["metadata"]["model_config"]["hidden_size"] == 128
    assert json.loads((tmp_path / "a" / "sft" / "model" / "config.json").read_text())["num_hidden_layers"] == 2
    assert run["metadata"]["sid_overrides"] == {"cooccurrence_weight": 0.5}
    assert json.loads((tmp_path / "a" / "sid" / "config.json").read_text())["config"]["cooccurrence_weight"] == 0.5
    # --train-overrides reach training: SFT's logged lr follows the 0.02 schedule (the default is 3e-3)
    assert run["metadata"]["train_overrides"] == {"sft": {"lr": 0.02}}
    assert run["metadata"]["train_config"]["sft"]["lr"] == 0.02
    from plumrec.train import TrainConfig
    from plumrec.train.optim import lr_lambda

    for stage, peak in (("sft", 0.02), ("cpt", 3e-3)):
        rows = [json.loads(r) for r in (tmp_path / "a" / stage / "metrics.jsonl").read_text().splitlines()]
        schedule = lr_lambda(TrainConfig(steps=12, warmup_steps=1))
        assert [r["lr"] for r in rows] == pytest.approx([peak * schedule(r["step"]) for r in rows])


def _check_resume_training_settings(bench, tmp_path, argv, run):
    # resuming with other model or training settings is refused, naming the effective setting
    with pytest.raises(ValueError, match=r"trained with sft.lr=0.02, but this run's settings give 0.003"):
        bench.main([a for a in argv if a not in ("--train-overrides", '{"sft": {"lr": 0.02}}')])
    # the effective settings are compared, not the overrides' spelling: the default given explicitly
    # resumes (everything cached: the same numbers) ...
    ema = {k: load_defaults()["sft"][k] for k in ("ema_decay", "ema_warmup")}
    spelled = [a if a != '{"sft": {"lr": 0.02}}' else json.dumps({"sft": {"lr": 0.02, **ema}}) for a in argv]
    assert bench.main(spelled)["plum"] == run["plum"]
    # ... and a default changed since OUT was trained is caught (OUT's record edited to another default)
    plan_path = tmp_path / "b" / "plan.json"  # argv is the second run's
    plan = json.loads(plan_path.read_text())
    assert {k: plan["settings"]["train_config"]["sft"][k] for k in ema} == ema
    plan["settings"]["train_config"]["sft"]["ema_decay"] = 0.0
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=rf"trained with sft.ema_decay=0.0, but this run's settings give "
                                         rf"{ema['ema_decay']} .*"
                                         r"""--train-overrides '\{"sft": \{"ema_decay": 0.0\}\}'"""):
        bench.main(argv)
    # an OUT planned before the effective settings were kept compares the overrides given, as it did
    del plan["settings"]["train_config"]
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r'trained with --train-overrides \{"sft": \{"lr": 0.02\}\}, not \{\}'):
        bench.main([a for a in argv if a not in ("--train-overrides", '{"sft": {"lr": 0.02}}')])
    assert bench.main(argv)["plum"] == run["plum"]


def _check_resume_model_settings(bench, tmp_path, argv, run):
    plan_path = tmp_path / "b" / "plan.json"  # argv is the second run's
    # the model is compared by its effective config, not by the options' spelling: tiny without overrides
    # has the same two layers, is this OUT's model and resumes it (everything cached) ...
    assert bench.main([*argv, "--model-overrides", "{}"])["plum"] == run["plum"]
    # ... another depth or width is refused, naming the field and OUT's own options
    given = r"""\(--preset tiny --model-overrides '\{"num_hidden_layers": 2\}'\)"""
    with pytest.raises(ValueError, match=r"trained with the model's num_hidden_layers=2 " + given + ", but .* give 1"):
        bench.main([*argv, "--model-overrides", '{"num_hidden_layers": 1}'])
    with pytest.raises(ValueError, match=r"trained with the model's hidden_size=128 .* give 256"):
        bench.main([*argv, "--preset", "small"])
    # an OUT planned before the effective model config was kept has it rebuilt from its preset and overrides
    plan = json.loads(plan_path.read_text())
    assert plan["settings"]["model_config"] == model_config("tiny", {"num_hidden_layers": 2})
    del plan["settings"]["model_config"]
    plan_path.write_text(json.dumps(plan))
    assert bench.main([*argv, "--model-overrides", "{}"])["plum"] == run["plum"]
    with pytest.raises(ValueError, match=r"trained with the model's num_hidden_layers=2 .* give 3"):
        bench.main([*argv, "--model-overrides", '{"num_hidden_layers": 3}'])
    # ... and one whose preset no longer exists compares the options as given
    plan["settings"]["preset"] = "retired"
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(ValueError, match='trained with --preset "retired", not "tiny"'):
        bench.main(argv)
    plan["settings"]["preset"] = "tiny"
    plan_path.write_text(json.dumps(plan))
    # resuming on SIDs fitted with another tokenizer config is refused, naming the field
    with pytest.raises(ValueError, match="sid.cooccurrence_weight=0.5, the run config says 1.0"):
        bench.main([*argv[:-3], "--sid-overrides", '{"cooccurrence_weight": 1.0}', "--sft-only"])


def test_bench_retrieval_extra_embeddings(tmp_path):
    """--extra-embeddings are fused into the SIDs (the tokenizer's input widths: text, extra, SASRec's
    table), a resume without them or without the collaborative SIDs is refused, and a file with the wrong
    number of rows is an error naming the option."""
    bench = load_bench()
    data = write_dataset(tmp_path / "data", seed=2)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "collab.npy", rng.normal(size=(48, 5)).astype(np.float32))
    np.save(tmp_path / "short.npy", rng.normal(size=(47, 5)).astype(np.float32))
    argv = ["--dataset", str(data), "--out", str(tmp_path / "o"), "--steps", "10,10,10", "--codebook-sizes", "8,4,4",
            "--sid-epochs", "3", "--eval-batch-size", "16", "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
            "--no-progress", "--preset", "tiny",
            "--model-dir", str(make_tiny_bert_dir(tmp_path / "bert", words=TINY_WORDS))]
    res = bench.main([*argv, "--extra-embeddings", str(tmp_path / "collab.npy")])
    text_dim = np.load(tmp_path / "o" / "item_embeddings.npy").shape[1]
    assert json.loads((tmp_path / "o" / "sid" / "config.json").read_text())["input_dims"] == [text_dim, 5, 64]
    assert res["metadata"]["extra_embeddings"] == [str(tmp_path / "collab.npy")]
    fitted = r"widths \[%d, 5, 64\], data.embeddings have " % text_dim
    with pytest.raises(ValueError, match=fitted + r"\[%d, 64\].*--no-collaborative-sids for an OUT"
                       % text_dim):
        bench.main(argv)
    with pytest.raises(ValueError, match=fitted + r"\[%d, 5\]" % text_dim):
        bench.main([*argv, "--extra-embeddings", str(tmp_path / "collab.npy"), "--no-collaborative-sids"])
    np.save(tmp_path / "other.npy", rng.normal(size=(48, 5)).astype(np.float32))  # same width, other values
    with pytest.raises(ValueError, match="fitted on other embeddings"):
        bench.main([*argv, "--extra-embeddings", str(tmp_path / "other.npy")])
    assert bench.main([*argv, "--extra-embeddings", str(tmp_path / "collab.npy")])["plum"] == res["plum"]
    with pytest.raises(ValueError, match="--extra-embeddings: .*short.npy must be a finite"):
        bench.main([*argv[:3], str(tmp_path / "o2"), *argv[4:], "--extra-embeddings", str(tmp_path / "short.npy")])


def test_bench_retrieval_sasrec_overrides(tmp_path):
    """--sasrec-overrides reach the SASRec baseline and, with --collaborative-sids, the SIDs (the tokenizer's
    input widths: text, SASRec's table at the overridden width); a resume with another SASRec config is
    refused naming the field and OUT's own option, and the same config spelled otherwise resumes."""

    bench = load_bench()
    data = write_dataset(tmp_path / "data", seed=4)
    out = tmp_path / "o"
    argv = ["--dataset", str(data), "--out", str(out), "--steps", "10,10,10", "--codebook-sizes", "8,4,4",
            "--sid-epochs", "3", "--eval-batch-size", "16", "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
            "--no-progress", "--preset", "tiny",
            "--model-dir", str(make_tiny_bert_dir(tmp_path / "bert", words=TINY_WORDS))]
    assert bench.parse_args(argv).sasrec_config == {"hidden_size": 64, "num_layers": 2, "num_heads": 1,
                                                    "dropout": 0.1}  # the baseline's defaults
    res = bench.main([*argv, "--sasrec-overrides", '{"hidden_size": 12, "num_heads": 2, "num_layers": 1}'])
    text_dim = np.load(out / "item_embeddings.npy").shape[1]
    assert np.load(out / COLLAB_FILE).shape == (48, 12)
    assert json.loads((out / "sid" / "config.json").read_text())["input_dims"] == [text_dim, 12]
    state = load_checkpoint(out / "sasrec" / "checkpoint", tensors=True)["model"]
    assert sum(1 for k in state if k.endswith("qkv.weight")) == 1 and state["item_embedding.weight"].shape[1] == 12
    meta = res["metadata"]
    assert meta["sasrec_overrides"] == {"hidden_size": 12, "num_heads": 2, "num_layers": 1}
    assert meta["sasrec_config"] == {"hidden_size": 12, "num_layers": 1, "num_heads": 2, "dropout": 0.1}
    given = r"""\(--sasrec-overrides '\{"hidden_size": 12, "num_heads": 2, "num_layers": 1\}'\)"""
    with pytest.raises(ValueError, match=r"with the SASRec baseline's hidden_size=12 " + given + ", but .* give 64"):
        bench.main(argv)
    with pytest.raises(ValueError, match=r"SASRec baseline's num_layers=1 .* give 2"):
        bench.main([*argv, "--sasrec-overrides", '{"hidden_size": 12, "num_heads": 2}'])
    spelled = '{"num_layers": 1, "hidden_size": 12, "num_heads": 2, "dropout": 0.1}'  # the same config
    assert bench.main([*argv, "--sasrec-overrides", spelled])["sasrec"] == res["sasrec"]
    # an OUT planned before the option existed trained the defaults: it resumes without it, and refuses others
    plan = json.loads((out / "plan.json").read_text())
    for k in ("sasrec_overrides", "sasrec_config"):
        del plan["settings"][k]
    (out / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r"SASRec baseline's hidden_size=64 \(--sasrec-overrides '\{\}'\), .* give 12"):
        bench.main([*argv, "--sasrec-overrides", spelled])


def test_bench_retrieval_sid_init_scale(tmp_path):
    """--sid-init-scale reaches the model's initialisation: the base model of that run config is the plain
    one plus init_sid_embeddings of the run's fitted codewords (seed + SID_INIT_SEED_OFFSET), 0 is off; it
    is kept in OUT's plan, and a resume with another value (or without it) is refused naming the option."""
    import torch

    from plumrec.model import init_sid_embeddings
    from plumrec.sid import SemanticIdTokenizer

    bench = load_bench()
    data = write_dataset(tmp_path / "data", seed=5)
    out = tmp_path / "o"
    argv = ["--dataset", str(data), "--out", str(out), "--steps", "10,10,10", "--codebook-sizes", "8,4,4",
            "--sid-epochs", "3", "--eval-batch-size", "16", "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
            "--no-progress", "--seed", "3", "--preset", "tiny",
            "--model-dir", str(make_tiny_bert_dir(tmp_path / "bert", words=TINY_WORDS))]
    res = bench.main([*argv, "--sid-init-scale", "0.5"])
    assert res["metadata"]["sid_init_scale"] == 0.5
    assert json.loads((out / "plan.json").read_text())["settings"]["sid_init_scale"] == 0.5

    def base(scale):
        args = bench.parse_args([*argv, "--sid-init-scale", str(scale)])
        ws = Workspace(run_config(args, out, out / "item_embeddings.npy", args.steps))
        return stages.base_model(ws, ws.sid()[2])

    (plain, vocab, _), (inited, _, _) = base(0), base(0.5)
    init_sid_embeddings(plain, vocab, SemanticIdTokenizer.load(out / "sid").codewords, scale=0.5,
                        seed=3 + stages.SID_INIT_SEED_OFFSET)
    for (k, a), b in zip(plain.state_dict().items(), inited.state_dict().values()):
        assert torch.equal(a, b), k
    for given, was in (([], "0.5, not 0.0"), (["--sid-init-scale", "0.25"], "0.5, not 0.25")):
        with pytest.raises(ValueError, match=f"--sid-init-scale {was}"):
            bench.main([*argv, *given])
    assert bench.main([*argv, "--sid-init-scale", "0.5"])["plum"] == res["plum"]  # its own setting resumes
    ws = Workspace(run_config(bench.parse_args(argv), out, out / "item_embeddings.npy", None))
    ws.cfg["model"]["sid_init_scale"] = -1
    with pytest.raises(ValueError, match="model.sid_init_scale must be a finite number >= 0"):
        stages.base_model(ws, ws.sid()[2])


def test_bench_retrieval_item_attributes(tmp_path, capsys):
    """--item-attributes auto fuses the dataset folder's *_item2attributes.json into the SIDs (input widths:
    text, attributes, SASRec's table), its multi-hot rows written to OUT; a resume without it (the default,
    none) is refused naming --item-attributes none; a missing file or two candidates is an error naming the
    option."""
    bench = load_bench()
    from plumrec.data import load_dataset, load_item_attributes

    data = write_dataset(tmp_path / "data", seed=3)
    attrs = {str(i + 1): [100 + i // 12, 200 + i % 3] for i in range(47)}  # group "brand" + a category; 48 unlisted
    (data / "Tiny_item2attributes.json").write_text(json.dumps(attrs))
    out = tmp_path / "o"
    argv = ["--dataset", str(data), "--out", str(out), "--steps", "10,10,10", "--codebook-sizes", "8,4,4",
            "--sid-epochs", "3", "--eval-batch-size", "16", "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
            "--no-progress", "--preset", "tiny",
            "--model-dir", str(make_tiny_bert_dir(tmp_path / "bert", words=TINY_WORDS))]
    assert bench.parse_args(argv).item_attributes is None  # off by default
    res = bench.main([*argv, "--item-attributes", "auto"])
    log = capsys.readouterr().out
    assert "item attributes: 7 from" in log and "47 of 48 items have some" in log
    want = load_item_attributes(data / "Tiny_item2attributes.json", load_dataset(data).item_ids)
    np.testing.assert_array_equal(np.load(out / ATTR_FILE), want)
    assert want.shape == (48, 7) and not want[47].any()
    text_dim = np.load(out / "item_embeddings.npy").shape[1]
    assert json.loads((out / "sid" / "config.json").read_text())["input_dims"] == [text_dim, 7, 64]
    assert res["metadata"]["item_attributes"] == str((data / "Tiny_item2attributes.json").resolve())
    with pytest.raises(ValueError, match=r"\[%d, 64\].*--item-attributes none" % text_dim):
        bench.main(argv)
    assert bench.main([*argv, "--item-attributes", str(data / "Tiny_item2attributes.json")])["plum"] == res["plum"]
    with pytest.raises(SystemExit):  # a path that does not exist
        bench.parse_args([*argv, "--item-attributes", str(tmp_path / "missing.json")])
    assert "--item-attributes" in capsys.readouterr().err
    (data / "Other_item2attributes.json").write_text("{}")
    with pytest.raises(SystemExit):  # auto with two candidates
        bench.parse_args([*argv, "--item-attributes", "auto"])
    assert "--item-attributes" in capsys.readouterr().err


def test_bench_retrieval_distill(tmp_path):
    """--train-overrides '{"sft": {"distill": d}}' distils the bench's own trained SASRec into SFT (0.5 by
    default): the SFT log has the teacher's CE beside the one-hot one, the plan keeps the setting, and a resume
    with another one is refused naming sft.distill; an OUT planned before sft.distill was recorded trained
    without it, and a resume at the new default is refused so; a distill outside [0, 1] or a bad temperature
    is a parse error."""
    bench = load_bench()
    assert load_defaults()["sft"]["distill"] == 0.5  # the packaged default (amazon.toml)
    data = write_dataset(tmp_path / "data", seed=2)
    out = tmp_path / "o"
    argv = ["--dataset", str(data), "--out", str(out), "--steps", "4,6,10", "--codebook-sizes", "8,4,4",
            "--sid-epochs", "3", "--eval-batch-size", "16", "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
            "--no-progress", "--preset", "tiny", "--sft-eval-epochs", "0",
            "--model-dir", str(make_tiny_bert_dir(tmp_path / "bert", words=TINY_WORDS))]
    kd = ["--train-overrides", '{"sft": {"distill": 0.5, "distill_temperature": 2.0}}']
    res = bench.main([*argv, *kd])
    rows = [json.loads(l) for l in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["step"] == 6 and all(r["distill"] > 0 and r["ce"] > 0 for r in rows)
    assert all(abs(r["loss"] - (0.5 * r["ce"] + 0.5 * r["distill"] + r["aux"])) < 1e-5 for r in rows)
    plan = json.loads((out / "plan.json").read_text())["settings"]["train_config"]["sft"]
    assert plan["distill"] == 0.5 and plan["distill_temperature"] == 2.0
    assert 0 <= res["plum"]["recall@10"] <= 1
    with pytest.raises(ValueError, match=r"sft.distill=0.5, but this run's settings give 0.0"):
        bench.main([*argv, "--train-overrides", '{"sft": {"distill": 0.0, "distill_temperature": 2.0}}'])
    with pytest.raises(ValueError, match=r"sft.distill_temperature=2.0, but this run's settings give 1.0"):
        bench.main(argv)  # the default distils at temperature 1
    # an OUT whose record predates sft.distill trained with 0: the default (0.5) is refused, 0 resumes
    plan_path = out / "plan.json"
    plan = json.loads(plan_path.read_text())
    for key in ("distill", "distill_temperature"):
        del plan["settings"]["train_config"]["sft"][key]
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r"sft.distill=0.0, but this run's settings give 0.5 .*"
                                         r"""--train-overrides '\{"sft": \{"distill": 0.0\}\}'"""):
        bench.main(argv)
    assert bench.main([*argv, "--train-overrides", '{"sft": {"distill": 0}}'])["plum"] == res["plum"]
    for bad in ('{"sft": {"distill": 1.5}}', '{"sft": {"distill_temperature": 0}}'):
        with pytest.raises(SystemExit):
            bench.parse_args([*argv, "--train-overrides", bad])
