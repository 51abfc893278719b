"""The ``plum`` CLI: a scaled-down ``plum demo``, the stage subcommands over a TOML
config, bad input, and the trie timing demo (``plum trie-demo``)."""
import json
import subprocess
import sys

import pytest
from tiny_training import run_torchrun

from plumrec.cli import RESULT_KEYS, main

SMALL = {
    "data": {"synthetic": {"num_items": 160, "num_users": 80, "num_topics": 4, "subtopics_per_topic": 2,
                           "max_length": 10}},
    "sid": {"codebook_sizes": [8, 4, 4], "epochs": 6, "warmup_epochs": 2, "hidden_dims": [32],
            "latent_dim": 8, "batch_size": 64},
    "cpt": {"steps": 3, "max_tokens": 512, "warmup_steps": 1},
    "sft": {"steps": 3, "max_tokens": 512, "warmup_steps": 1},
    "sasrec": {"steps": 3, "max_tokens": 256},
    "eval": {"beam_width": 10, "batch_size": 32},
}


def _toml(d: dict, prefix: str = "") -> str:
    """A tiny TOML writer for the nested dict above (tables of scalars/lists)."""
    lines, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((f"{prefix}{k}", v))
        else:
            lines.append(f"{k} = {json.dumps(v)}")
    out = "\n".join(lines) + "\n"
    for name, t in tables:
        out += f"\n[{name}]\n" + _toml(t, name + ".")
    return out


def test_demo_smoke_writes_results_for_every_model(tmp_path, capsys):
    cfg = tmp_path / "small.json"
    cfg.write_text(json.dumps(SMALL))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--config", str(cfg), "--no-progress"]) == 0
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert {"plum", "sft_only", "popularity", "sasrec"} <= res.keys()
    for name in ("plum", "sft_only", "popularity", "sasrec"):
        assert set(RESULT_KEYS) <= res[name].keys()
        assert all(0.0 <= res[name][k] <= 1.0 for k in RESULT_KEYS)
        assert res[name]["recall@5"] <= res[name]["recall@10"]
    assert res["plum"]["invalid_rate"] == 0.0 and res["sft_only"]["invalid_rate"] == 0.0
    assert res["details"]["test_users"] == 80
    out = capsys.readouterr().out
    assert "PLUM demo" in out and "sasrec" in out
    for d in ("sid", "cpt/model", "sft/model", "sft_only/model", "sasrec"):
        assert (tmp_path / "demo" / d).exists()


def test_demo_with_the_jax_backend(tmp_path, capsys):
    """``plum demo --backend jax``: CPT, SFT and retrieval on plumrec.jax (the jnp reference kernels on the
    CPU, said in the table's title), plum beside popularity; the models in the torch folder layout, which
    the torch evaluation reads (the same beams: the same metrics within float rounding)."""
    from plumrec.pipeline import Workspace, load_run_config, run_eval

    cfg = tmp_path / "small.json"
    cfg.write_text(json.dumps(SMALL))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--config", str(cfg), "--no-progress",
                 "--backend", "jax"]) == 0
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert {"plum", "popularity"} <= res.keys() and "sasrec" not in res
    assert res["details"]["backend"] == "jax" and res["details"]["kernels"] == "jnp reference (cpu)"
    assert res["plum"]["invalid_rate"] == 0.0 and all(0.0 <= res["plum"][k] <= 1.0 for k in RESULT_KEYS)
    assert "jax backend (jnp reference (cpu) kernels)" in capsys.readouterr().out
    rows = [json.loads(l) for l in (tmp_path / "demo" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == SMALL["sft"]["steps"]
    torch_side = run_eval(Workspace(load_run_config(str(cfg), workdir=str(tmp_path / "demo"))))
    for k in RESULT_KEYS:
        assert abs(torch_side[k] - res["plum"][k]) <= 1e-9, k
    with pytest.raises(SystemExit):
        main(["demo", "--backend", "tensorflow"])


def test_stage_subcommands_over_a_toml_config(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'workdir = "{tmp_path / "work"}"\n' + _toml(SMALL))
    for cmd in ("sid", "cpt", "sft"):
        assert main([cmd, "--config", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--config", str(cfg)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["invalid_rate"] == 0.0 and "recall@10" in res
    assert {"coverage@10", "entropy@10", "gini@10", "tail_exposure@10", "novelty@10"} <= res.keys()
    # two processes (gloo) split the users and gather the lists: rank 0 prints the one-process result
    (tmp_path / "work" / "eval.json").unlink()
    script = tmp_path / "eval2.py"
    script.write_text(f"import sys\nfrom plumrec.cli import main\nsys.exit(main(['eval', '--config', {str(cfg)!r}]))\n")
    proc = run_torchrun(script, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == res == json.loads((tmp_path / "work" / "eval.json").read_text())
    assert main(["recommend", "--config", str(cfg), "--history", "item_3,item_7", "-k", "4"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert len(recs) == 4 and all(r["item"].startswith("item_") and r["title"] for r in recs)
    with pytest.raises(ValueError, match="unknown item ids"):
        main(["recommend", "--config", str(cfg), "--history", "item_3,nope"])
    # SIDs re-made with other codebooks: the saved model's vocabulary no longer matches
    other = tmp_path / "other.toml"
    other.write_text(cfg.read_text().replace("codebook_sizes = [8, 4, 4]", "codebook_sizes = [8, 8, 4]"))
    assert main(["sid", "--config", str(other), "--no-progress"]) == 0
    with pytest.raises(ValueError, match="SID tokenizer has codebooks"):
        main(["sft", "--config", str(other), "--no-progress"])


def test_sft_distill_trains_the_run_sasrec_as_its_teacher(tmp_path):
    """sft.distill > 0 over the CLI: `plum sft` first trains the run's SASRec baseline (section sasrec,
    WORKDIR/sasrec) and distils it, logging the teacher's CE beside the one-hot one; run_sasrec on the
    finished directory reloads the same weights (what `plum demo` then scores as its baseline)."""
    import torch

    from plumrec.pipeline import Workspace, load_run_config, run_sasrec
    from plumrec.train.checkpoint import load_checkpoint

    cfg = tmp_path / "run.toml"
    small = {**SMALL, "sft": {**SMALL["sft"], "distill": 0.5, "distill_temperature": 2.0}}
    cfg.write_text(f'workdir = "{tmp_path / "work"}"\n' + _toml(small))
    for cmd in ("sid", "cpt", "sft"):
        assert main([cmd, "--config", str(cfg), "--no-progress"]) == 0
    assert load_checkpoint(tmp_path / "work" / "sasrec" / "checkpoint")["step"] == 3
    rows = [json.loads(l) for l in (tmp_path / "work" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and all(r["distill"] > 0 for r in rows)
    assert all(abs(r["loss"] - (0.5 * r["ce"] + 0.5 * r["distill"] + r["aux"])) < 1e-5 for r in rows)
    ws = Workspace(load_run_config(str(cfg)))
    a, b = run_sasrec(ws, progress=False).state_dict(), run_sasrec(ws, progress=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stages_refuse_sids_fitted_with_another_config(tmp_path):
    """A stage reading the SIDs (cpt, sft, eval) under a config whose ``sid`` section or seed changed
    since ``plum sid`` is refused, naming the field, instead of silently using the old SIDs."""
    work = tmp_path / "work"
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({**SMALL, "workdir": str(work)}))
    assert main(["sid", "--config", str(cfg), "--no-progress"]) == 0
    fitted = json.loads((work / "sid" / "inputs.json").read_text())
    assert fitted["seed"] == 0 and fitted["sid"]["codebook_sizes"] == [8, 4, 4]
    assert len(fitted["embeddings_sha256"]) == 2  # the synthetic catalogue's text and meta embeddings
    for change, match in (({"sid": {**SMALL["sid"], "cooccurrence_weight": 2.0}}, r"sid.cooccurrence_weight=0.1, "
                           r"the run config says 2.0: re-run `plum sid`"),
                          ({"sid": {**SMALL["sid"], "epochs": 7}}, r"sid.epochs=6, the run config says 7"),
                          ({"seed": 1}, r"fitted with seed=0, the run config says 1")):
        other = tmp_path / "other.json"
        other.write_text(json.dumps({**SMALL, "workdir": str(work), **change}))
        for cmd in ("cpt", "eval"):
            with pytest.raises(ValueError, match=match):
                main([cmd, "--config", str(other), "--no-progress"] if cmd == "cpt" else [cmd, "--config", str(other)])
    assert main(["cpt", "--config", str(cfg), "--no-progress"]) == 0  # the fitted config still runs
    # a field the fit set but the run config leaves out (so at SIDConfig's default) is compared too
    cfg.write_text(json.dumps({**SMALL, "workdir": str(work), "sid": {**SMALL["sid"], "mask_prob": 0.3}}))
    assert main(["sid", "--config", str(cfg), "--no-progress"]) == 0
    other.write_text(json.dumps({**SMALL, "workdir": str(work)}))
    with pytest.raises(ValueError, match=r"sid.mask_prob=0.3, the run config says 0.5"):
        main(["eval", "--config", str(other)])


def test_stages_from_a_hugging_face_checkpoint(tmp_path, capsys):
    """model.hf_checkpoint: load Qwen3 + its tokenizer.json, add the SID tokens, CPT, SFT, eval."""
    transformers = pytest.importorskip("transformers")
    from plumrec.model.vocab import train_word_tokenizer

    ckpt = tmp_path / "qwen3"
    cfg = transformers.Qwen3Config(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=16, intermediate_size=48)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(ckpt)
    from plumrec.data import make_synthetic_catalogue
    from plumrec.train import grounding_text

    syn = make_synthetic_catalogue(**SMALL["data"]["synthetic"], seed=0)
    train_word_tokenizer([grounding_text(m) for m in syn.data.items], vocab_size=400).save(str(ckpt / "tokenizer.json"))
    run = tmp_path / "run.json"
    run.write_text(json.dumps({**SMALL, "workdir": str(tmp_path / "work"), "model": {"hf_checkpoint": str(ckpt)}}))
    for cmd in ("sid", "cpt", "sft"):
        assert main([cmd, "--config", str(run), "--no-progress"]) == 0
    vocab = json.loads((tmp_path / "work" / "sft" / "model" / "vocab.json").read_text())
    assert vocab["base_size"] == 400 and vocab["codebook_sizes"] == [8, 4, 4]
    capsys.readouterr()
    assert main(["eval", "--config", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["invalid_rate"] == 0.0


def test_bad_config_raises(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cpt": {"stepz": 3}}))
    with pytest.raises(ValueError, match="unknown config key 'cpt.stepz'"):
        main(["sid", "--config", str(bad)])
    from plumrec.pipeline import load_run_config

    cfg = load_run_config(None, cpt={"grad_accum": 2, "fsdp": True}, sft={"steps": 7})
    assert cfg["cpt"]["grad_accum"] == 2 and cfg["cpt"]["steps"] == 80 and cfg["sft"]["steps"] == 7
    with pytest.raises(ValueError, match="unknown config key 'eval.grad_accum'"):
        load_run_config(None, eval={"grad_accum": 2})
    # sid takes SIDConfig's fields, but not its seed (the run's seed is the tokenizer's)
    cfg = load_run_config(None, sid={"cooccurrence_weight": 2.0})
    assert cfg["sid"]["cooccurrence_weight"] == 2.0 and cfg["sid"]["epochs"] == 30
    with pytest.raises(ValueError, match="unknown config key 'sid.seed'"):
        load_run_config(None, sid={"seed": 1})
    with pytest.raises(ValueError, match=".json or .toml"):
        main(["sid", "--config", str(tmp_path / "x.yaml")])
    with pytest.raises(FileNotFoundError, match="run `plum sid` first"):
        main(["cpt", "--workdir", str(tmp_path / "empty"), "--no-progress"])
    from types import SimpleNamespace

    from plumrec.pipeline.stages import exclude_history, sft_dataset, sft_loss

    assert exclude_history(SimpleNamespace(cfg=load_run_config(None))) is False
    assert exclude_history(SimpleNamespace(cfg=load_run_config(None, eval={"exclude_history": True}))) is True
    with pytest.raises(ValueError, match="eval.exclude_history must be true or false"):
        exclude_history(SimpleNamespace(cfg=load_run_config(None, eval={"exclude_history": "yes"})))

    with pytest.raises(ValueError, match="sft.objective must be one of"):
        sft_dataset(SimpleNamespace(cfg=load_run_config(None, sft={"objective": "all"})), None, None)
    with pytest.raises(ValueError, match="sft.loss must be one of"):
        sft_loss(SimpleNamespace(cfg=load_run_config(None, sft={"loss": "sid"})), None)
    # sft.label_smoothing reaches the codebook loss; it is refused with the vocab loss and out of [0, 1)
    vocab = SimpleNamespace(num_levels=2, level_slice=lambda l: slice(10 + 4 * l, 14 + 4 * l))
    assert sft_loss(SimpleNamespace(cfg=load_run_config(None)), vocab).label_smoothing == 0.0
    assert sft_loss(SimpleNamespace(cfg=load_run_config(None, sft={"label_smoothing": 0.1})), vocab).label_smoothing \
        == 0.1
    with pytest.raises(ValueError, match="sft.label_smoothing=0.1 needs sft.loss 'codebook'"):
        sft_loss(SimpleNamespace(cfg=load_run_config(None, sft={"loss": "vocab", "label_smoothing": 0.1})), vocab)
    with pytest.raises(ValueError, match="sft.label_smoothing: label_smoothing must be in"):
        sft_loss(SimpleNamespace(cfg=load_run_config(None, sft={"label_smoothing": 1.5})), vocab)
    # sft.level_weights likewise: reaches the codebook loss, refused with the vocab loss and when malformed
    assert sft_loss(SimpleNamespace(cfg=load_run_config(None)), vocab).level_weights is None
    lw = [2.0] + [1.0] * (vocab.num_levels - 1)
    assert sft_loss(SimpleNamespace(cfg=load_run_config(None, sft={"level_weights": lw})), vocab).level_weights == lw
    with pytest.raises(ValueError, match="sft.level_weights=.* needs sft.loss 'codebook'"):
        sft_loss(SimpleNamespace(cfg=load_run_config(None, sft={"loss": "vocab", "level_weights": lw})), vocab)
    with pytest.raises(ValueError, match="sft.level_weights: level_weights must be a list of"):
        sft_loss(SimpleNamespace(cfg=load_run_config(None, sft={"level_weights": [1.0]})), vocab)
    import numpy as np

    # sft.item_loss: off by default; on, the catalogue comes from the codes; refused with the vocab loss,
    # when negative, and without codes
    vocab.sid_to_tokens = lambda c: np.asarray(c) + np.array([10, 14])
    codes = np.array([[0, 1], [3, 2], [0, 1]])
    assert sft_loss(SimpleNamespace(cfg=load_run_config(None)), vocab, codes).item_loss == 0.0
    on = sft_loss(SimpleNamespace(cfg=load_run_config(None, sft={"item_loss": 0.25})), vocab, codes)
    assert on.item_loss == 0.25 and on.item_codes.tolist() == [[0, 1], [3, 2]]
    with pytest.raises(ValueError, match="sft.item_loss=0.25 needs sft.loss 'codebook'"):
        sft_loss(SimpleNamespace(cfg=load_run_config(None, sft={"loss": "vocab", "item_loss": 0.25})), vocab, codes)
    with pytest.raises(ValueError, match="sft.item_loss: item_loss must be a finite number >= 0"):
        sft_loss(SimpleNamespace(cfg=load_run_config(None, sft={"item_loss": -1})), vocab, codes)
    with pytest.raises(ValueError, match="sft.item_loss: item_loss > 0 needs catalogue"):
        sft_loss(SimpleNamespace(cfg=load_run_config(None, sft={"item_loss": 0.25})), vocab)
    # sft.distill: checked by name, needs the codes and a teacher, refused with the vocab loss
    for bad, msg in (({"distill": 2.0}, "sft.distill: distill must be a number in"),
                     ({"distill": 0.5, "distill_temperature": 0}, "sft.distill_temperature: distill_temperature"),
                     ({"distill": 0.5, "loss": "vocab"}, "sft.distill=0.5 needs sft.loss 'codebook'"),
                     ({"distill": 0.5}, "sft.distill=0.5 needs a teacher")):
        with pytest.raises(ValueError, match=msg):
            sft_loss(SimpleNamespace(cfg=load_run_config(None, sft=bad)), vocab, codes)
    with pytest.raises(ValueError, match="sft.distill: distill > 0 needs catalogue"):
        sft_loss(SimpleNamespace(cfg=load_run_config(None, sft={"distill": 0.5})), vocab, teacher=lambda *a, **k: 0)
    # a training section's TrainConfig fields (here weight averaging) reach the stage's TrainConfig
    from plumrec.pipeline.config import train_config
    assert train_config(load_run_config(None)["sft"], 0, False).ema_decay == 0.0
    assert train_config(load_run_config(None, sft={"ema_decay": 0.999})["sft"], 0, False).ema_decay == 0.999


def test_trie_demo_writes_results(tmp_path, capsys):
    assert main(["trie-demo", "--out", str(tmp_path), "--items", "20000"]) == 0
    res = json.loads((tmp_path / "trie_demo.json").read_text())
    assert res["num_items"] == 20000 and res["num_sids"] == 20000
    assert res["random_sids_present"] < 0.01  # random SIDs are (almost) never in the trie
    assert (tmp_path / "trie.safetensors").exists()
    assert "bytes per item" in capsys.readouterr().out


def test_console_script_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "plumrec.cli", "trie-demo", "--out", str(tmp_path), "--items", "1000"],
                         capture_output=True, text=True, check=True)
    assert "PLUM SID trie demo" in out.stdout
    help_ = subprocess.run([sys.executable, "-m", "plumrec.cli", "--help"], capture_output=True, text=True, check=True)
    assert all(c in help_.stdout for c in ("sid", "cpt", "sft", "eval", "recommend", "demo", "trie-demo"))


@pytest.mark.parametrize("bad, message", [
    (["--lam", "0.1"], "--lam need(s) --explore maxent"),
    (["--explore-policy", "p"], "--explore-policy need(s) --explore maxent"),
    (["--explore", "maxent", "--explore-policy", "p", "--lam", "0.1"], "--explore-policy serves a fitted policy"),
    (["--explore", "maxent", "--lam", "-1"], "--lam must be a finite number >= 0"),
    (["--explore", "maxent", "--lam", "nan"], "--lam must be a finite number >= 0"),
    (["--explore", "maxent", "--iters", "-2"], "--iters must be >= 0"),
    (["--explore", "maxent", "--seed", "-1"], "--seed must be >= 0"),
    (["--explore", "maxent", "-k", "0"], "-k must be >= 1"),
    (["--explore", "softmax"], "invalid choice"),
])
def test_recommend_exploration_flags_are_checked(bad, message, capsys):
    with pytest.raises(SystemExit):
        main(["recommend", "--history", "item_1", *bad])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [(["--lam", "-0.5"], "--lam must be"), (["--max-users", "0"], "--max-users"),
                                          (["--split", "train"], "invalid choice"), (["-k", "0"], "-k must be")])
def test_explore_fit_flags_are_checked(bad, message, capsys):
    with pytest.raises(SystemExit):
        main(["explore-fit", *bad])
    assert message in capsys.readouterr().err


def test_explore_fit_then_recommend_with_the_policy_or_a_fit_on_the_served_users(tmp_path, capsys):
    """`plum explore-fit` saves a policy fitted on the first users of eval.split, printing the gap per
    iteration; `plum recommend --explore maxent` serves it (reproducibly per --seed) or fits one on the
    histories it serves."""
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({**SMALL, "workdir": str(tmp_path / "work")}))
    assert main(["sid", "--config", str(cfg), "--no-progress"]) == 0
    assert main(["sft", "--config", str(cfg), "--no-progress", "--init", "scratch"]) == 0
    capsys.readouterr()
    assert main(["explore-fit", "--config", str(cfg), "--lam", "0.5", "-k", "4", "--iters", "3",
                 "--max-users", "12"]) == 0
    out = capsys.readouterr()
    fit = json.loads(out.out)
    assert fit["users"] == 12 and fit["split"] == "test" and fit["k"] == 4 and len(fit["gaps"]) == 4
    assert "iteration 3: duality gap" in out.err
    policy = tmp_path / "work" / "explore"
    assert fit["policy"] == str(policy) and (policy / "policy.safetensors").exists()
    served = ["recommend", "--config", str(cfg), "--explore", "maxent", "--explore-policy", str(policy),
              "--history", "item_3,item_7", "--history", "item_5", "-k", "4"]
    runs = []
    for seed in ("0", "0", "1"):
        assert main([*served, "--seed", seed]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert len(runs[0]) == 2 and all(len(lst) == 4 for lst in runs[0]) and runs[0] == runs[1]
    assert main(["recommend", "--config", str(cfg), "--explore", "maxent", "--lam", "0.5", "--iters", "2",
                 "--history", "item_3,item_7", "-k", "4", "--no-progress"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert len(recs) == 4 and all(r["item"].startswith("item_") for r in recs)
    with pytest.raises(ValueError, match="policy.json not found: the folder of an exploration policy"):
        main([*served[:6], str(tmp_path), *served[7:]])
