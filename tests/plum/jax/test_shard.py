"""The training step on a device mesh (``plumrec.jax.shard``): the stacked batch's concatenation against
``pack`` of all the shards' examples, bad input, and (in a fresh process on 4 CPU devices, see
tests/support/jax_sharded_step.py) two sharded steps against two unsharded steps on the concatenated
batch, with the expert weights split over the expert axis."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax_sharded_step import run_sharded_step

from plumrec.jax import shard as JS
from plumrec.jax.train import batch_from_packed
from plumrec.model import preset
from plumrec.sequences import Example, pack


def _examples(rng, lengths):
    out = []
    for n in lengths:
        w = np.where(rng.random(n) < 0.6, rng.uniform(0.5, 2.0, n), 0.0).astype(np.float32)
        w[0], w[-1] = 0.0, 1.0
        out.append(Example(rng.integers(1, 30, n).astype(np.int64), w))
    return out


def test_concat_of_stacked_shards_is_the_packed_concatenation():
    """Shards of unequal sizes (tokens, sequences, targets): the concatenated stack == ``pack`` of every
    shard's examples in order, each short shard's pad tokens as one more sequence; the pad loss entries
    weigh 0."""
    rng = np.random.default_rng(3)
    lengths = [[5, 9, 3], [17], [4, 4], [6, 2, 3, 4]]
    shards = [_examples(rng, lens) for lens in lengths]
    stacked = JS.stack_batches([pack(ex) for ex in shards], pad_id=7)
    T = max(sum(lens) for lens in lengths)
    assert stacked.input_ids.shape == (4, T) and stacked.cu_seqlens.shape == (4, 6)
    flat = []
    for ex, lens in zip(shards, lengths):
        pad = T - sum(lens)
        flat += ex + ([Example(np.full(pad, 7, np.int64), np.zeros(pad, np.float32))] if pad else [])
    want, got = batch_from_packed(pack(flat)), JS.concat_batch(stacked)
    np.testing.assert_array_equal(got.input_ids, want.input_ids)
    np.testing.assert_array_equal(np.unique(np.asarray(got.cu_seqlens)), want.cu_seqlens)
    assert np.all(np.diff(np.asarray(got.cu_seqlens)) >= 0)
    real = np.asarray(got.weights) > 0
    assert (~real).sum() == stacked.weights.size - want.weights.shape[0]
    for name in ("loss_index", "targets", "weights"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name))[real], getattr(want, name))
    assert got.max_seqlen == stacked.max_seqlen == want.max_seqlen == 17


def test_bad_input_raises():
    mesh = JS.make_mesh(1, 1)
    with pytest.raises(ValueError, match="devices"):
        JS.make_mesh(len(jax.devices()) + 1, 1)
    with pytest.raises(ValueError, match="mesh"):
        JS.param_shardings(preset("tiny", vocab_size=40), jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",)))
    with pytest.raises(ValueError, match="at least one batch"):
        JS.stack_batches([])
    no_target = pack([Example(np.arange(4), np.zeros(4, np.float32))])
    with pytest.raises(ValueError, match="loss target"):
        JS.stack_batches([no_target])
    stacked = JS.stack_batches([pack(_examples(np.random.default_rng(0), [5, 3]))] * 2)
    with pytest.raises(ValueError, match="stacked"):
        JS.shard_batch(stacked, mesh)
    shardings = JS.param_shardings(preset("tiny", vocab_size=40, num_experts=4), mesh)
    assert JS.is_expert_param("layers.1.mlp.w_down") and not JS.is_expert_param("layers.1.mlp.gate.weight")
    assert shardings["layers.1.mlp.w_gate_up"].spec[0] == JS.EXPERT
    assert all(s.spec == jax.sharding.PartitionSpec() for n, s in shardings.items() if not JS.is_expert_param(n))


def test_sharded_step_equals_unsharded_step_on_4_devices():
    """2 x 2 (data x expert) with the SFT loss, and 4 x 1 with the CPT loss and padded shards: two steps
    from the same float64 parameters give the unsharded step's loss, parts and parameters on the
    concatenated batch. The MoE reference computes in float32 (routing, grouped matmuls, the router
    losses), and XLA orders its sums differently once partitioned: the bounds are float32 rounding,
    amplified by Adam where a gradient entry is near 0."""
    report = run_sharded_step()
    assert report["devices"] == 4
    for case, loss_tol in (("sft_2x2", 1e-7), ("cpt_4x1", 1e-6)):
        res = report[case]
        assert res["dtype"] == "float64" and res["moved"] > 1e-2, (case, res)
        for i, tol in ((1, loss_tol), (2, 1e-6)):
            step = res[f"step{i}"]
            assert max(step.values()) <= tol and step["grad_norm"] <= 1e-6, (case, i, step)
        assert res["params"] <= 5e-5 and res["update"] <= 5e-3, (case, res)
        assert res["batch_input_ids"]["spec"][0] == JS.DATA and res["batch_input_ids"]["devices"] == 4
        assert res["q_proj"] == {"spec": [], "shapes": [[128, 64]], "devices": 4}
    two = report["sft_2x2"]    # 4 experts over 2 expert shards: 2 per device; the moments alike
    assert two["aux_value"] == 0.0 and report["cpt_4x1"]["aux_value"] > 0
    for name, shape in (("w_gate_up", [2, 64, 128]), ("w_down", [2, 64, 64])):
        assert two[name] == {"spec": [JS.EXPERT], "shapes": [shape], "devices": 4}, (name, two[name])
    assert two["moments_w_down"] == [{"spec": [JS.EXPERT], "shapes": [[2, 64, 64]], "devices": 4}] * 2
    assert two["batch_input_ids"]["shapes"] == [[1, 24]]
    four = report["cpt_4x1"]
    assert four["w_down"]["shapes"] == [[4, 64, 64]] and four["batch_input_ids"]["shapes"] == [[1, 16]]
