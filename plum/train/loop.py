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

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from plumrec.io import atomic_path
from plumrec.sequences import ExampleStream
from plumrec.train.checkpoint import METRICS_NAME, resume_checkpoint, save_checkpoint
from plumrec.train.config import TrainConfig
from plumrec.train.distributed import all_reduce_floats, dist_env, grouped, wrap_model
from plumrec.train.losses import LOGGED_PARTS, lm_loss
from plumrec.train.optim import ParameterEMA, lr_lambda, make_optimizer

__all__ = ["train", "steps_for_epochs"]

MIN_PACKED_BATCHES = 64  # micro-batches that steps_for_epochs packs at least, to estimate examples per batch


def train(model, dataset, cfg: TrainConfig, out_dir: str | os.PathLike, *, resume: bool = True,
          loss_fn: Callable = lm_loss, desc: str = "train", stop_after: int | None = None,
          evaluate: Callable[[int], float] | None = None) -> dict:
    """Train ``model`` on ``dataset`` (random-access examples, see :mod:`plumrec.train.corpus`).

    Resumes from the newest checkpoint of ``out_dir`` that loads (``checkpoint-<step>``, see
    :mod:`plumrec.train.checkpoint`, which also lists what a resume refuses) when ``resume``.
    ``stop_after`` ends the run early after that many steps (with a checkpoint), as a pre-empted
    job would; the schedule still spans ``cfg.steps``. Returns the last logged metrics (``{}`` when
    the checkpoint is already at ``cfg.steps``).

    A step whose loss (any part) or gradient norm is not finite never updates the weights (see
    :func:`_update`: ``cfg.nonfinite`` raises or skips).

    With ``cfg.ema_decay > 0`` a :class:`ParameterEMA` of the weights is kept (and checkpointed), and once
    step ``cfg.steps`` is reached the model gets it; a run stopped earlier (``stop_after``) keeps the raw weights.

    With ``cfg.eval_every > 0``, ``evaluate(step) -> score`` (higher is better, e.g. validation recall@10;
    called on every rank, the model in eval mode, the RNGs untouched) scores the weights the run would end
    with every ``eval_every`` steps and at ``cfg.steps``; :class:`_Selection` keeps the best weights, stops
    early (``cfg.patience``) and says what the checkpoints keep of it.
    """
    out = Path(out_dir)
    rank, world = dist_env()
    if cfg.eval_every and evaluate is None:
        raise ValueError(f"cfg.eval_every={cfg.eval_every} needs evaluate: a callable step -> score")
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
    step, position, skipped, extra = resume_checkpoint(out, wrapped, opt, sched, ema, cfg, resume=resume)
    select = _Selection(out, model, ema, cfg, evaluate, extra) if cfg.eval_every else None
    stream = ExampleStream(dataset, max_tokens=cfg.max_tokens, seed=cfg.seed, position=position)
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    end = step if select is not None and select.stopped else end
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, disable=not cfg.progress or rank != 0, unit="step")
    last: dict = {}
    t0, tokens_seen, saved = time.perf_counter(), 0, step
    wrapped.train()
    while step < end:
        sums, gnorm, tokens = _step(wrapped, opt, stream, loss_fn, cfg, device, use_bf16)
        tokens_seen += tokens
        bad = _nonfinite(sums, gnorm)
        if bad is not None and cfg.nonfinite == "stop":
            bar.close()  # _update raises
        skipped = _update(opt, cfg, bad, sums, gnorm, step, skipped, saved, out)
        sched.step()
        step += 1
        if ema is not None and bad is None:
            ema.update(step)
        bar.update(1)
        scored = select.run(step) if select is not None and select.due(step) else None
        if step % cfg.log_every == 0 or step == end or scored is not None:
            last = _log(out, step, {**sums, "grad_norm": gnorm}, sched, stream, skipped,
                        tokens_seen / max(time.perf_counter() - t0, 1e-9), scored)
            if last["loss"] is not None:
                bar.set_postfix(loss=f"{last['loss']:.3f}")
        stop = select is not None and select.stopped
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == end or stop:
            save_checkpoint(out, wrapped, opt, sched, step=step, position=stream.position, cfg=cfg, skipped=skipped,
                            ema=ema, extra=None if select is None else select.state())
            saved = step
            if select is not None:
                select.prune()
        if stop:
            break
    bar.close()
    if select is not None and (step >= cfg.steps or select.stopped) and select.restore():
        return {**last, **select.summary()}
    if ema is not None and step >= cfg.steps:
        ema.copy_to_model()
    return last


def steps_for_epochs(dataset, epochs: float, *, max_tokens: int, grad_accum: int = 1, world: int = 1,
                     sample: int = 4096, seed: int = 0) -> int:
    """The optimizer steps that take ``epochs`` passes over ``dataset`` (random-access examples):
    ``ceil(epochs * len(dataset) / examples per step)``, a step being ``grad_accum * world`` micro-batches
    that each pack examples as :class:`~plumrec.sequences.ExampleStream` does (at most ``max_tokens``
    tokens, a longer example cut to its tail). Examples per micro-batch are estimated by packing the lengths
    of up to ``sample`` examples drawn without replacement (seed ``seed``), in the drawn order and cycled
    over at least :data:`MIN_PACKED_BATCHES` micro-batches; so steps scale with the dataset's size for one
    distribution of example lengths. At least 1."""
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not (math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"epochs must be a finite number > 0, got {epochs!r}")
    if max_tokens < 2 or grad_accum < 1 or world < 1 or sample < 1:
        raise ValueError(f"need max_tokens >= 2, grad_accum, world and sample >= 1, got {max_tokens}, {grad_accum}, "
                         f"{world}, {sample}")
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    rng = np.random.default_rng(seed)
    drawn = rng.choice(n, min(n, sample), replace=False) if n > sample else rng.permutation(n)
    lengths = [min(len(dataset[int(i)].tokens), max_tokens) for i in drawn]
    batches = examples = total = in_batch = 0
    i = 0
    while True:
        length = lengths[i % len(lengths)]
        if in_batch and total + length > max_tokens:  # the batch is full: length opens the next one
            batches, examples, total, in_batch = batches + 1, examples + in_batch, 0, 0
            if batches >= MIN_PACKED_BATCHES and i >= len(lengths):
                break
        total, in_batch, i = total + length, in_batch + 1, i + 1
    per_step = examples / batches * grad_accum * world
    return max(1, math.ceil(epochs * n / per_step))


def _update(opt, cfg: TrainConfig, bad: str | None, sums: dict, gnorm, step: int, skipped: int, saved: int,
            out: Path) -> int:
    """Step the optimizer unless ``bad`` (what is not finite in step ``step + 1``). Then, with
    ``cfg.nonfinite="stop"``, raise ``FloatingPointError`` (naming the step and the part, or "gradient
    norm") before any later checkpoint is written, so the last good one (step ``saved``) is kept; with
    ``"skip"`` the step is skipped (the schedule still advances), warned about and counted in the
    ``skipped`` column of ``metrics.jsonl`` and of the returned row (the check costs one host sync per
    step; distributed runs add a 1-element all-reduce, so that every rank decides alike). Returns the
    count of skipped steps."""
    if bad is None:
        opt.step()
        return skipped
    if cfg.nonfinite == "stop":
        raise FloatingPointError(f"step {step + 1}: {_describe(bad, sums, gnorm)}; training stops before the "
                                 "update of this step, " + (f"the last checkpoint (step {saved}) in {out} is kept"
                                                            if saved else f"no checkpoint was written to {out}")
                                 + ". Resume with TrainConfig(nonfinite='skip') to skip such steps, or start "
                                 "over with another lr or grad_clip")
    skipped += 1
    if dist_env()[0] == 0:
        warnings.warn(f"step {step + 1}: {_describe(bad, sums, gnorm)}; the step is skipped "
                      f"(nonfinite='skip'), {skipped} so far", stacklevel=3)
    return skipped


class _Selection:
    """Model selection during :func:`train`: ``evaluate(step)`` every ``cfg.eval_every`` steps and at
    ``cfg.steps``, the best weights and early stopping.

    A score above every earlier one (a non-finite score never is) makes its step the best: the weights
    scored (the :class:`ParameterEMA` average where ``ema_decay``, else the raw weights) are written to
    ``out/best-<step>.safetensors`` (rank 0); other ``best-*.safetensors`` files are deleted at the next
    checkpoint. With ``cfg.patience`` > 0, that many evaluations in a row without a new best stop the run
    (a checkpoint is written at that step). Once the run ends (``cfg.steps`` or stopped) the model gets the
    best weights. Each checkpoint keeps the best score and step, the evaluations since the best and whether
    the run stopped, so a resumed run goes on exactly as the uninterrupted one would.
    """

    def __init__(self, out: Path, model, ema: ParameterEMA | None, cfg: TrainConfig, evaluate: Callable,
                 state: dict | None):
        self.out, self.model, self.ema, self.cfg, self.evaluate = out, model, ema, cfg, evaluate
        state = state or {}
        self.best_score: float | None = state.get("best_score")
        self.best_step: int | None = state.get("best_step")
        self.since_best, self.stopped = int(state.get("since_best", 0)), bool(state.get("stopped", False))
        if self.best_step is not None and not self.path(self.best_step).is_file():
            raise ValueError(f"{out}: the checkpoint's best weights {self.path(self.best_step).name} are missing; "
                             "use a new output directory")

    def path(self, step: int) -> Path:
        return self.out / f"best-{step}.safetensors"

    def due(self, step: int) -> bool:
        return step % self.cfg.eval_every == 0 or step == self.cfg.steps

    def state(self) -> dict:
        return {"best_score": self.best_score, "best_step": self.best_step, "since_best": self.since_best,
                "stopped": self.stopped}

    def summary(self) -> dict:
        return {"best_eval": self.best_score, "best_step": self.best_step, "stopped_early": self.stopped}

    def run(self, step: int) -> dict:
        """Score the weights at ``step``, keep a new best, count towards the patience; the metrics row's
        ``eval`` (the score) and ``best_eval``."""
        device = next(self.model.parameters()).device
        raw = [p.detach().clone() for p in self.ema.params] if self.ema is not None else None
        if self.ema is not None:
            self.ema.copy_to_model()
        try:
            self.model.eval()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                score = float(self.evaluate(step))
            if math.isfinite(score) and (self.best_score is None or score > self.best_score):
                self.best_score, self.best_step, self.since_best = score, step, 0
                if dist_env()[0] == 0:
                    with atomic_path(self.path(step)) as tmp:
                        save_model(self.model, str(tmp))
            else:
                self.since_best += 1
        finally:
            if raw is not None:
                with torch.no_grad():
                    for p, r in zip(self.ema.params, raw):
                        p.copy_(r)
            self.model.train()
        self.stopped = bool(self.cfg.patience) and self.since_best >= self.cfg.patience
        return {"eval": score if math.isfinite(score) else None, "best_eval": self.best_score}

    def prune(self) -> None:
        """Delete the ``best-*.safetensors`` files other than the best step's (rank 0)."""
        if dist_env()[0] != 0:
            return
        keep = None if self.best_step is None else self.path(self.best_step).name
        for p in self.out.glob("best-*.safetensors"):
            if p.name != keep:
                p.unlink(missing_ok=True)

    def restore(self) -> bool:
        """Load the best weights into the model; False when no evaluation gave a finite score."""
        if self.best_step is None:
            return False
        if dist_env()[1] > 1:
            dist.barrier()
        device = next(self.model.parameters()).device
        load_model(self.model, str(self.path(self.best_step)), device=str(device))
        return True


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
        # every rank reads the same stream: it builds its own batch and skips the others' (by their lengths)
        skipped_tokens = [stream.skip_batch() for _ in range(rank)]
        own = stream.next_batch()
        skipped_tokens += [stream.skip_batch() for _ in range(rank + 1, world)]
        batch = own.to(device)
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
        tokens += own.num_tokens + sum(skipped_tokens)
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


def _log(out: Path, step: int, sums: dict, sched, stream: ExampleStream, skipped: int, tokens_per_s: float,
         scored: dict | None = None) -> dict:
    """The metrics row of ``step`` (loss parts averaged over the ranks; a value that is not finite as
    ``null``; ``scored``: the evaluation's columns, at an evaluated step), appended to ``metrics.jsonl`` on
    rank 0."""
    rank, world = dist_env()
    sums = {k: float(v) for k, v in sums.items()}
    if grouped():
        sums = {k: v / world for k, v in zip(sums, all_reduce_floats(list(sums.values())))}
    row = {"step": step, **{k: v if math.isfinite(v) else None for k, v in sums.items()},
           "lr": sched.get_last_lr()[0], "epoch": stream.epoch, "skipped": skipped, "tokens_per_s": tokens_per_s,
           **(scored or {})}
    if rank == 0:
        with open(out / METRICS_NAME, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row
