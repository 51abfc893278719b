"""The training loop shared by CPT, SFT and the SASRec baseline: :func:`train`.

One step: ``grad_accum`` micro-batches per rank (at most ``max_tokens``
tokens each, from a seeded :class:`~plumrec.sequences.ExampleStream`), the
loss (:mod:`plumrec.train.losses`, :class:`~plumrec.train.codebook_loss.CodebookLoss`
or the caller's) under bf16 autocast on CUDA (``bf16=None`` turns it on
exactly there), gradient clipping, a check that the loss and the gradient
norm are finite (else the step stops the run or is skipped, ``nonfinite``),
AdamW with warm-up and cosine decay (:mod:`plumrec.train.optim`), the
optional weight average. Around it:
DDP/FSDP2 under ``torchrun`` (:mod:`plumrec.train.distributed`), atomic
rotated checkpoints and exact resume (:mod:`plumrec.train.checkpoint`), metrics as
JSON lines (``metrics.jsonl``) and a tqdm progress bar on rank 0.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from plumrec.sequences import ExampleStream
from plumrec.train.checkpoint import METRICS_NAME, resume_checkpoint, save_checkpoint
from plumrec.train.config import TrainConfig
from plumrec.train.distributed import all_reduce_floats, dist_env, grouped, wrap_model
from plumrec.train.losses import LOGGED_PARTS, lm_loss
from plumrec.train.optim import ParameterEMA, lr_lambda, make_optimizer

__all__ = ["train"]


def train(model, dataset, cfg: TrainConfig, out_dir: str | os.PathLike, *, resume: bool = True,
          loss_fn: Callable = lm_loss, desc: str = "train", stop_after: int | None = None) -> dict:
    """Train ``model`` on ``dataset`` (random-access examples, see :mod:`plumrec.train.corpus`).

    Resumes from the newest checkpoint of ``out_dir`` that loads (``checkpoint-<step>.pt``, see
    :mod:`plumrec.train.checkpoint`, which also lists what a resume refuses) when ``resume``.
    ``stop_after`` ends the run early after that many steps (with a checkpoint), as a pre-empted
    job would; the schedule still spans ``cfg.steps``. Returns the last logged metrics (``{}`` when
    the checkpoint is already at ``cfg.steps``).

    A step whose loss (any part) or gradient norm is not finite never updates the weights: with
    ``cfg.nonfinite="stop"`` it raises ``FloatingPointError`` (naming the step and the part, or
    "gradient norm") before any later checkpoint is written, so the last good one is kept; with
    ``"skip"`` the step is skipped (the schedule still advances), warned about and counted in the
    ``skipped`` column of ``metrics.jsonl`` and of the returned row. The check reads the loss parts
    the loop already copies to the host and the gradient norm (one host sync per step; distributed
    runs add a 1-element all-reduce on the process group's device, so that every rank decides alike).

    With ``cfg.ema_decay > 0`` a :class:`ParameterEMA` of the weights is kept
    (and checkpointed), and once step ``cfg.steps`` is reached the model's
    parameters are replaced by it, so the caller saves the averaged model. A
    run stopped earlier (``stop_after``) keeps the raw weights.
    """
    out = Path(out_dir)
    rank, world = dist_env()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if world > 1:
        dist.barrier()
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    wrapped = wrap_model(model, cfg)
    opt = make_optimizer(wrapped, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ema = _weight_average(model, cfg)
    step, position, skipped = resume_checkpoint(out, wrapped, opt, sched, ema, cfg, resume=resume)
    stream = ExampleStream(dataset, max_tokens=cfg.max_tokens, seed=cfg.seed, position=position)
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, disable=not cfg.progress or rank != 0, unit="step")
    last: dict = {}
    t0, tokens_seen, saved = time.perf_counter(), 0, step
    wrapped.train()
    while step < end:
        sums, gnorm, tokens = _step(wrapped, opt, stream, loss_fn, cfg, device, use_bf16)
        tokens_seen += tokens
        bad = _nonfinite(sums, gnorm)
        if bad is None:
            opt.step()
        elif cfg.nonfinite == "stop":
            bar.close()
            raise FloatingPointError(f"step {step + 1}: {_describe(bad, sums, gnorm)}; training stops before the "
                                     "update of this step, " + (f"the last checkpoint (step {saved}) in {out} is kept"
                                                                if saved else f"no checkpoint was written to {out}")
                                     + ". Resume with TrainConfig(nonfinite='skip') to skip such steps, or start "
                                     "over with another lr or grad_clip")
        else:
            skipped += 1
            if rank == 0:
                warnings.warn(f"step {step + 1}: {_describe(bad, sums, gnorm)}; the step is skipped "
                              f"(nonfinite='skip'), {skipped} so far", stacklevel=2)
        sched.step()
        step += 1
        if ema is not None and bad is None:
            ema.update(step)
        bar.update(1)
        if step % cfg.log_every == 0 or step == end:
            last = _log(out, step, {**sums, "grad_norm": gnorm}, sched, stream, skipped,
                        tokens_seen / max(time.perf_counter() - t0, 1e-9))
            if last["loss"] is not None:
                bar.set_postfix(loss=f"{last['loss']:.3f}")
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == end:
            save_checkpoint(out, wrapped, opt, sched, step=step, position=stream.position, cfg=cfg, skipped=skipped,
                            ema=ema)
            saved = step
    bar.close()
    if ema is not None and step >= cfg.steps:
        ema.copy_to_model()
    return last


def _weight_average(model, cfg: TrainConfig) -> ParameterEMA | None:
    """The :class:`ParameterEMA` of ``cfg.ema_decay`` (None when 0); warns when the decay is never
    reached in ``cfg.steps`` steps, since every higher decay then trains the same average."""
    if not cfg.ema_decay:
        return None
    ema = ParameterEMA(model, cfg.ema_decay, cfg.ema_warmup)
    if (last := ema.decay_at(cfg.steps)) < ema.decay:
        warnings.warn(f"ema_decay={ema.decay} is never reached in {cfg.steps} steps: the warm-up "
                      f"(1 + t) / ({ema.warmup:g} + t) sets the decay of every step (at most {last:.5f} at the "
                      f"last), so any ema_decay >= {last:.5f} trains the same average (a smaller ema_warmup "
                      "averages over more steps)", stacklevel=3)
    return ema


def _step(wrapped, opt, stream: ExampleStream, loss_fn: Callable, cfg: TrainConfig, device,
          use_bf16: bool) -> tuple[dict, torch.Tensor, int]:
    """The gradients of one optimizer step over ``cfg.grad_accum`` micro-batches of this rank (clipped to
    ``cfg.grad_clip``; the caller steps the optimizer): ``(mean loss parts, gradient norm before clipping,
    tokens of every rank)``. Gradients are synchronised on the last micro-batch only."""
    rank, world = dist_env()
    opt.zero_grad(set_to_none=True)
    sums = {"loss": 0.0, "ce": 0.0, "aux": 0.0}
    tokens = 0
    for micro in range(cfg.grad_accum):
        batches = [stream.next_batch() for _ in range(world)]  # every rank builds all, keeps its own
        batch = batches[rank].to(device)
        sync = micro == cfg.grad_accum - 1 or world == 1 or cfg.fsdp
        ctx = wrapped.no_sync() if not sync and hasattr(wrapped, "no_sync") else contextlib.nullcontext()
        with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss, parts = loss_fn(wrapped, batch)
        (loss / cfg.grad_accum).backward()
        sums["loss"] += float(loss.detach()) / cfg.grad_accum
        sums["ce"] += float(parts["ce"]) / cfg.grad_accum
        sums["aux"] += float(parts["aux"]) / cfg.grad_accum
        for k in LOGGED_PARTS:  # CodebookLoss's item_loss / distill terms (logged beside "ce")
            if k in parts:
                sums[k] = sums.get(k, 0.0) + float(parts[k]) / cfg.grad_accum
        tokens += sum(b.num_tokens for b in batches)
    if cfg.grad_clip:
        gnorm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
    else:
        gnorm = torch.nn.utils.get_total_norm([p.grad for p in wrapped.parameters() if p.grad is not None])
    return sums, gnorm, tokens


def _nonfinite(sums: dict, gnorm: torch.Tensor) -> str | None:
    """What is not finite in this step: the first such loss part (``"ce"``, ``"aux"``, ..., then ``"loss"``)
    on any rank, else ``"gradient"`` when the gradient norm is not, else None."""
    bad = next((k for k in [*(k for k in sums if k != "loss"), "loss"] if not math.isfinite(sums[k])), None)
    if grouped():  # the parts are this rank's: every rank must decide alike
        (flag,) = all_reduce_floats([0.0 if bad is None else 1.0], op="max")
        if bad is None and flag > 0:
            bad = "loss (on another rank)"
    if bad is None and not math.isfinite(float(gnorm)):
        bad = "gradient"
    return bad


def _describe(bad: str, sums: dict, gnorm: torch.Tensor) -> str:
    what = "the gradient norm" if bad == "gradient" else f"the loss part {bad!r}"
    values = ", ".join(f"{k}={v:.4g}" for k, v in sums.items())
    return f"{what} is not finite ({values}, grad_norm={float(gnorm):.4g})"


def _log(out: Path, step: int, sums: dict, sched, stream: ExampleStream, skipped: int, tokens_per_s: float) -> dict:
    """The metrics row of ``step`` (loss parts averaged over the ranks; a value that is not finite as
    ``null``), appended to ``metrics.jsonl`` on rank 0."""
    rank, world = dist_env()
    sums = {k: float(v) for k, v in sums.items()}
    if grouped():
        sums = {k: v / world for k, v in zip(sums, all_reduce_floats(list(sums.values())))}
    row = {"step": step, **{k: v if math.isfinite(v) else None for k, v in sums.items()},
           "lr": sched.get_last_lr()[0], "epoch": stream.epoch, "skipped": skipped, "tokens_per_s": tokens_per_s}
    if rank == 0:
        with open(out / METRICS_NAME, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row
