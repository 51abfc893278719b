"""Training loop: learning, the weight average, non-finite steps, 2-process gloo DDP via torchrun (checkpoints and
resume: test_checkpoint.py)."""
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_training import tiny_lm_and_data as _setup
from tiny_training import tiny_train_config as _cfg

from plumrec.train import lm_loss, train
from plumrec.train.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def test_training_reduces_the_loss(tmp_path):
    model, data = _setup()
    train(model, data, _cfg(steps=25, lr=1e-2), tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 25 and rows[-1]["step"] == 25
    first, last = np.mean([r["ce"] for r in rows[:3]]), np.mean([r["ce"] for r in rows[-3:]])
    assert last < first - 0.5
    assert {"loss", "ce", "aux", "grad_norm", "lr", "epoch", "tokens_per_s"} <= rows[0].keys()


@pytest.mark.parametrize("d,w", [(0.3, 10.0), (0.6, 3.0), (0.45, 1.0)])
def test_ema_is_the_moving_average_of_the_weights_after_each_step(tmp_path, d, w):
    """``ema_decay=d, ema_warmup=W``: the model ends as ``ema_t = d_t ema_{t-1} + (1 - d_t) p_t``
    with ``d_t = min(d, (1 + t) / (W + t))``, ``ema_0`` the initial weights and ``p_t`` the raw
    weights after step t. The reference is float64 over a raw run (same seed, no EMA) stopped and
    resumed after every step; the EMA run's checkpoint keeps the raw weights (what training resumes).
    W 10: d_t = 2/11, 3/12, then the cap 0.3 from t = 3; W 3: 2/4, then 0.6 from t = 2 (both branches
    each); W 1: no warm-up, 0.45 from the first step."""
    steps = 6
    raw, data = _setup(dropout=0.3)
    ref = {n: p.detach().double().clone() for n, p in raw.named_parameters()}
    for t in range(1, steps + 1):
        train(raw, data, _cfg(steps=steps, lr=3e-2), tmp_path / "raw", stop_after=1)
        dt = min(d, (1 + t) / (w + t))
        ref = {n: dt * ref[n] + (1 - dt) * p.detach().double() for n, p in raw.named_parameters()}
    avg, _ = _setup(dropout=0.3)
    train(avg, data, _cfg(steps=steps, lr=3e-2, ema_decay=d, ema_warmup=w), tmp_path / "ema")
    gap = max(float((ref[n] - p.detach().double()).abs().max()) for n, p in raw.named_parameters())
    assert gap > 1e-3, "the average must differ from the raw weights for this test to mean anything"
    for n, p in avg.named_parameters():
        torch.testing.assert_close(p.detach().double(), ref[n], rtol=1e-6, atol=1e-7, msg=n)
    ckpt = load_checkpoint(tmp_path / "ema" / "checkpoint", tensors=True)
    assert ckpt["config"]["ema_decay"] == d and ckpt["config"]["ema_warmup"] == w
    for n, p in raw.named_parameters():
        assert torch.equal(ckpt["model"][n], p.detach()), n
        torch.testing.assert_close(ckpt["ema_state"][n].double(), ref[n], rtol=1e-6, atol=1e-7)


def test_ema_warns_when_the_decay_is_never_reached(tmp_path):
    """In 6 steps the warm-up (1 + t) / (10 + t) ends at 7/16: ``ema_decay=0.5`` (or 0.9) never takes
    effect and gives the same average as any decay >= 7/16, which the run says; 0.3 binds, no warning."""
    data = _setup()[1]
    with pytest.warns(UserWarning, match=r"ema_decay=0.5 is never reached in 6 steps: the warm-up \(1 \+ t\) / "
                                         r"\(10 \+ t\).*any ema_decay >= 0.43750"):
        train(_setup()[0], data, _cfg(ema_decay=0.5), tmp_path / "a")
    with pytest.warns(UserWarning, match="ema_decay=0.9 is never reached"):
        train(_setup()[0], data, _cfg(ema_decay=0.9), tmp_path / "b")
    a = load_checkpoint(tmp_path / "a" / "checkpoint", tensors=True)["ema_state"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint", tensors=True)["ema_state"]
    assert all(torch.equal(a[n], b[n]) for n in a), "decays above the warm-up must give the same average"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train(_setup()[0], data, _cfg(ema_decay=0.3), tmp_path / "c")
        train(_setup()[0], data, _cfg(ema_decay=0.5, ema_warmup=3), tmp_path / "d")  # 3: 0.5 binds from t = 1


def test_bf16_autocast_step_tracks_float32(tmp_path):
    """bf16 autocast (on by default on CUDA) through the kernels' bf16 paths: the first
    step's loss stays within bf16 error of the float32 one."""
    m32, data = _setup()
    m16, _ = _setup()
    train(m32, data, _cfg(steps=2, bf16=False), tmp_path / "f32")
    r16 = train(m16, data, _cfg(steps=2, bf16=True), tmp_path / "bf16")
    rows32 = [json.loads(l) for l in (tmp_path / "f32" / "metrics.jsonl").read_text().splitlines()]
    rows16 = [json.loads(l) for l in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows16[0]["ce"] - rows32[0]["ce"]) < 2e-2 * rows32[0]["ce"]
    assert np.isfinite(r16["loss"]) and all(p.dtype == torch.float32 for p in m16.parameters())


class _Poisoned:
    """``lm_loss`` plus ``value`` (NaN, inf) in its ``ce`` part at the given calls (1-based, one call per
    micro-batch): a non-finite loss whose gradient stays finite."""

    def __init__(self, calls, value=float("nan")):
        self.calls, self.value, self.n = set(calls), value, 0

    def __call__(self, model, batch):
        loss, parts = lm_loss(model, batch)
        self.n += 1
        if self.n in self.calls:
            loss, parts = loss + self.value, {**parts, "ce": parts["ce"] + self.value}
        return loss, parts


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nonfinite_loss_stops_the_run_and_nonfinite_skip_resumes_it(tmp_path, value):
    """Step 4's loss is not finite: the run stops before its update and writes no checkpoint after it;
    resumed with ``nonfinite="skip"`` (a field a resume may change) the step is skipped, warned about and
    counted (``skipped`` in metrics.jsonl, the checkpoint and the returned row), leaving the weights as
    they were."""
    model, data = _setup()
    with pytest.raises(FloatingPointError, match=rf"step 4: the loss part 'ce' is not finite \(loss={value}, "
                                                 rf"ce={value}, aux=.*\); .*the last checkpoint \(step 3\)"):
        train(model, data, _cfg(checkpoint_every=1), tmp_path, loss_fn=_Poisoned({4}, value))
    assert sorted(p.name for p in tmp_path.glob("checkpoint*")) == ["checkpoint", "checkpoint-2",
                                                                   "checkpoint-3"]
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3]
    resumed = _setup(seed=1)[0]
    with pytest.warns(UserWarning, match=r"step 4: the loss part 'ce' is not finite .*; the step is skipped "
                                         r"\(nonfinite='skip'\), 1 so far"):
        last = train(resumed, data, _cfg(checkpoint_every=1, nonfinite="skip"), tmp_path, loss_fn=_Poisoned({1}, value),
                     stop_after=1)
    assert last["step"] == 4 and last["skipped"] == 1 and last["loss"] is None and last["ce"] is None
    c3, c4 = (load_checkpoint(tmp_path / f"checkpoint-{s}", tensors=True) for s in (3, 4))
    assert c4["skipped"] == 1 and all(torch.equal(c3["model"][k], v) for k, v in c4["model"].items())
    assert train(_setup()[0], data, _cfg(nonfinite="skip"), tmp_path)["skipped"] == 1
    assert [(r["step"], r["skipped"]) for r in _rows(tmp_path)] == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 1)]


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_a_nonfinite_gradient_stops_the_run_before_any_update(tmp_path, grad_clip):
    """A NaN gradient under a finite loss: the gradient norm (computed without clipping too) stops step 1;
    the weights are untouched and no checkpoint is written."""
    model, data = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    next(model.parameters()).register_hook(lambda g: g * float("nan"))
    with pytest.raises(FloatingPointError, match=r"step 1: the gradient norm is not finite \(loss=[0-9.]+, .*"
                                                 r"grad_norm=nan\); .*no checkpoint was written to"):
        train(model, data, _cfg(grad_clip=grad_clip), tmp_path)
    assert not list(tmp_path.glob("checkpoint*"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


_DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path[:0] = [{tests!r}, {support!r}]
    from tiny_training import tiny_lm_and_data as _setup, tiny_train_config as _cfg
    from plumrec.train import train
    from plumrec.train.distributed import shutdown_distributed
    from test_loop import _loss
    dist.init_process_group("gloo")
    model, data = _setup(dtype=torch.float64)
    train(model, data, _cfg(fsdp={fsdp}, ema_decay={ema}), {out!r}, loss_fn=_loss({loss!r}, data))
    from plumrec.train.distributed import full_state
    sd, _ = full_state(model, torch.optim.SGD(model.parameters(), lr=0.1))
    if dist.get_rank() == 0:
        torch.save(sd, {out!r} + "/final.pt")
    shutdown_distributed()
    # Skip interpreter finalization: a gloo worker thread that drops the last reference to a
    # finished all-gather's tensors while Python finalizes aborts the process (torch bug, see
    # shutdown_distributed; seen here ~1 run in 40 under load, after both ranks had finished).
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
""")


def _loss(name, data):
    from plumrec.train import CodebookLoss, lm_loss

    if name == "codebook-item":
        return CodebookLoss(data.vocab, item_loss=0.5, catalogue=data.sid_tokens)
    if name == "codebook-distill":  # a seeded random float64 SASRec teacher, the same on every rank
        from plumrec.baselines import SASRec, SASRecConfig

        with torch.random.fork_rng():
            torch.manual_seed(11)
            teacher = SASRec(SASRecConfig(len(data.sid_tokens), hidden_size=16, num_layers=1, max_len=8)).double()
        return CodebookLoss(data.vocab, distill=0.5, teacher=teacher, catalogue=data.sid_tokens)
    return lm_loss if name == "lm" else CodebookLoss(data.vocab)


@pytest.mark.parametrize("fsdp,loss,ema", [(False, "lm", 0.0), (True, "lm", 0.0), (False, "codebook", 0.0),
                                           (True, "codebook", 0.0), (False, "lm", 0.5),
                                           (False, "codebook-item", 0.0), (False, "codebook-distill", 0.0)])
def test_two_process_gloo_matches_gradient_accumulation(tmp_path, fsdp, loss, ema):
    """torchrun with 2 CPU processes (gloo): rank r takes micro-batch r, DDP averages the
    gradients, which is what one process does with grad_accum=2 over the same stream. With the
    codebook loss the distributed run slices full logits, the single one multiplies the slices
    (its item_loss and distill terms too, logged as ``item`` / ``distill`` by both). Both run in
    float64: in float32 the two
    summation orders left Adam-normalised updates of near-cancelling gradients ~1e-3 apart
    relatively (one weight in 1,024 failed a CI run at rtol 1e-4), so float32 needed a loose
    tolerance and still flaked; float64 agrees to ~1e-13 and is checked at rtol 1e-9."""
    script = tmp_path / "ddp.py"
    out = tmp_path / "ddp"
    here = str(Path(__file__).resolve().parent)
    support = str(Path(__file__).resolve().parents[2] / "support")
    script.write_text(_DDP_SCRIPT.format(tests=here, support=support, out=str(out), fsdp=fsdp, loss=loss, ema=ema))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ref, data = _setup(dtype=torch.float64)
    train(ref, data, _cfg(grad_accum=2, ema_decay=ema), tmp_path / "single", loss_fn=_loss(loss, data))
    ddp = torch.load(out / "final.pt", weights_only=True)
    for k, v in ref.state_dict().items():
        assert ddp[k].dtype == v.dtype == torch.float64, k
        torch.testing.assert_close(ddp[k], v, rtol=1e-9, atol=1e-11)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(l) for l in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in single], rtol=1e-9)
    for part in ("item", "distill"):  # an optional loss term, logged by both
        assert all((part in r) == (loss == f"codebook-{part}") for r in rows + single)
        if loss == f"codebook-{part}":
            np.testing.assert_allclose([r[part] for r in rows], [r[part] for r in single], rtol=1e-9)
            assert all(r[part] > 0 for r in rows)
    ckpt = load_checkpoint(out / "checkpoint", tensors=True)
    assert ckpt["world_size"] == 2 and ckpt["model"].keys() == ref.state_dict().keys()
    assert ckpt["ema"] == bool(ema) and ckpt["ema_state"].keys() == ({n for n, _ in ref.named_parameters()} if ema
                                                                     else set())


def _params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_evaluation_stops_early_and_keeps_the_best_steps_weights(tmp_path, ema):
    """Scores 0.1, 0.3 (best), 0.2, 0.25 at steps 2, 4, 6, 8 with patience 2: the run stops at step 8 with a
    checkpoint, and the model ends with the weights of step 4 (the average there with ``ema_decay``), which a
    run without evaluation stopped after 4 steps of the same schedule (dropout: the evaluations must not
    move the RNGs) has."""
    scores, calls = {2: 0.1, 4: 0.3, 6: 0.2, 8: 0.25, 10: 0.9}, []

    def evaluate(step):
        calls.append(step)
        torch.rand(3)  # an evaluation that draws random numbers leaves training's draws as they were
        return scores[step]

    ref, data = _setup(dropout=0.3)
    train(ref, data, _cfg(steps=20, ema_decay=ema), tmp_path / "ref", stop_after=4)
    ckpt = load_checkpoint(tmp_path / "ref" / "checkpoint", tensors=True)
    want = ckpt["ema_state"] if ema else ckpt["model"]
    model, _ = _setup(dropout=0.3)
    last = train(model, data, _cfg(steps=20, ema_decay=ema, eval_every=2, patience=2), tmp_path / "run",
                 evaluate=evaluate)
    assert calls == [2, 4, 6, 8]
    assert (last["best_step"], last["best_eval"], last["stopped_early"]) == (4, 0.3, True)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), want[n]), n
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 8 and [r["eval"] for r in rows if "eval" in r] == [0.1, 0.3, 0.2, 0.25]
    stopped = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert stopped["step"] == 8 and stopped["extra"] == {"best_score": 0.3, "best_step": 4, "since_best": 2,
                                                         "stopped": True}
    assert sorted(p.name for p in (tmp_path / "run").glob("best-*.safetensors")) == ["best-4.safetensors"]
    again, _ = _setup(dropout=0.3)  # a stopped run resumes to its end: no step, the best weights
    assert train(again, data, _cfg(steps=20, ema_decay=ema, eval_every=2, patience=2), tmp_path / "run",
                 evaluate=evaluate)["best_step"] == 4 and calls == [2, 4, 6, 8]
    assert all(torch.equal(p.detach(), want[n]) for n, p in again.named_parameters())


def test_evaluation_needs_an_evaluate_and_patience_needs_eval_every(tmp_path):
    model, data = _setup()
    with pytest.raises(ValueError, match="needs evaluate"):
        train(model, data, _cfg(eval_every=2), tmp_path)
    with pytest.raises(ValueError, match="patience=2 needs eval_every"):
        _cfg(patience=2)


def _weight_score(model):
    """A score that moves up and down with the weights (so the best step and the stop depend on them)."""
    return lambda step: float(torch.sin(1e3 * sum(p.detach().double().sum() for p in model.parameters()))
                              + 0 * torch.rand(1).double())


def test_resume_after_an_interruption_reproduces_the_best_step_and_weights(tmp_path):
    cfg = _cfg(steps=24, eval_every=2, patience=4, checkpoint_every=3)
    whole, data = _setup(dropout=0.3)
    res = train(whole, data, cfg, tmp_path / "whole", evaluate=_weight_score(whole))
    part, _ = _setup(dropout=0.3)
    for stop in (5, 4, 3):  # interrupted at steps 5, 9 (neither evaluated nor checkpointed) and 12
        train(part, data, cfg, tmp_path / "part", evaluate=_weight_score(part), stop_after=stop)
        part, _ = _setup(dropout=0.3)  # a fresh process: the state comes from the checkpoint
    got = train(part, data, cfg, tmp_path / "part", evaluate=_weight_score(part))
    assert res["best_step"] is not None and (got["best_step"], got["best_eval"], got["stopped_early"]) == (
        res["best_step"], res["best_eval"], res["stopped_early"])
    for n, p in whole.state_dict().items():
        assert torch.equal(part.state_dict()[n], p), n
    rows = [[{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
             for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("whole", "part")]
    assert rows[0] == rows[1] and any("eval" in r for r in rows[0])


def test_steps_for_epochs_scale_with_the_dataset_and_train_that_many_epochs(tmp_path):
    """A dataset of 3x the histories (the same ones thrice) gets ~3x the steps for 2 epochs, and both runs end
    within 10% of epoch 2 (the ``epoch`` column of the last metrics row)."""
    from plumrec.train import SFTDataset
    from plumrec.train.loop import steps_for_epochs

    model, small = _setup()
    big = SFTDataset(list(small.sequences) * 3, small.sid_tokens, small.vocab)
    assert len(big) == 3 * len(small)
    steps = [steps_for_epochs(d, 2.0, max_tokens=96) for d in (small, big)]
    assert 2.8 <= steps[1] / steps[0] <= 3.2
    assert steps_for_epochs(small, 2.0, max_tokens=96, grad_accum=2) == pytest.approx(steps[0] / 2, abs=1)
    for d, n, name in zip((small, big), steps, ("small", "big")):
        model, _ = _setup()
        train(model, d, _cfg(steps=n, log_every=1000), tmp_path / name)
        epoch = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])["epoch"]
        assert 1.8 <= epoch <= 2.2, (name, n, epoch)
    with pytest.raises(ValueError, match="epochs must be a finite number > 0"):
        steps_for_epochs(small, 0, max_tokens=96)
