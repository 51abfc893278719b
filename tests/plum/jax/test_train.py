"""The JAX CPT / SFT losses and their gradients against the torch losses on the float64 torch model (same
weights), the optax optimiser against torch's AdamW + clipping + schedule on the same gradients, and the
jit-compiled training step learning a fixed batch (the TPU export: test_aot.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from plumrec.jax import model as JM
from plumrec.jax import train as JT
from plumrec.model import PlumLM, SIDVocab, preset
from plumrec.sequences import Example, pack
from plumrec.train import CodebookLoss, TrainConfig, lm_loss
from plumrec.train.optim import lr_lambda
from plumrec.train.optim import make_optimizer as torch_optimizer

VOCAB = SIDVocab(base_size=24, codebook_sizes=(8, 6, 5))


def _sft_batch(lengths, seed=0):
    """Examples of random tokens whose SID tokens carry random loss weights (the SFT layout)."""
    rng = np.random.default_rng(seed)
    examples = []
    for n in lengths:
        tokens = rng.integers(0, VOCAB.size, n)
        sid = tokens >= VOCAB.level_slice(0).start
        w = np.where(sid, rng.uniform(0.5, 2.0, n), 0.0).astype(np.float32)
        w[0] = 0.0
        examples.append(Example(tokens.astype(np.int64), w))
    return pack(examples)


def _models(cfg, seed=0):
    torch.manual_seed(seed)
    m = PlumLM(cfg.replace(initializer_range=0.2))
    m64 = PlumLM(cfg).double()
    m64.load_state_dict(m.state_dict())
    return m, m64, JM.params_from_torch_state(m.state_dict(), cfg)


def _close(got, want, rel=1e-4, name=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max()
    assert err <= rel * max(np.abs(want).max(), 1e-8), (name, err, np.abs(want).max())


CFG = preset("tiny", vocab_size=VOCAB.size)


@pytest.mark.parametrize("kind", ["sft", "sft-smoothed", "cpt"])
def test_loss_and_gradients_match_torch(kind):
    """Loss within 1e-4 and every parameter's gradient within 1e-4 (relative to its largest entry) of
    the torch loss on the float64 model; MoE aux losses included."""
    _, m64, params = _models(CFG)
    b = _sft_batch([9, 2, 14, 5])
    if kind == "cpt":
        torch_loss, jax_loss = lm_loss, JT.make_loss(CFG)
    else:
        opts = dict(label_smoothing=0.1, level_weights=(2.0, 1.0, 0.5)) if kind == "sft-smoothed" else {}
        torch_loss = CodebookLoss(VOCAB, **opts)
        jax_loss = JT.make_loss(CFG, bounds=JT.level_bounds(VOCAB), **opts)
    want, want_parts = torch_loss(m64, b)
    want_grads = dict(zip([n for n, _ in m64.named_parameters()],
                          torch.autograd.grad(want, list(m64.parameters()))))
    (loss, parts), grads = jax.jit(jax.value_and_grad(jax_loss, has_aux=True))(params, JT.batch_from_packed(b))
    assert abs(float(loss) - want.item()) <= 1e-4 * abs(want.item())
    assert abs(float(parts["aux"]) - float(want_parts["aux"])) <= 1e-4 * float(want_parts["aux"])
    assert float(parts["aux"]) > 0
    assert set(grads) == set(want_grads)
    for name, g in want_grads.items():
        _close(grads[name], g.numpy(), name=name)


def test_optimizer_matches_torch_adamw():
    """Three steps of the optax optimiser on given gradients == torch's AdamW (decay groups, betas),
    clip_grad_norm_ (binding) and LambdaLR schedule from the same TrainConfig."""
    tcfg = TrainConfig(steps=5, lr=1e-2, warmup_steps=2, weight_decay=0.1, betas=(0.8, 0.9), grad_clip=0.5)
    cfg = preset("tiny", vocab_size=40, num_hidden_layers=1)
    model, _, params = _models(cfg)
    topt = torch_optimizer(model, tcfg)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lr_lambda(tcfg))
    opt = JT.make_optimizer(tcfg)
    state = opt.init(params)
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = torch.from_numpy(grads[n].copy())
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        topt.step()
        sched.step()
        updates, state = opt.update({n: jnp.asarray(g) for n, g in grads.items()}, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    for n, p in model.named_parameters():
        np.testing.assert_allclose(np.asarray(params[n]), p.detach().numpy(), rtol=0, atol=2e-6, err_msg=n)
    assert float(JT.lr_schedule(tcfg)(jnp.int32(100))) == pytest.approx(tcfg.lr * tcfg.min_lr_ratio)


def test_train_step_learns_a_fixed_batch():
    """The jitted step runs on CPU and the SFT loss falls over a few steps; dropout needs its key."""
    cfg = CFG.replace(hidden_dropout=0.1)
    params = JM.init_params(cfg, jax.random.key(0))
    opt, step = JT.make_train_step(JT.make_loss(cfg, bounds=JT.level_bounds(VOCAB)),
                                   TrainConfig(steps=20, lr=3e-3, warmup_steps=0))
    state = opt.init(params)
    batch = JT.batch_from_packed(_sft_batch([9, 2, 14, 5], seed=3))
    losses = []
    for i in range(6):
        params, state, loss, parts = step(params, state, batch, jax.random.key(i))
        losses.append(float(loss))
        assert np.isfinite(float(parts["grad_norm"]))
    assert losses[-1] < 0.8 * losses[0], losses


def test_loss_arguments_are_checked():
    with pytest.raises(ValueError, match="bounds"):
        JT.make_loss(CFG, bounds=(30, 20))(JM.init_params(CFG, jax.random.key(0)),
                                           JT.batch_from_packed(_sft_batch([4])))
    with pytest.raises(ValueError, match="pass bounds"):
        JT.make_loss(CFG, label_smoothing=0.1)
    with pytest.raises(TypeError, match="PackedBatch"):
        JT.batch_from_packed({"input_ids": None})
