"""The JAX model's TPU lowering (``jax.export`` with ``platforms=["tpu"]``, the Pallas kernels through
Mosaic): the MoE forward with bfloat16 weights and the whole SFT training step, forward, backward and
AdamW. Lowering only: no TPU runs here."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from compile_checks import lower_for_tpu

from plumrec.jax import model as JM
from plumrec.jax import retrieval as JR
from plumrec.jax import train as JT
from plumrec.model import SIDVocab, preset
from plumrec.sid import build_trie
from plumrec.train import TrainConfig

VOCAB = SIDVocab(base_size=24, codebook_sizes=(8, 6, 5))
CFG = preset("tiny", vocab_size=VOCAB.size)


def test_forward_lowers_for_tpu():
    """The MoE model's forward (bf16 weights) exports for TPU with the Pallas kernels lowered through Mosaic."""
    names = list(JM.param_shapes(CFG))

    def fwd(ids, cu, *weights):
        return JM.forward(dict(zip(names, weights)), CFG, ids, cu, 256, impl="pallas", interpret=False)

    specs = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in JM.param_shapes(CFG).values()]
    text = lower_for_tpu(fwd, jax.ShapeDtypeStruct((512,), jnp.int32), jax.ShapeDtypeStruct((5,), jnp.int32), *specs)
    assert text.count("tpu_custom_call") >= 3  # attention in both layers, the grouped matmuls of the MoE layer


def test_train_step_lowers_for_tpu():
    """The whole SFT training step (forward, backward through the Pallas kernels, AdamW) exports for TPU."""
    opt, step = JT.make_train_step(JT.make_loss(CFG, bounds=JT.level_bounds(VOCAB), impl="pallas", interpret=False),
                                   TrainConfig())
    params = jax.eval_shape(lambda: JM.init_params(CFG, jax.random.key(0)))
    state = jax.eval_shape(opt.init, params)
    T, M = 512, 128
    batch = JT.Batch(jax.ShapeDtypeStruct((T,), jnp.int32), jax.ShapeDtypeStruct((5,), jnp.int32),
                     jax.ShapeDtypeStruct((M,), jnp.int32), jax.ShapeDtypeStruct((M,), jnp.int32),
                     jax.ShapeDtypeStruct((M,), jnp.float32), 256)
    leaves, tree = jax.tree.flatten((params, state, batch))

    def flat_step(*leaves):
        return step(*jax.tree.unflatten(tree, leaves))

    text = lower_for_tpu(flat_step, *leaves)
    assert text.count("tpu_custom_call") >= 6  # attention forward and backward, the MoE grouped matmuls


def test_beam_search_over_the_kv_cache_lowers_for_tpu():
    """The constrained beam search over the KV-cached decode (beam_decode_attention per layer and level, the
    MoE layer, the beam step; bf16 weights and cache) exports for TPU with every kernel through Mosaic."""
    codes = np.random.default_rng(0).integers(0, VOCAB.codebook_sizes, (40, 3))
    trie = build_trie(codes, VOCAB.codebook_sizes).to_jax()
    names, B, W, S = list(JM.param_shapes(CFG)), 8, 8, 64
    L = len(VOCAB.codebook_sizes)
    slices = tuple((VOCAB.level_slice(l).start, VOCAB.level_slice(l).stop) for l in range(L))
    offsets = tuple(VOCAB.level_offset(l) for l in range(L))
    n = CFG.num_hidden_layers

    def search(first, lens, *arrays):
        params, kp, vp = dict(zip(names, arrays[:len(names)])), arrays[len(names):-n], arrays[-n:]
        return JR._search(params, first, list(kp), list(vp), lens, trie, cfg=CFG, offsets=offsets, slices=slices,
                          beam_width=W, impl="pallas", interpret=False)

    specs = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in JM.param_shapes(CFG).values()]
    cache = [jax.ShapeDtypeStruct((B, S, CFG.num_key_value_heads, CFG.head_dim), jnp.bfloat16)] * (2 * n)
    text = lower_for_tpu(search, jax.ShapeDtypeStruct((B, VOCAB.codebook_sizes[0]), jnp.float32),
                         jax.ShapeDtypeStruct((B,), jnp.int32), *specs, *cache)
    assert text.count("tpu_custom_call") >= 2 * n + L  # the decode attention per layer and level, the beam steps
