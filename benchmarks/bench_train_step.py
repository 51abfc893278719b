"""End-to-end SFT training step of PLUM presets (GPU): the ``train_step`` part of the device suite.

    python benchmarks/bench_train_step.py --out OUT            # CUDA
    python benchmarks/bench_train_step.py --smoke --out OUT    # CPU: shrunken presets, interpreter, no timings

One step is what ``plumrec.train.loop.train`` does per optimizer step: zero the
gradients, ``lm_loss`` (the model at the loss positions only) under bf16
autocast on CUDA, backward, gradient clipping at 1.0, AdamW
(``make_optimizer``). The batch is synthetic: jagged sequences of random
tokens (lognormal lengths, median 512) packed by ``plumrec.sequences.pack``,
each with the SFT loss on its last 4 tokens (a target SID). Presets
``plum-110m`` and ``medium`` (``plumrec.model.config.preset``) with
``kernel_impl`` "triton" against "reference" (the baseline), 16,384 tokens
a step.

Model FLOPs of a step: ``T * ModelConfig.flops_per_token(L_eff)`` with the
effective context ``L_eff = sum_b L_b^2 / T`` (so the causal attention term
is exact for jagged lengths), less the LM head at the ``T - M`` positions
that carry no loss (``lm_loss`` computes logits at the ``M`` loss positions
only). MFU = achieved model FLOP/s over the measured bf16 GEMM peak (the
``peaks`` part), and over the 989 TFLOP/s datasheet figure.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASHEET, Recorder, Timer, finite, shape_str, suite_setup, try_part  # noqa: E402

TARGET_TOKENS = 4            # an SFT example's loss is on its target SID
MIN_LEN = 2 * TARGET_TOKENS  # shortest sequence: some history, then the target


@dataclass(frozen=True)
class StepCase:
    """A preset, the kernels it runs on, and the batch size in tokens."""
    preset: str
    impl: str
    tokens: int
    overrides: tuple = ()     # (field, value) pairs applied to the preset (smoke: a shrunken model)


CASES = [StepCase("plum-110m", "triton", 16384), StepCase("medium", "triton", 16384),
         StepCase("medium", "reference", 16384), StepCase("plum-110m", "reference", 16384)]
_SMOKE_SHRINK = (("vocab_size", 256), ("hidden_size", 64), ("intermediate_size", 64), ("moe_intermediate_size", 32))
SMOKE_CASES = [StepCase("plum-110m", "triton", 40, _SMOKE_SHRINK + (("num_hidden_layers", 1), ("num_experts", 4))),
               StepCase("medium", "reference", 40, _SMOKE_SHRINK)]


def sft_lengths(total: int, cap: int, seed: int = 0) -> list[int]:
    """Lognormal lengths (median 512, or a quarter of ``total`` when smaller; at most ``cap``, at
    least ``MIN_LEN``) summing to ``total``."""
    from bench_attention import lognormal_lengths

    lens: list[int] = []
    for n in lognormal_lengths(total, min(512, cap, max(MIN_LEN, total // 4)), cap, seed):
        if lens and (n < MIN_LEN or lens[-1] < MIN_LEN) and lens[-1] + n <= cap:
            lens[-1] += n          # fold a short sequence into its neighbour
        else:
            lens.append(n)
    return lens


def synthetic_batch(vocab_size: int, lens: list[int], seed: int = 0):
    """A ``PackedBatch`` of random-token sequences with the loss on each one's last ``TARGET_TOKENS``."""
    from plumrec.sequences import Example, pack

    rng = np.random.default_rng(seed)
    examples = []
    for n in lens:
        w = np.zeros(n, np.float32)
        w[-TARGET_TOKENS:] = 1.0
        examples.append(Example(rng.integers(0, vocab_size, n, dtype=np.int64), w))
    return pack(examples)


def step_flops(cfg, lens: list[int], loss_positions: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward), see the module docstring."""
    T = sum(lens)
    l_eff = sum(n * n for n in lens) / T
    head = 6.0 * cfg.vocab_size * cfg.hidden_size   # 3 x 2 FLOPs per LM-head weight and position
    return T * cfg.flops_per_token(l_eff) - head * (T - loss_positions)


def make_step(model, batch, device):
    """The training step as a callable returning the loss (AdamW, clipping, bf16 autocast on CUDA)."""
    import torch

    from plumrec.train import TrainConfig, lm_loss
    from plumrec.train.optim import make_optimizer

    opt = make_optimizer(model, TrainConfig(lr=1e-4))
    bf16 = device.type == "cuda"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()
    return step


def run_case(rec: Recorder, timer: Timer, c: StepCase, device) -> None:
    """Build the model and batch, check one step's loss is finite, time the step, record the row."""
    import torch

    from plumrec.model import PlumLM, preset

    cfg = preset(c.preset, kernel_impl=c.impl, **dict(c.overrides))
    model = PlumLM(cfg).to(device).train()
    lens = sft_lengths(c.tokens, cfg.max_position_embeddings)
    batch = synthetic_batch(cfg.vocab_size, lens).to(device)
    step = make_step(model, batch, device)
    finite(step())
    ms, how = timer(step, rep_ms=1000)
    T, M = batch.num_tokens, int(batch.loss_index.numel())
    flops = step_flops(cfg, lens, M)
    shape = shape_str(preset=c.preset, T=T, B=len(lens), M=M, max=max(lens), L_eff=round(sum(n * n for n in lens) / T))
    notes = f"{cfg.num_params() / 1e6:.2f}M params, {cfg.activated_params() / 1e6:.2f}M activated"
    if ms:
        tps = T / ms * 1e3
        notes += (f"; {tps:,.0f} tokens/s; MFU {flops / ms / 1e9 / DATASHEET['bf16_dense_tflops']:.1%} of the "
                  f"{DATASHEET['bf16_dense_tflops']:.0f} TFLOP/s datasheet")
        mfu_all = model.mfu(tps, round(sum(n * n for n in lens) / T), rec.peaks["bf16_tflops"] * 1e12)
        rec.set(f"{c.preset}/{c.impl}", {"tokens_per_s": tps, "step_ms": ms, "model_tflop_per_step": flops / 1e12,
                                          "mfu_all_positions_vs_measured_peak": mfu_all})
    rec.row("sft step", shape, "bf16 autocast" if device.type == "cuda" else "float32", c.impl, ms, flops=flops,
            baseline="reference", timer=how, notes=notes)
    del model, step
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    args, device_type, rec, timer = suite_setup(argv, "train_step", __doc__)
    import torch

    device = torch.device(device_type)
    rec.set("flops", "T * flops_per_token(L_eff) - 6 V d (T - M); L_eff = sum L_b^2 / T; "
                     "mfu_all_positions_*: PlumLM.mfu, which counts the LM head at every token")
    for c in SMOKE_CASES if args.smoke else CASES:
        try_part(rec, f"{c.preset} {c.impl}", lambda c=c: run_case(rec, timer, c, device))
    return rec.record


if __name__ == "__main__":
    main()
