"""The JAX PLUM LM against the torch model (float64, same weights): logits, hidden states and aux losses
on packed jagged batches, dense and MoE, tied and untied; the Pallas kernels (interpret mode) against the
references; checkpoint loading (the TPU lowering: test_aot.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from plumrec.io import save_tensors
from plumrec.jax import model as JM
from plumrec.model import PlumLM, preset

CONFIGS = {
    "dense": preset("tiny", vocab_size=101, num_experts=0),
    "moe": preset("tiny", vocab_size=101),
    "moe-untied": preset("tiny", vocab_size=101, tie_word_embeddings=False, mlp_only_layers=()),
}
LENGTHS = [7, 1, 12, 4]


def _models(cfg, seed=0):
    """A torch model with random weights (float32, as saved), its float64 copy and the JAX parameters."""
    torch.manual_seed(seed)
    m = PlumLM(cfg.replace(initializer_range=0.2)).eval()
    m64 = PlumLM(cfg).double().eval()
    m64.load_state_dict(m.state_dict())
    return m, m64, JM.params_from_torch_state(m.state_dict(), cfg)


def _batch(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return rng.integers(0, vocab, int(cu[-1])).astype(np.int32), cu


def _close(got, want, rel=1e-4):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want).max()
    assert err <= rel * max(np.abs(want).max(), 1e-6), (err, np.abs(want).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_torch(name):
    """Logits, hidden states and aux loss within 1e-4 of the float64 torch model, also at a
    logits_index and with explicit positions; jitted and eager agree."""
    cfg = CONFIGS[name]
    _, m64, params = _models(cfg)
    ids, cu = _batch(LENGTHS, cfg.vocab_size)
    with torch.no_grad():
        want = m64(torch.from_numpy(ids).long(), torch.from_numpy(cu))
    fwd = jax.jit(JM.forward, static_argnames=("cfg", "max_seqlen", "logits", "impl", "interpret"))
    hidden, logits, aux = fwd(params, cfg, jnp.asarray(ids), jnp.asarray(cu), max(LENGTHS))
    _close(logits, want.logits.numpy())
    _close(hidden, want.hidden.numpy())
    assert abs(float(aux) - float(want.aux_loss)) <= 1e-4 * max(float(want.aux_loss), 1e-6)
    assert (float(aux) > 0) == (cfg.num_experts > 0)
    idx = np.array([0, 7, 8, 19, 22], np.int32)
    pos = (np.arange(len(ids)) * 3 % 50).astype(np.int32)
    with torch.no_grad():
        want = m64(torch.from_numpy(ids).long(), torch.from_numpy(cu), positions=torch.from_numpy(pos).long(),
                   logits_index=torch.from_numpy(idx).long())
    hidden, logits, _ = JM.forward(params, cfg, jnp.asarray(ids), jnp.asarray(cu), 16, positions=jnp.asarray(pos),
                                   logits_index=jnp.asarray(idx))
    _close(logits, want.logits.numpy())
    _close(hidden, want.hidden.numpy())


def test_pallas_kernels_match_the_reference():
    """Attention and MoE through the Pallas kernels (interpret mode) give the reference's logits and aux."""
    cfg = CONFIGS["moe"].replace(num_hidden_layers=1, mlp_only_layers=())
    _, _, params = _models(cfg, seed=1)
    ids, cu = _batch([5, 1, 6], cfg.vocab_size, seed=1)
    args = (params, cfg, jnp.asarray(ids), jnp.asarray(cu), 6)
    _, ref, aux_ref = JM.forward(*args, impl="reference")
    _, pal, aux_pal = jax.jit(JM.forward, static_argnums=(1, 4), static_argnames=("impl", "interpret"))(
        *args, impl="pallas", interpret=True)
    _close(pal, ref, rel=1e-5)
    assert abs(float(aux_pal) - float(aux_ref)) <= 1e-6


def test_checkpoint_loads_from_safetensors(tmp_path):
    """The safetensors file the torch side writes loads with the same names and values, bf16 kept; a
    checkpoint of another config is refused by name."""
    cfg = CONFIGS["moe-untied"]
    m, _, params = _models(cfg)
    state = m.state_dict()
    assert list(state) == list(JM.param_shapes(cfg)) == list(params)
    save_tensors(tmp_path / "model.safetensors", state)
    loaded = JM.params_from_torch_state(tmp_path / "model.safetensors", cfg)
    for k, v in state.items():
        assert loaded[k].dtype == jnp.float32 and np.array_equal(np.asarray(loaded[k]), v.numpy()), k
    bf = JM.params_from_torch_state({k: v.bfloat16() for k, v in state.items()}, cfg)
    assert bf["norm.weight"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf["layers.1.mlp.w_down"], np.float32),
                                  state["layers.1.mlp.w_down"].bfloat16().float().numpy())
    with pytest.raises(ValueError, match="lm_head.weight"):
        JM.params_from_torch_state(state, cfg.replace(tie_word_embeddings=True))
    with pytest.raises(ValueError, match="shape"):
        JM.params_from_torch_state({**state, "norm.weight": torch.ones(3)}, cfg)
    with pytest.raises(ValueError, match="expected tensors"):
        JM.params_from_torch_state(tmp_path / "model.safetensors", cfg.replace(num_hidden_layers=1))
    # the arrays are copies: an in-place torch update (an optimizer step) leaves them as they were
    before = np.asarray(params["norm.weight"]).copy()
    with torch.no_grad():
        m.norm.weight.add_(1.0)
    np.testing.assert_array_equal(np.asarray(params["norm.weight"]), before)


def test_init_params_draws_like_torch():
    """Names and shapes of the torch state_dict; norms 1, other weights N(0, initializer_range^2)."""
    cfg = CONFIGS["moe"]
    params = JM.init_params(cfg, jax.random.key(0))
    assert {k: tuple(v.shape) for k, v in params.items()} == {k: tuple(v.shape)
                                                              for k, v in PlumLM(cfg).state_dict().items()}
    assert all(bool(jnp.all(v == 1)) for k, v in params.items() if k.endswith("norm.weight"))
    std = float(jnp.std(params["embed_tokens.weight"]))
    assert abs(std - cfg.initializer_range) < 0.1 * cfg.initializer_range


def test_bad_arguments_are_named():
    cfg = CONFIGS["dense"]
    params = JM.init_params(cfg, jax.random.key(0))
    ids, cu = jnp.zeros(4, jnp.int32), jnp.array([0, 4], jnp.int32)
    with pytest.raises(ValueError, match="max_seqlen"):
        JM.forward(params, cfg, ids, cu, 4.0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        JM.forward(params, cfg, ids, cu.astype(jnp.int64 if jax.config.x64_enabled else jnp.float32), 4)
    with pytest.raises(ValueError, match="input_ids"):
        JM.forward(params, cfg, ids[None], cu, 4)
    with pytest.raises(TypeError, match="state"):
        JM.params_from_torch_state(42, cfg)
