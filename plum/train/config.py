"""The settings of one training run (CPT, SFT or the SASRec baseline): :class:`TrainConfig`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["TrainConfig", "SAFE_TO_CHANGE", "NONFINITE_MODES"]

NONFINITE_MODES = ("stop", "skip")
# Fields a resumed run may set otherwise than its checkpoint (see TrainConfig.resume_changes); steps only upwards.
SAFE_TO_CHANGE = ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "nonfinite", "progress")


@dataclass(frozen=True)
class TrainConfig:
    """The settings of one run; every checkpoint records them.

    Resuming from a checkpoint refuses a config that differs from the recorded one
    (:meth:`resume_changes` names each field), except in the fields of :data:`SAFE_TO_CHANGE`,
    which change neither the data order nor the update of a step:

    - ``steps`` may grow (never shrink): the cosine decay then spans the new ``steps`` from the
      checkpoint on, so the learning rate moves to that longer curve;
    - ``log_every``, ``checkpoint_every``, ``keep_checkpoints``, ``progress``: what is logged, saved
      and shown;
    - ``nonfinite``: what a step with a non-finite loss or gradient norm does (``"stop"``: raise
      ``FloatingPointError`` before its update, so no checkpoint is written after it; ``"skip"``:
      no optimizer update for that step, counted as ``skipped`` in ``metrics.jsonl``), so a run
      stopped by a NaN can be resumed with ``nonfinite="skip"``.
    """

    steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0          # 0 disables
    grad_accum: int = 1             # micro-batches per step and rank
    max_tokens: int = 4096          # tokens per micro-batch
    log_every: int = 10
    checkpoint_every: int = 0       # 0: only at the end
    keep_checkpoints: int = 2       # checkpoint-<step>.pt files kept (the newest ones)
    nonfinite: str = "stop"         # a non-finite loss or gradient norm: "stop" (raise) or "skip" the step
    seed: int = 0
    bf16: bool | None = None        # None: autocast to bf16 exactly on CUDA
    fsdp: bool = False              # FSDP2 instead of DDP when distributed
    ema_decay: float = 0.0          # 0: off; else the model ends with an EMA of its weights (see train)
    ema_warmup: float = 10.0        # W of the EMA's warm-up (1 + t) / (W + t) (see ParameterEMA); 1: none
    eval_every: int = 0             # 0: off; else train's evaluate() every eval_every steps, the best weights kept
    patience: int = 0               # 0: never stop early; else stop after this many evaluations without a new best
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        for name in ("steps", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {self.max_tokens}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0 turns it off), got {self.ema_decay}")
        if not self.ema_warmup >= 1:
            raise ValueError(f"ema_warmup must be >= 1 (1: no warm-up), got {self.ema_warmup}")
        if self.ema_decay and self.fsdp:
            raise ValueError("ema_decay is not supported with fsdp=True (the average would need the sharded "
                             "parameters gathered); use DDP (fsdp=False) or ema_decay=0")
        if self.eval_every < 0 or self.patience < 0:
            raise ValueError(f"eval_every and patience must be >= 0 (0: off), got {self.eval_every}, {self.patience}")
        if self.patience and not self.eval_every:
            raise ValueError(f"patience={self.patience} needs eval_every > 0 (the evaluations it counts)")
        if self.eval_every and self.fsdp:
            raise ValueError("eval_every is not supported with fsdp=True (the best weights would need the sharded "
                             "parameters gathered); use DDP (fsdp=False) or eval_every=0")
        if self.nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {self.nonfinite!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        """The fields as plain python values (what a checkpoint records)."""
        return dataclasses.asdict(self)

    def resume_changes(self, recorded: dict) -> list[str]:
        """The fields in which this config differs from ``recorded`` (a checkpoint's :meth:`to_dict`)
        that a resumed run may not change, each as ``"name: old → new"``; empty when it may resume.

        A field that ``recorded`` lacks counts as its default; a recorded field this class lacks is a
        change (``"name: old → (no such field)"``)."""
        changes = []
        for f in dataclasses.fields(self):
            old, new = recorded.get(f.name, f.default), getattr(self, f.name)
            if f.name == "betas" and isinstance(old, (list, tuple)):
                old = tuple(old)
            if f.name == "steps" and isinstance(old, int) and new < old:
                changes.append(f"steps: {old} → {new} (steps may only grow)")
            elif f.name not in SAFE_TO_CHANGE and old != new:
                changes.append(f"{f.name}: {old!r} → {new!r}")
        names = {f.name for f in dataclasses.fields(self)}
        changes += [f"{k}: {recorded[k]!r} → (no such field)" for k in sorted(set(recorded) - names)]
        return changes
