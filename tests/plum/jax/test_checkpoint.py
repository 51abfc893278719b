"""JAX training checkpoints (safetensors + JSON): a bit-exact round trip of params, optax state and weight
average, the refusals (another optimizer, model, weight average; damaged or torch folders), rotation, and
model directories that the torch loader reads (and the other way round)."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from plumrec.jax import checkpoint as JC
from plumrec.jax import model as JM
from plumrec.jax import train as JT
from plumrec.model import PlumLM, preset
from plumrec.pipeline.workspace import load_model, save_model
from plumrec.train import TrainConfig
from tests.support.sft_world import sft_world

VOCAB, _, TEXT, _, _ = sft_world()
CFG = preset("tiny", vocab_size=VOCAB.size, num_hidden_layers=1)
TCFG = TrainConfig(steps=4, lr=1e-2, warmup_steps=1)


@functools.lru_cache(maxsize=1)
def _state(seed=0, tcfg=TCFG):
    """Params, an optax state after two updates of random gradients, and a weight average."""
    params = JM.init_params(CFG, jax.random.key(seed))
    opt = JT.make_optimizer(tcfg)
    state = opt.init(params)
    update = jax.jit(opt.update)
    rng = np.random.default_rng(seed)
    for _ in range(2):
        grads = {k: jnp.asarray(rng.standard_normal(v.shape), v.dtype) for k, v in params.items()}
        updates, state = update(grads, state, params)
        params = jax.tree.map(jnp.add, params, updates)
    ema = jax.tree.map(lambda p: p * 0.5, params)
    return params, opt, state, ema


def _save(out, params, state, ema=None, step=2, keep=None):
    return JC.save_checkpoint(out, params=params, opt_state=state, step=step, position=17, skipped=1, seed=5,
                              config=TCFG.to_dict(), model_config=CFG, ema=ema, keep=keep)


def test_round_trip_is_bit_exact(tmp_path):
    params, opt, state, ema = _state()
    path = _save(tmp_path, params, state, ema)
    assert path == tmp_path / "checkpoint-2" and sorted(p.name for p in path.iterdir()) == \
        ["state.json", "tensors.safetensors"]
    meta, tensors = JC.read_checkpoint(path)
    assert {"opt_state[1][0].mu['norm.weight']", "opt_state[1][0].count", "params['norm.weight']",
            "ema['norm.weight']"} <= set(tensors)
    fresh = opt.init(JM.init_params(CFG, jax.random.key(9)))
    ck = JC.restore_checkpoint(path, meta, tensors, params=params, opt_state=fresh, model_config=CFG, ema=params)
    assert (ck.step, ck.position, ck.skipped, ck.seed, ck.config) == (2, 17, 1, 5, json.loads(json.dumps(
        TCFG.to_dict())))
    for want, got in ((params, ck.params), (state, ck.opt_state), (ema, ck.ema)):
        w, wdef = jax.tree_util.tree_flatten(want)
        g, gdef = jax.tree_util.tree_flatten(got)
        assert wdef == gdef and len(w) > 0
        for a, b in zip(w, g):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_refuses_what_does_not_fit(tmp_path):
    params, _, state, ema = _state()
    path = _save(tmp_path, params, state, ema)
    meta, tensors = JC.read_checkpoint(path)
    no_clip = JT.make_optimizer(TrainConfig(steps=4, grad_clip=0)).init(params)
    with pytest.raises(ValueError, match="does not fit this run's opt_state.*lacks|unexpected"):
        JC.restore_checkpoint(path, meta, tensors, params=params, opt_state=no_clip, model_config=CFG, ema=params)
    with pytest.raises(ValueError, match="weight average is in it"):
        JC.restore_checkpoint(path, meta, tensors, params=params, opt_state=state, model_config=CFG)
    wide = CFG.replace(intermediate_size=CFG.intermediate_size * 2)
    with pytest.raises(ValueError, match="another model.*intermediate_size"):
        JC.restore_checkpoint(path, meta, tensors, params=params, opt_state=state, model_config=wide, ema=params)
    bad = dict(tensors, **{"params['norm.weight']": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"params\['norm.weight'\] is float32 \(3,\)"):
        JC.restore_checkpoint(path, meta, bad, params=params, opt_state=state, model_config=CFG, ema=params)


def test_damaged_and_foreign_folders_are_refused(tmp_path):
    params, _, state, _ = _state()
    path = _save(tmp_path, params, state)
    blob = bytearray((path / JC.TENSORS_NAME).read_bytes())
    blob[-3] ^= 0xFF
    (path / JC.TENSORS_NAME).write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="damaged"):
        JC.read_checkpoint(path)
    torch_like = tmp_path / "checkpoint-9"
    torch_like.mkdir()
    (torch_like / "state.json").write_text(json.dumps({"format": 3, "step": 9}))
    with pytest.raises(ValueError, match="not a plumrec JAX training checkpoint"):
        JC.read_checkpoint(torch_like)


def test_rotation_keeps_the_newest(tmp_path):
    params, _, state, _ = _state()
    for step in (1, 2, 3):
        _save(tmp_path, params, state, step=step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    _save(tmp_path, params, state, step=1, keep=2)  # a run started afresh: the newer ones go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_model_directory_loads_in_torch_and_back(tmp_path):
    """JAX -> save_model -> the torch load_model: the same config, vocabulary and tensors;
    and a torch-saved directory -> load_params: the same tensors and config."""
    params = JM.init_params(CFG, jax.random.key(3))
    JC.save_model(params, CFG, VOCAB, TEXT, tmp_path / "jax")
    model, vocab, text = load_model(tmp_path / "jax")
    assert model.config == CFG and vocab == VOCAB and text.vocab_size == TEXT.vocab_size
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), np.asarray(params[k]), err_msg=k)
    back, cfg = JC.load_params(tmp_path / "jax")
    assert cfg == CFG and all(np.array_equal(np.asarray(back[k]), np.asarray(params[k])) for k in params)
    torch.manual_seed(1)
    tmodel = PlumLM(CFG)
    save_model(tmodel, VOCAB, TEXT, tmp_path / "torch")
    got, cfg = JC.load_params(tmp_path / "torch")
    assert cfg == CFG
    for k, v in tmodel.state_dict().items():
        np.testing.assert_array_equal(np.asarray(got[k]), v.numpy(), err_msg=k)
    with pytest.raises(ValueError, match="do not match cfg"):
        JC.save_model({k: v for k, v in params.items() if k != "norm.weight"}, CFG, VOCAB, TEXT, tmp_path / "x")
