"""The JAX training loop: exact resume (losses and parameters bit-equal on the CPU), the first steps equal to
the torch loop's on the same weights and batches (grad_accum 1 and 2), padding that keeps the loss, the
non-finite modes, and the TrainConfig fields it refuses."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from plumrec.jax import model as JM
from plumrec.jax import train as JT
from plumrec.jax.checkpoint import read_checkpoint
from plumrec.jax.loop import check_supported, pad_batch, train
from plumrec.model import PlumLM, preset
from plumrec.sequences import ExampleStream
from plumrec.train import CodebookLoss, CPTCorpus, SFTDataset, TrainConfig
from plumrec.train import train as torch_train
from tests.support.sft_world import sft_world

VOCAB, SID_TOKENS, TEXT, ITEMS, SEQS = sft_world()
CFG = preset("tiny", vocab_size=VOCAB.size)
SFT = SFTDataset(SEQS, SID_TOKENS, VOCAB)
SFT_LOSS = JT.make_loss(CFG, bounds=JT.level_bounds(VOCAB))
DROP_CFG = CFG.replace(hidden_dropout=0.1)
CPT_LOSS = JT.make_loss(DROP_CFG)
DENSE = CFG.replace(mlp_only_layers=(0, 1))  # no MoE layer
ONE = CFG.replace(num_hidden_layers=1)
ONE_LOSS = JT.make_loss(ONE, bounds=JT.level_bounds(VOCAB))


def _rows(path):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_bit_exact(tmp_path):
    """CPT with dropout and a weight average: 6 steps in one go == 3 steps, a stop, a resume to 6 (the
    metrics rows and the final parameters bit-equal); the older checkpoints are rotated out."""
    corpus = CPTCorpus(SEQS, SID_TOKENS, VOCAB, text_tokenizer=TEXT, items=ITEMS, behaviour_fraction=0.5,
                       max_items=6, seed=3)
    tcfg = TrainConfig(steps=6, lr=3e-3, warmup_steps=2, max_tokens=96, log_every=1, checkpoint_every=2,
                       ema_decay=0.9, ema_warmup=2, progress=False, seed=5)
    params = JM.init_params(DROP_CFG, jax.random.key(0))
    whole = train(params, corpus, tcfg, tmp_path / "a", cfg=DROP_CFG, loss_fn=CPT_LOSS)
    first = train(params, corpus, tcfg, tmp_path / "b", cfg=DROP_CFG, loss_fn=CPT_LOSS, stop_after=3)
    assert first.metrics["step"] == 3 and sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == \
        ["checkpoint-2", "checkpoint-3"]
    rest = train(params, corpus, tcfg, tmp_path / "b", cfg=DROP_CFG, loss_fn=CPT_LOSS)
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    assert [r["step"] for r in _rows(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    assert whole.metrics["loss"] == rest.metrics["loss"] and np.isfinite(whole.metrics["loss"])
    for name in params:
        np.testing.assert_array_equal(np.asarray(whole.params[name]), np.asarray(rest.params[name]), err_msg=name)
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    again = train(params, corpus, tcfg, tmp_path / "b", cfg=DROP_CFG, loss_fn=CPT_LOSS)
    assert again.metrics == {}
    assert not any(np.array_equal(np.asarray(params[n]), np.asarray(whole.params[n])) for n in params)


@pytest.mark.parametrize("grad_accum, cfg", [(1, DENSE), (2, CFG)], ids=["dense", "moe-accum2"])
def test_first_steps_match_the_torch_loop(tmp_path, grad_accum, cfg):
    """SFT (codebook loss, dropout 0) from the same weights, the JAX batches padded (the padding masked out
    of the MoE router losses): both loops log the same loss, ce, aux, grad_norm and lr for two steps (the
    second after one AdamW update) within 1e-4 relative, and end on the same weight average (ema_decay):
    the changes of each tensor within 1e-3 in total."""
    torch.manual_seed(0)
    model = PlumLM(cfg.replace(initializer_range=0.1))
    params = JM.params_from_torch_state(model.state_dict(), cfg)
    tcfg = TrainConfig(steps=2, lr=1e-3, warmup_steps=1, max_tokens=64, log_every=1, grad_accum=grad_accum,
                       ema_decay=0.8, ema_warmup=2, progress=False, seed=7)
    torch_train(model, SFT, tcfg, tmp_path / "torch", loss_fn=CodebookLoss(VOCAB))
    res = train(params, SFT, tcfg, tmp_path / "jax", cfg=cfg, loss_fn=JT.make_loss(cfg, bounds=JT.level_bounds(VOCAB)))
    want, got = _rows(tmp_path / "torch"), _rows(tmp_path / "jax")
    assert [list(r) for r in got] == [list(r) for r in want]  # the same columns in the same order
    for w, g in zip(want, got):
        for k in ("loss", "ce", "aux", "grad_norm", "lr"):
            assert abs(g[k] - w[k]) <= 1e-4 * abs(w[k]), (k, g[k], w[k])
        assert (w["aux"] > 0) == (cfg is CFG), w["aux"]
        assert (g["step"], g["epoch"], g["skipped"]) == (w["step"], w["epoch"], w["skipped"])
    # both end on the weight average of the two updates; Adam's first steps are ~lr * sign(g), so entries of
    # gradients near 0 may differ by ~lr: the changes are compared in total, per tensor
    for name, p in model.state_dict().items():
        start = np.asarray(params[name])
        want, got = p.numpy() - start, np.asarray(res.params[name]) - start
        assert np.abs(got - want).sum() <= 1e-3 * np.abs(want).sum(), (name, np.abs(got - want).sum(),
                                                                         np.abs(want).sum())


def test_pad_batch_shapes():
    """Padding adds whole sequences (at most max_seqlen long) and zero-weight loss rows only: the real
    tokens, boundaries and loss rows come first, unchanged (the loss equality: the torch test above)."""
    b = JT.batch_from_packed(ExampleStream(SFT, max_tokens=60, seed=2).next_batch())
    T, B1, M = b.input_ids.shape[0], b.cu_seqlens.shape[0], b.loss_index.shape[0]
    p = pad_batch(b, 96, 20)
    assert p.input_ids.shape == (96,) and p.max_seqlen == 20 and p.cu_seqlens.shape[0] in (8, 16, 32)
    np.testing.assert_array_equal(p.input_ids[:T], b.input_ids)
    np.testing.assert_array_equal(p.cu_seqlens[:B1], b.cu_seqlens)
    assert int(p.cu_seqlens[-1]) == 96 and int(np.diff(np.asarray(p.cu_seqlens)).max()) <= 20
    assert p.loss_index.shape[0] in (8, 16, 32) and float(p.weights[M:].sum()) == 0
    np.testing.assert_array_equal(p.targets[:M], b.targets)
    with pytest.raises(ValueError, match="tokens"):
        pad_batch(b, int(T) - 1, 40)
    with pytest.raises(ValueError, match="max_seqlen"):
        pad_batch(b, 96, b.max_seqlen - 1)


def test_nonfinite_steps_stop_or_skip(tmp_path):
    """A NaN loss: "stop" raises before any update or checkpoint; "skip" keeps the weights, counts the
    step and still writes the rows and the checkpoint."""
    def nan_loss(params, batch, key=None):
        loss, parts = ONE_LOSS(params, batch, key)
        return loss * jnp.nan, parts

    params = JM.init_params(ONE, jax.random.key(2))
    tcfg = TrainConfig(steps=2, max_tokens=64, log_every=1, progress=False)
    with pytest.raises(FloatingPointError, match="step 1: the loss part 'loss' is not finite"):
        train(params, SFT, tcfg, tmp_path / "stop", cfg=ONE, loss_fn=nan_loss)
    assert not list((tmp_path / "stop").glob("checkpoint-*"))
    with pytest.warns(UserWarning, match="skipped"):
        res = train(params, SFT, TrainConfig(**{**tcfg.to_dict(), "nonfinite": "skip"}), tmp_path / "skip", cfg=ONE,
                    loss_fn=nan_loss)
    assert res.metrics["skipped"] == 2 and res.metrics["loss"] is None
    _, tensors = read_checkpoint(tmp_path / "skip" / "checkpoint-2")  # the schedule moved on, Adam did not
    assert int(tensors["opt_state[1][2].count"]) == 2 and int(tensors["opt_state[1][0].count"]) == 0
    for name in params:
        np.testing.assert_array_equal(np.asarray(res.params[name]), np.asarray(params[name]))


def test_unsupported_fields_and_bad_init_are_refused(tmp_path):
    params = {"norm.weight": jnp.ones(4)}
    for field in ("bf16", "fsdp"):
        with pytest.raises(ValueError, match=f"{field}=True is not supported"):
            check_supported(TrainConfig(**{field: True}))
    with pytest.raises(ValueError, match="eval_every=5 / patience=2: the JAX loop has no validation checks"):
        check_supported(TrainConfig(eval_every=5, patience=2))
    with pytest.raises(ValueError, match="cfg"):
        train(params, SFT, TrainConfig(progress=False), tmp_path)
    with pytest.raises(TypeError, match="init"):
        train([1], SFT, TrainConfig(progress=False), tmp_path, cfg=CFG)


def test_resume_refuses_another_config(tmp_path):
    params = JM.init_params(ONE, jax.random.key(0))
    tcfg = TrainConfig(steps=1, max_tokens=64, progress=False)
    train(params, SFT, tcfg, tmp_path, cfg=ONE, loss_fn=ONE_LOSS)
    with pytest.raises(ValueError, match="lr: 0.001 → 0.002"):
        train(params, SFT, TrainConfig(**{**tcfg.to_dict(), "lr": 2e-3, "steps": 2}), tmp_path, cfg=ONE,
              loss_fn=ONE_LOSS)
    with pytest.raises(ValueError, match="another model"):
        other = ONE.replace(rms_norm_eps=1e-5)
        train(JM.init_params(other, jax.random.key(0)), SFT, TrainConfig(**{**tcfg.to_dict(), "steps": 2}), tmp_path,
              cfg=other, loss_fn=ONE_LOSS)
