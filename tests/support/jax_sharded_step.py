"""``plumrec.jax.shard``'s training step on a mesh of 4 CPU devices against the unsharded
``plumrec.jax.train.make_train_step`` on the concatenated batch, in float64 (``jax_enable_x64``).

Run as a script in a fresh process (``run_sharded_step``): the host platform's device count is fixed
when jax initialises its backend (see ``jax_sharded.py``). The script prints one line ``REPORT{json}``:
per case, the largest relative differences (loss, logged parts, parameter updates after two steps)
and the shardings and per-device shapes of the returned expert weights, moments and batch.

- ``sft_2x2``: mesh data 2 x expert 2, the SFT codebook loss with label smoothing, shards of equal
  token counts (no pad tokens): the oracle is ``pack`` of all the shards' examples in order.
- ``cpt_4x1``: mesh data 4 x expert 1, the CPT loss with the router losses, shards of unequal token
  counts (pad tokens, masked out of the router losses): the oracle is ``pack`` of all the examples.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

NUM_DEVICES = 4


def run_sharded_step(timeout: float = 300) -> dict:
    """Run this file in a fresh Python with ``NUM_DEVICES`` host devices; returns its report."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={NUM_DEVICES}"])
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")][-1]
    return json.loads(line[len("REPORT"):])


def _examples(rng, lengths, vocab):
    """Random token sequences; SID tokens (>= the first level's start) carry random weights."""
    from plumrec.sequences import Example

    out = []
    for n in lengths:
        tokens = rng.integers(0, vocab.size, n)
        w = np.where(tokens >= vocab.level_slice(0).start, rng.uniform(0.5, 2.0, n), 0.0).astype(np.float32)
        w[0] = 0.0
        out.append(Example(tokens.astype(np.int64), w))
    return out


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _shard_info(arr) -> dict:
    return {"spec": [None if s is None else str(s) for s in arr.sharding.spec],
            "shapes": sorted({tuple(s.data.shape) for s in arr.addressable_shards}),
            "devices": len(arr.addressable_shards)}


def _as_f64(b):
    """The batch with float64 loss weights (the oracle and the shards alike)."""
    from plumrec.jax.train import Batch

    return Batch(b.input_ids, b.cu_seqlens, b.loss_index, b.targets, b.weights.astype(np.float64), b.max_seqlen)


def _batches(rng, shard_lengths, vocab, f64: bool):
    """The stacked shards and the oracle's packed concatenation of all the shards' examples (no pad tokens:
    the sharded step's token mask leaves them out of the router losses)."""
    from plumrec.jax import shard as JS
    from plumrec.jax.train import batch_from_packed
    from plumrec.sequences import pack

    shards = [_examples(rng, lens, vocab) for lens in shard_lengths]
    flat = [e for ex in shards for e in ex]
    parts = [batch_from_packed(pack(ex)) for ex in shards]
    oracle = batch_from_packed(pack(flat))
    if f64:
        parts, oracle = [_as_f64(b) for b in parts], _as_f64(oracle)
    return JS.stack_batches(parts), oracle


def run_case(mesh_shape, shard_lengths, *, sft: bool, aux: bool, rng) -> dict:
    """Two sharded steps vs two unsharded steps on the concatenated batch, float64 parameters.
    ``aux=False`` zeroes the router loss coefficients (the model adds those losses in float32)
    and the batches carry float64 weights: then every op runs in float64."""
    import jax

    from plumrec.jax import shard as JS
    from plumrec.jax import train as JT
    from plumrec.jax.model import init_params
    from plumrec.model import SIDVocab, preset
    from plumrec.train import TrainConfig

    vocab = SIDVocab(base_size=24, codebook_sizes=(8, 6, 5))
    cfg = preset("tiny", vocab_size=vocab.size, num_experts=4, hidden_size=64, intermediate_size=128,
                 moe_intermediate_size=64, num_hidden_layers=1, mlp_only_layers=())
    if not aux:
        cfg = cfg.replace(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    loss_fn = (JT.make_loss(cfg, bounds=JT.level_bounds(vocab), label_smoothing=0.1) if sft
               else JT.make_loss(cfg))
    tcfg = TrainConfig(steps=4, lr=1e-2, warmup_steps=1, weight_decay=0.1, grad_clip=0.5)
    mesh = JS.make_mesh(*mesh_shape)
    params0 = init_params(cfg.replace(initializer_range=0.2), jax.random.key(int(rng.integers(1 << 30))),
                          np.float64)
    stacked, oracle = _batches(rng, shard_lengths, vocab, f64=not aux)
    batch = JS.shard_batch(stacked, mesh)
    opt, step = JT.make_train_step(loss_fn, tcfg)
    sopt, sstep = JS.make_sharded_train_step(loss_fn, tcfg, mesh)
    p_ref, s_ref = params0, opt.init(params0)
    p_sh = JS.shard_params(params0, mesh)
    s_sh = sopt.init(p_sh)
    report = {}
    for i in range(2):
        p_ref, s_ref, loss_r, parts_r = step(p_ref, s_ref, oracle)
        p_sh, s_sh, loss_s, parts_s = sstep(p_sh, s_sh, batch)
        report[f"step{i + 1}"] = {"loss": _rel(loss_s, loss_r), **{k: _rel(parts_s[k], parts_r[k])
                                                                    for k in ("ce", "aux", "grad_norm")}}
    report["params"] = max(_rel(p_sh[n], p_ref[n]) for n in params0)
    report["update"] = max(_rel(p_sh[n] - params0[n], p_ref[n] - params0[n]) for n in params0)
    report["moved"] = min(_rel(p_ref[n], params0[n]) for n in params0)
    report["loss_value"], report["aux_value"] = float(loss_r), float(parts_r["aux"])
    report["dtype"] = str(p_sh["layers.0.mlp.w_down"].dtype)
    for key, name in (("w_gate_up", "layers.0.mlp.w_gate_up"), ("w_down", "layers.0.mlp.w_down"),
                      ("q_proj", "layers.0.self_attn.q_proj.weight")):
        report[key] = _shard_info(p_sh[name])
    report["moments_w_down"] = [_shard_info(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(s_sh)
                                if getattr(path[-1], "key", None) == "layers.0.mlp.w_down"]
    report["batch_input_ids"] = _shard_info(batch.input_ids)
    return report


def main() -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    assert len(jax.devices()) >= NUM_DEVICES, f"{len(jax.devices())} devices: XLA_FLAGS not applied"
    rng = np.random.default_rng(0)
    report = {"devices": len(jax.devices()), "jax": jax.__version__}
    report["sft_2x2"] = run_case((2, 2), [[9, 5, 10], [12, 12]], sft=True, aux=False, rng=rng)
    report["cpt_4x1"] = run_case((4, 1), [[7, 9], [16], [3, 5, 4], [11]], sft=False, aux=True, rng=rng)
    return report


if __name__ == "__main__":
    print("REPORT" + json.dumps(main()))
