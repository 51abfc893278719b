"""The optimiser side of training: AdamW without weight decay on norms and biases, the
learning-rate schedule (linear warm-up, then cosine decay to ``min_lr_ratio * lr``) and
the exponential moving average of the weights (:class:`ParameterEMA`)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from plumrec.train.config import TrainConfig

__all__ = ["lr_lambda", "make_optimizer", "ParameterEMA"]


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(cfg.steps - cfg.warmup_steps, 1)
        t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith("bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


class ParameterEMA:
    """Exponential moving average of a model's parameters (weight averaging).

    After optimizer step ``t`` (1-based), every parameter's average moves as
    ``ema = d_t * ema + (1 - d_t) * p`` with ``d_t = min(decay, (1 + t) / (W + t))``,
    ``W = warmup`` (default 10, as in TensorFlow's ``ExponentialMovingAverage``):

    - the warm-up term keeps the first steps from tying the average to the
      initial weights: while it binds, the average after ``t`` steps spans
      roughly the last ``(W + t) / (W - 1)`` steps (``W = 2``: nearly the
      running mean of every step; ``W = 10``: the last ~t/9);
    - it binds until ``t = (W d - 1) / (1 - d)`` (e.g. 8,990 steps for
      ``d = 0.999``, ``W = 10``), and from then on the average spans roughly
      the last ``1 / (1 - d)`` steps; ``W = 1`` turns the warm-up off.

    :func:`train` warns when ``decay`` is never reached in its ``steps``,
    since every higher decay then gives the same average. The average
    starts as a copy of the parameters and has their dtype and device.
    Buffers are not averaged.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: float = 10.0):
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        if not warmup >= 1:
            raise ValueError(f"ema_warmup must be >= 1 (1: no warm-up), got {warmup}")
        self.decay, self.warmup = float(decay), float(warmup)
        named = [(n, p) for n, p in model.named_parameters()]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self.params]

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (self.warmup + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay_at(step))

    def state_dict(self) -> dict:
        return {n: s.detach().cpu().clone() for n, s in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.names):
            raise ValueError(f"EMA state has parameters {sorted(set(state) ^ set(self.names))[:5]} that the model "
                             "does not (or the other way round)")
        for n, s in zip(self.names, self.shadow):
            s.copy_(state[n])

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)
