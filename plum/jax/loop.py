"""The JAX training loop of CPT and SFT: :func:`train`, the twin of :func:`plumrec.train.loop.train`.

One step: ``grad_accum`` packed micro-batches from the torch loop's own
:class:`~plumrec.sequences.ExampleStream` (same dataset, ``max_tokens``, seed and position: the same
examples in the same order), each padded to a fixed shape (:func:`pad_batch`) so that the jitted step
compiles once per bucket rather than once per batch, the step of :func:`plumrec.jax.train.make_train_step`
(AdamW, warm-up and cosine decay, clipping as torch), a check that the loss parts and the gradient norm
are finite (``nonfinite``: stop before the update, or skip the update while the schedule advances), the
optional weight average (``ema_decay``, ``ema_warmup`` as :class:`plumrec.train.optim.ParameterEMA`).
Dropout (``ModelConfig.hidden_dropout``) draws from ``fold_in(fold_in(key(seed), step), micro_batch)``,
so a resumed run draws the same masks. Around it: atomic rotated checkpoints and exact resume
(:mod:`plumrec.jax.checkpoint`), the metrics rows of the torch loop in ``metrics.jsonl`` and a tqdm bar.

Padding: the tokens are padded to ``max_tokens`` with extra sequences of token 0 (attention never mixes
sequences), the sequence boundaries and the loss positions to the next power of two with empty
sequences and zero-weight copies of the first loss position; the batch's ``token_mask`` marks the padding
tokens, which the MoE router's auxiliary losses (load balance, z-loss) leave out. The loss and its
gradients are those of the unpadded batch; ``pad=False`` keeps every batch's own shapes (one compilation
per distinct shape).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from plumrec.jax.checkpoint import load_params, read_checkpoint, restore_checkpoint, save_checkpoint
from plumrec.jax.train import Batch, batch_from_packed, make_loss, make_train_step
from plumrec.model.config import ModelConfig
from plumrec.sequences import ExampleStream
from plumrec.train.checkpoint import METRICS_NAME, _trim_metrics, list_checkpoints
from plumrec.train.config import TrainConfig
from plumrec.train.optim import lr_lambda

__all__ = ["TrainResult", "train", "pad_batch", "seqlen_bucket", "check_supported"]


class TrainResult(NamedTuple):
    """What :func:`train` returns: the trained ``params`` (name -> array; the weight average once
    ``steps`` is reached with ``ema_decay`` > 0) and the last logged metrics row (``{}`` when the
    checkpoint was already at ``steps``)."""
    params: dict
    metrics: dict


def check_supported(tcfg: TrainConfig) -> None:
    """``ValueError`` naming the :class:`TrainConfig` fields this single-process JAX loop does not apply:
    ``bf16=True`` (the JAX model trains in its parameters' dtype), ``fsdp=True``, and the validation checks
    with early stopping (``eval_every`` / ``patience``: the torch loop's)."""
    if not isinstance(tcfg, TrainConfig):
        raise TypeError(f"tcfg must be a TrainConfig, got {type(tcfg).__name__}")
    if tcfg.bf16:
        raise ValueError("TrainConfig.bf16=True is not supported by the JAX loop (it trains in the parameters' "
                         "dtype: pass bfloat16 params instead); use bf16=None or False")
    if tcfg.fsdp:
        raise ValueError("TrainConfig.fsdp=True is not supported by the JAX loop (single process); use fsdp=False")
    if tcfg.eval_every or tcfg.patience:
        raise ValueError(f"TrainConfig.eval_every={tcfg.eval_every} / patience={tcfg.patience}: the JAX loop has no "
                         "validation checks or early stopping (the torch loop has); use 0 for both")


def _bucket(n: int, cap: int) -> int:
    """The next power of two >= ``n`` (at least 8), at most ``cap`` (``n <= cap``)."""
    return min(max(8, 1 << max(n - 1, 0).bit_length()), cap)


def seqlen_bucket(n: int, cap: int) -> int:
    """The static ``max_seqlen`` of a padded batch whose longest sequence has ``n`` tokens: the next power of
    two (at least 16), at most ``cap``. Few distinct values (few compilations), and a tight bound for the
    attention, whose jnp reference reads only the keys within ``max_seqlen`` of each query block."""
    return min(cap, max(16, 1 << (int(n) - 1).bit_length()))


def pad_batch(batch: Batch, tokens: int, max_seqlen: int) -> Batch:
    """``batch`` padded to ``tokens`` tokens (extra sequences of token 0, each at most ``max_seqlen`` long),
    its ``cu_seqlens`` to a power-of-two length (empty sequences at the end), its loss positions to a
    power of two (copies of the first one with weight 0), and ``max_seqlen`` set to ``max_seqlen``.

    Args:
        batch: a :class:`~plumrec.jax.train.Batch` of ``T <= tokens`` tokens, sequences at most
            ``max_seqlen`` long, at least one loss position.
        tokens: the padded token count (e.g. ``TrainConfig.max_tokens``).
        max_seqlen: the static ``max_seqlen`` of the result (<= the model's ``max_position_embeddings``).
    """
    T, M = int(batch.input_ids.shape[0]), int(batch.loss_index.shape[0])
    if T > tokens:
        raise ValueError(f"batch has {T} tokens, more than tokens={tokens}")
    if batch.max_seqlen > max_seqlen:
        raise ValueError(f"batch has a sequence of {batch.max_seqlen} tokens, more than max_seqlen={max_seqlen}")
    if M == 0:
        raise ValueError("batch has no loss position")
    cuts = list(range(T + max_seqlen, tokens, max_seqlen)) + ([tokens] if tokens > T else [])
    cu = np.concatenate([np.asarray(batch.cu_seqlens), np.asarray(cuts, np.int32)])
    cu = np.concatenate([cu, np.full(_bucket(len(cu), tokens + 1) - len(cu), tokens, np.int32)])
    m = _bucket(M, max(tokens, M))
    fill = np.zeros(m - M, np.int32)

    def grow(a, pad_value):
        return jnp.concatenate([a, jnp.full(m - M, pad_value, a.dtype)])

    real = np.arange(tokens) < T if batch.token_mask is None else \
        np.concatenate([np.asarray(batch.token_mask), np.zeros(tokens - T, bool)])
    return Batch(jnp.concatenate([batch.input_ids, jnp.zeros(tokens - T, batch.input_ids.dtype)]),
                 jnp.asarray(cu, jnp.int32), grow(batch.loss_index, batch.loss_index[0]),
                 grow(batch.targets, batch.targets[0]), jnp.concatenate([batch.weights, fill.astype(np.float32)]),
                 int(max_seqlen), jnp.asarray(real))


# The TrainConfig fields that leave the step's computation alone, set alike in _compiled's cache key.
_NEUTRAL = {"log_every": 1, "checkpoint_every": 0, "keep_checkpoints": 1, "nonfinite": "stop", "progress": False}


@functools.lru_cache(maxsize=8)
def _compiled(loss_fn: Callable, tcfg: TrainConfig):
    """``(opt, step, grad, apply)``: :func:`make_train_step`'s optimizer and step, and for ``grad_accum`` > 1
    the jitted gradient of one micro-batch and the update from accumulated gradients (cached, so that a
    resumed run in the same process reuses the compilations)."""
    opt, step = make_train_step(loss_fn, tcfg)

    @jax.jit
    def grad(params, batch, key):
        (loss, parts), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        return loss, parts, g

    @jax.jit
    def apply(params, opt_state, grads):
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)

    return opt, step, grad, apply


def _advance_schedule(old, new):
    """``old`` optimizer state with the schedule counts of ``new``: a skipped step moves the learning rate
    on (as torch's ``LambdaLR``) but not the Adam moments or their bias correction."""
    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree.map(lambda o, n: n if is_sched(o) else o, old, new, is_leaf=is_sched)


def _initial(init, cfg: ModelConfig | None) -> tuple[dict, ModelConfig]:
    if isinstance(init, (str, os.PathLike)):
        params, saved = load_params(init)
        if cfg is not None and cfg != saved:
            raise ValueError(f"cfg differs from the config of the model directory {init}")
        return params, saved
    if not isinstance(init, dict):
        raise TypeError(f"init must be a params dict or a model directory, got {type(init).__name__}")
    if not isinstance(cfg, ModelConfig):
        raise ValueError("cfg (a ModelConfig) is required when init is a params dict")
    return dict(init), cfg


def _resume(out: Path, tcfg: TrainConfig, cfg: ModelConfig, params, opt_state, ema):
    """The newest checkpoint of ``out`` that reads (older ones after a warning for each damaged one),
    checked against this run, restored; None when there is none."""
    for _, path in list_checkpoints(out):
        try:
            state, tensors = read_checkpoint(path)
        except ValueError as e:
            warnings.warn(f"{e}; trying an older checkpoint", stacklevel=3)
            continue
        changes = tcfg.resume_changes(state["config"])
        if changes:
            raise ValueError(f"{path} was written with another TrainConfig ({'; '.join(changes)}); resume with the "
                             "checkpoint's values or use a new output directory")
        if state["step"] > tcfg.steps:
            raise ValueError(f"{path} is at step {state['step']}, beyond this run's steps={tcfg.steps}")
        return restore_checkpoint(path, state, tensors, params=params, opt_state=opt_state, model_config=cfg,
                                  ema=ema)
    return None


def train(init, dataset, tcfg: TrainConfig, out_dir: str | os.PathLike, *, cfg: ModelConfig | None = None,
          loss_fn: Callable | None = None, resume: bool = True, desc: str = "train", stop_after: int | None = None,
          pad: bool = True) -> TrainResult:
    """Train the JAX PLUM LM on ``dataset`` as :func:`plumrec.train.loop.train` trains the torch one.

    Args:
        init: the initial parameters, a dict name -> array (:func:`~plumrec.jax.model.init_params`,
            :func:`~plumrec.jax.model.params_from_torch_state`), or a model directory (``save_model``'s, torch
            or JAX: its ``config.json`` gives ``cfg``).
        dataset: random-access examples (:class:`~plumrec.train.corpus.CPTCorpus`, ``SFTDataset``,
            ``SequenceSFTDataset``), streamed by :class:`~plumrec.sequences.ExampleStream`.
        tcfg: the run's :class:`TrainConfig` (``bf16=True`` and ``fsdp=True`` are refused, see
            :func:`check_supported`; ``progress`` turns the tqdm bar on).
        out_dir: checkpoints ``checkpoint-<step>/`` and ``metrics.jsonl`` (the torch loop's columns:
            ``step, loss, ce, aux, grad_norm, lr, epoch, skipped, tokens_per_s``).
        cfg: the model's config (required with a params dict; must equal the directory's otherwise).
        loss_fn: ``loss_fn(params, batch, dropout_key) -> (loss, {"ce", "aux"})``
            (:func:`~plumrec.jax.train.make_loss`); default CPT's ``make_loss(cfg)``. Pass the same object
            to a resumed run in one process to reuse its compilation.
        resume: continue from the newest checkpoint of ``out_dir`` that reads; refused (``ValueError``)
            when it was written with another TrainConfig (outside ``SAFE_TO_CHANGE``), at a step beyond
            ``tcfg.steps``, for another model or optimizer state.
        desc: the progress bar's label.
        stop_after: stop after that many steps (with a checkpoint), as a pre-empted job would; the
            schedule still spans ``tcfg.steps``.
        pad: pad every micro-batch to a fixed shape (:func:`pad_batch`); False: exact shapes.

    Returns:
        :class:`TrainResult` ``(params, metrics)``.

    A step whose loss part or gradient norm is not finite never updates the weights: ``nonfinite="stop"``
    raises ``FloatingPointError`` before any later checkpoint; ``"skip"`` skips it (the schedule still
    advances), warns and counts it in ``skipped``.
    """
    check_supported(tcfg)
    params, cfg = _initial(init, cfg)
    loss_fn = loss_fn if loss_fn is not None else _default_loss(cfg)
    compiled = _compiled(loss_fn, dataclasses.replace(tcfg, **_NEUTRAL))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opt_state = compiled[0].init(params)
    ema = dict(params) if tcfg.ema_decay else None
    ck = _resume(out, tcfg, cfg, params, opt_state, ema) if resume else None
    run = _Run(params, opt_state, ema, 0, 0) if ck is None else _Run(*ck[:4], ck.skipped)
    _trim_metrics(out / METRICS_NAME, run.step)
    stream = ExampleStream(dataset, max_tokens=tcfg.max_tokens, seed=tcfg.seed, position=0 if ck is None
                           else ck.position)
    end = tcfg.steps if stop_after is None else min(tcfg.steps, run.step + stop_after)
    seq_cap = min(tcfg.max_tokens, cfg.max_position_embeddings)
    shape = (lambda b: pad_batch(b, tcfg.max_tokens, seqlen_bucket(b.max_seqlen, seq_cap))) if pad else (lambda b: b)
    last = _loop(run, compiled, stream, shape, tcfg, cfg, out, end, desc)
    if run.ema is not None and run.step >= tcfg.steps:
        run.params = run.ema
    return TrainResult(run.params, last)


@dataclasses.dataclass
class _Run:
    """The state a step changes: parameters, optimizer state, weight average, steps done and skipped."""
    params: dict
    opt_state: object
    ema: dict | None
    step: int
    skipped: int


def _loop(run: _Run, compiled, stream: ExampleStream, shape: Callable, tcfg: TrainConfig, cfg: ModelConfig,
          out: Path, end: int, desc: str) -> dict:
    """Steps ``run`` up to step ``end``: update, weight average, log, checkpoint; the last metrics row."""
    base_key = jax.random.key(tcfg.seed) if cfg.hidden_dropout else None
    bar = tqdm(total=tcfg.steps, initial=run.step, desc=desc, disable=not tcfg.progress, unit="step")
    last: dict = {}
    t0, tokens_seen = time.perf_counter(), 0
    while run.step < end:
        key = None if base_key is None else jax.random.fold_in(base_key, run.step)
        params, opt_state, sums, tokens = _step(compiled, run.params, run.opt_state, stream, shape, key, tcfg, cfg)
        tokens_seen += tokens
        bad = _nonfinite(sums)
        if bad is None:
            run.params, run.opt_state = params, opt_state
        elif tcfg.nonfinite == "stop":
            bar.close()
            raise FloatingPointError(f"step {run.step + 1}: {_describe(bad, sums)}; training stops before the update "
                                     f"of this step (the last checkpoint in {out} is kept). Resume with "
                                     "TrainConfig(nonfinite='skip') to skip such steps, or start over with another "
                                     "lr or grad_clip")
        else:
            run.opt_state = _advance_schedule(run.opt_state, opt_state)
            run.skipped += 1
            warnings.warn(f"step {run.step + 1}: {_describe(bad, sums)}; the step is skipped (nonfinite='skip'), "
                          f"{run.skipped} so far", stacklevel=3)
        run.step += 1
        if run.ema is not None and bad is None:
            decay = min(tcfg.ema_decay, (1 + run.step) / (tcfg.ema_warmup + run.step))
            run.ema = _ema_update(run.ema, run.params, decay)
        bar.update(1)
        if run.step % tcfg.log_every == 0 or run.step == end:
            last = _log(out, run.step, sums, tcfg, stream, run.skipped,
                        tokens_seen / max(time.perf_counter() - t0, 1e-9))
            if last["loss"] is not None:
                bar.set_postfix(loss=f"{last['loss']:.3f}")
        if (tcfg.checkpoint_every and run.step % tcfg.checkpoint_every == 0) or run.step == end:
            save_checkpoint(out, params=run.params, opt_state=run.opt_state, step=run.step, position=stream.position,
                            skipped=run.skipped, seed=tcfg.seed, config=tcfg.to_dict(), model_config=cfg,
                            ema=run.ema, keep=tcfg.keep_checkpoints)
    bar.close()
    return last


def _nonfinite(sums: dict) -> str | None:
    """The first loss part that is not finite (``"loss"`` last), else ``"gradient"`` when the gradient norm
    is not, else None (the torch loop's order)."""
    parts = [k for k in sums if k not in ("loss", "grad_norm")] + ["loss"]
    bad = next((k for k in parts if not math.isfinite(sums[k])), None)
    return bad if bad is not None or math.isfinite(sums["grad_norm"]) else "gradient"


@functools.lru_cache(maxsize=8)
def _default_loss(cfg: ModelConfig) -> Callable:
    return make_loss(cfg)


@jax.jit
def _ema_update(ema: dict, params: dict, decay) -> dict:
    """``ema + (1 - decay) * (params - ema)`` (torch's ``lerp``)."""
    return jax.tree.map(lambda s, p: s + (1.0 - decay) * (p - s), ema, params)


def _step(compiled, params, opt_state, stream: ExampleStream, shape: Callable, key, tcfg: TrainConfig,
          cfg: ModelConfig):
    """One optimizer step over ``tcfg.grad_accum`` micro-batches: ``(new params, new optimizer state,
    {loss, ce, aux, grad_norm} as floats, real tokens)``; the caller keeps or drops the update."""
    opt, step_fn, grad_fn, apply_fn = compiled
    packed = [stream.next_batch() for _ in range(tcfg.grad_accum)]
    for b in packed:
        if b.max_seqlen > cfg.max_position_embeddings:
            raise ValueError(f"an example of {b.max_seqlen} tokens exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}; use max_tokens <= {cfg.max_position_embeddings}")
    batches = [shape(batch_from_packed(b)) for b in packed]
    keys = [None if key is None else jax.random.fold_in(key, i) for i in range(len(batches))]
    tokens = sum(b.num_tokens for b in packed)
    if len(batches) == 1:
        new_params, new_state, loss, parts = step_fn(params, opt_state, batches[0], keys[0])
        return new_params, new_state, _ordered({"loss": loss, **parts}), tokens
    sums, grads = {"loss": 0.0}, None
    for batch, k in zip(batches, keys):
        loss, parts, g = grad_fn(params, batch, k)
        g = jax.tree.map(lambda x: x / tcfg.grad_accum, g)
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        for name, v in {"loss": loss, **parts}.items():
            sums[name] = sums.get(name, 0.0) + float(v) / tcfg.grad_accum
    new_params, new_state, gnorm = apply_fn(params, opt_state, grads)
    return new_params, new_state, _ordered({**sums, "grad_norm": gnorm}), tokens


def _ordered(parts: dict) -> dict:
    """``parts`` as floats in the torch loop's column order: loss, ce, aux, the other parts, grad_norm."""
    first, end = ("loss", "ce", "aux"), ("grad_norm",)
    names = [k for k in first if k in parts] + sorted(set(parts) - set(first) - set(end)) + \
        [k for k in end if k in parts]
    return {k: float(parts[k]) for k in names}


def _describe(bad: str, sums: dict) -> str:
    what = "the gradient norm" if bad == "gradient" else f"the loss part {bad!r}"
    return f"{what} is not finite ({', '.join(f'{k}={v:.4g}' for k, v in sums.items())})"


def _log(out: Path, step: int, sums: dict, tcfg: TrainConfig, stream: ExampleStream, skipped: int,
         tokens_per_s: float) -> dict:
    """The metrics row of ``step`` (a value that is not finite as ``null``), appended to ``metrics.jsonl``;
    ``lr`` is the rate of the next step, as torch's ``get_last_lr`` after ``sched.step()``."""
    row = {"step": step, **{k: v if math.isfinite(v) else None for k, v in sums.items()},
           "lr": tcfg.lr * lr_lambda(tcfg)(step), "epoch": stream.epoch, "skipped": skipped,
           "tokens_per_s": tokens_per_s}
    with open(out / METRICS_NAME, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row
