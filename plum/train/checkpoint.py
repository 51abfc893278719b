"""Atomic, rotated checkpoints and exact resume.

``checkpoint-<step>.pt`` (written to a temporary file, fsynced, then renamed) holds the model,
optimizer and scheduler states, the RNG states, the data position (examples consumed), the weight
average, the count of skipped steps, the run's :class:`TrainConfig` and the model's config;
training ``n`` steps in one go or in two runs with a checkpoint between gives the same weights.
``checkpoint.pt`` is a second name (a hard link, or a copy where the file system has none) of the
newest, for readers of a finished run. After a save the newest ``keep_checkpoints`` files stay; an
older one is deleted only once the new one is complete.

Everything in a checkpoint is a tensor or a plain python value, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs). :func:`load_checkpoint` first checks the
CRC-32 of every member of the zip archive (which ``torch.load`` does not), so a truncated, damaged
or foreign file is a ``ValueError`` naming it, never other weights; the check reads the file once
more (about a second per GB).

:func:`resume_checkpoint` takes the newest checkpoint that loads (a damaged one is renamed
``<name>.damaged``, with a warning) and refuses (``ValueError`` naming the file) one of another
world size, another model (tensor names or shapes), a step beyond the run's ``steps``, or a
``TrainConfig`` that differs outside :data:`~plumrec.train.config.SAFE_TO_CHANGE`. The metrics log
(``metrics.jsonl``, JSON lines) drops a torn last line (a kill mid-append) and the rows after the
checkpoint, which the resumed run writes again.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from plumrec.io import atomic_path, read_text, require_file
from plumrec.train.config import SAFE_TO_CHANGE, TrainConfig
from plumrec.train.distributed import dist_env, full_state, restore_state
from plumrec.train.optim import ParameterEMA

__all__ = ["CKPT_NAME", "METRICS_NAME", "FORMAT", "ResumePoint", "checkpoint_path", "list_checkpoints",
           "latest_checkpoint", "save_checkpoint", "load_checkpoint", "resume_checkpoint"]

CKPT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
FORMAT = 2  # the "format" entry of a checkpoint this module writes and reads
_STEPPED = re.compile(r"checkpoint-(\d+)\.pt")
_ENTRIES = {"model": dict, "optimizer": dict, "scheduler": dict, "step": int, "position": int, "rng": dict,
            "world_size": int, "config": dict, "skipped": int}


class ResumePoint(NamedTuple):
    """Where a run continues: optimizer steps done, examples consumed, steps skipped as non-finite."""
    step: int
    position: int
    skipped: int


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / f"checkpoint-{step}.pt"


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The ``(step, path)`` of every ``checkpoint-<step>.pt`` in ``out_dir``, newest first."""
    out = Path(out_dir)
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*.pt") if (m := _STEPPED.fullmatch(p.name))]
    return sorted(found, reverse=True)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest ``checkpoint-<step>.pt`` of ``out_dir`` (else its ``checkpoint.pt``, else None); not loaded."""
    found = list_checkpoints(out_dir)
    if found:
        return found[0][1]
    return Path(out_dir) / CKPT_NAME if (Path(out_dir) / CKPT_NAME).is_file() else None


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_config(model) -> dict | None:
    """The model's ``config`` dataclass as plain values (None when it has none)."""
    cfg = getattr(getattr(model, "module", model), "config", None)
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        return None
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def save_checkpoint(out_dir: str | os.PathLike, model, opt, sched, *, step: int, position: int, cfg: TrainConfig,
                    skipped: int = 0, ema: ParameterEMA | None = None) -> Path:
    """Write ``out_dir/checkpoint-<step>.pt`` atomically, point ``checkpoint.pt`` at it and delete all but the
    newest ``cfg.keep_checkpoints`` (every rank must call it; rank 0 writes). Returns the new file's path.

    Checkpoints of a higher step than ``step`` (left by a run that this one started afresh over) are deleted."""
    out = Path(out_dir)
    msd, osd = full_state(model, opt)
    rank, world = dist_env()
    path = checkpoint_path(out, step)
    if rank == 0:
        state = {"format": FORMAT, "model": msd, "optimizer": osd, "scheduler": sched.state_dict(), "step": step,
                 "position": position, "rng": _rng_state(), "world_size": world, "config": cfg.to_dict(),
                 "model_config": _model_config(model), "skipped": skipped,
                 "ema": ema.state_dict() if ema is not None else None}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        _link_newest(out, path)
        kept = 0
        for s, p in list_checkpoints(out):
            if s <= step and kept < cfg.keep_checkpoints:
                kept += 1
            else:
                p.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
    return path


def _link_newest(out: Path, path: Path) -> None:
    """Make ``out/checkpoint.pt`` another name of ``path``: a hard link renamed into place (a copy where the
    file system has no hard links)."""
    tmp = out / f"{CKPT_NAME}.{os.getpid()}.link.tmp.pt"
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        with atomic_path(out / CKPT_NAME) as t:
            shutil.copyfile(path, t)
        return
    os.replace(tmp, out / CKPT_NAME)


def _check_archive(path: Path) -> None:
    """``ValueError`` naming ``path`` unless it is a zip archive whose every member passes its CRC-32 check."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:  # BadZipFile, EOFError, OSError, zlib.error, ...: a file that is no intact archive
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e}); it is truncated, damaged "
                         "or not a checkpoint") from None
    if bad is not None:
        raise ValueError(f"{path}: damaged checkpoint (its member {bad} fails the CRC-32 check)")


def _check_entries(path: Path, ckpt) -> None:
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a plumrec training checkpoint of format {FORMAT} (found {found!r}); it "
                         "is another file, or was written by another version of plumrec")
    for key, kind in _ENTRIES.items():
        v = ckpt.get(key)
        if not isinstance(v, kind) or isinstance(v, bool) or (kind is int and v < 0):
            raise ValueError(f"{path}: damaged checkpoint (entry {key!r} is {type(v).__name__}, expected "
                             f"{'an int >= 0' if kind is int else kind.__name__})")
    if ckpt.get("ema") is not None and not isinstance(ckpt["ema"], dict):
        raise ValueError(f"{path}: damaged checkpoint (entry 'ema' is {type(ckpt['ema']).__name__}, expected dict)")
    for part in ("model", "ema"):
        if any(not isinstance(t, torch.Tensor) for t in (ckpt.get(part) or {}).values()):
            raise ValueError(f"{path}: damaged checkpoint (entry {part!r} holds values that are not tensors)")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path`` (on the CPU), checked: a missing file is a
    :class:`~plumrec.io.MissingFileError`, a truncated, damaged or foreign one a ``ValueError`` naming it."""
    path = require_file(path, "a training checkpoint")
    _check_archive(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an UnpicklingError or RuntimeError of torch: the file holds more than plain state
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ValueError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {msg}); it is damaged, not a "
                         "plumrec training checkpoint, or was written by another version of plumrec") from None
    _check_entries(path, ckpt)
    return ckpt


def _newest_loadable(out: Path) -> tuple[Path | None, dict | None]:
    """The newest checkpoint of ``out`` that loads; the damaged ones newer than it are renamed
    ``<name>.damaged`` (with a warning). ``ValueError`` listing every reason when none loads."""
    candidates = [p for _, p in list_checkpoints(out)]
    if not candidates and (out / CKPT_NAME).exists():
        candidates = [out / CKPT_NAME]
    chosen, ckpt, damaged = None, None, []
    for path in candidates:
        try:
            chosen, ckpt = path, load_checkpoint(path)
            break
        except ValueError as e:
            chosen = None
            damaged.append((path, str(e)))
    rank, world = dist_env()
    if world > 1:
        dist.barrier()  # every rank has read the files before rank 0 renames one
    if damaged and chosen is None:
        raise ValueError(f"no checkpoint in {out} loads: " + "; ".join(why for _, why in damaged)
                         + "; move them away to start afresh, or use another output directory")
    for path, why in damaged:
        warnings.warn(f"{why}; resuming from {chosen.name} instead ({path.name} is renamed {path.name}.damaged)",
                      stacklevel=3)
        if rank == 0:
            os.replace(path, path.with_name(path.name + ".damaged"))
    return chosen, ckpt


def _check_run(path: Path, ckpt: dict, cfg: TrainConfig) -> None:
    """``ValueError`` unless the checkpoint belongs to this run: same world size, a step within ``cfg.steps``,
    a config that differs only in :data:`SAFE_TO_CHANGE`."""
    world = dist_env()[1]
    if ckpt["world_size"] != world:
        raise ValueError(f"{path} was written by {ckpt['world_size']} processes, this run has {world}; "
                         "the data order would differ")
    if ckpt["step"] > cfg.steps:
        raise ValueError(f"{path} is at step {ckpt['step']}, beyond this run's steps={cfg.steps}; resume with "
                         f"steps >= {ckpt['step']} or use a new output directory")
    changes = cfg.resume_changes(ckpt["config"])
    if changes:
        raise ValueError(f"{path} was written with another TrainConfig ({'; '.join(changes)}); resume with the "
                         "checkpoint's values or use a new output directory (fields that may change: "
                         f"{', '.join(SAFE_TO_CHANGE)})")


def _check_model(path: Path, ckpt: dict, model) -> None:
    """``ValueError`` unless the checkpoint's model tensors have the names and shapes of ``model``'s."""
    have = {k: tuple(v.shape) for k, v in getattr(model, "module", model).state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    problems = []
    if missing := sorted(set(have) - set(saved)):
        problems.append(f"it lacks {len(missing)} tensors of this model ({', '.join(missing[:4])})")
    if unknown := sorted(set(saved) - set(have)):
        problems.append(f"it has {len(unknown)} tensors this model lacks ({', '.join(unknown[:4])})")
    problems += [f"{k} is {saved[k]} in it, {have[k]} in this model" for k in sorted(set(have) & set(saved))
                 if saved[k] != have[k]][:4]
    if not problems:
        return
    old, new = ckpt.get("model_config"), _model_config(model)
    if isinstance(old, dict) and isinstance(new, dict):
        diff = [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)]
        problems.append("model config " + ("; ".join(diff) if diff else "the same"))
    raise ValueError(f"{path} is a checkpoint of another model (architecture or vocabulary): " + "; ".join(problems))


def resume_checkpoint(out_dir: str | os.PathLike, model, opt, sched, ema: ParameterEMA | None,
                      cfg: TrainConfig, *, resume: bool = True) -> ResumePoint:
    """Restore the newest checkpoint of ``out_dir`` that loads into the (wrapped) model, optimizer, scheduler,
    weight average and RNGs, after the checks of the module docstring; ``ResumePoint(0, 0, 0)`` when there is
    none, or with ``resume=False`` (nothing is read; the run's first save deletes the newer checkpoints).
    Trims ``metrics.jsonl`` to the step it returns and removes the temporary files a killed save left."""
    out = Path(out_dir)
    rank = dist_env()[0]
    path, ckpt = _newest_loadable(out) if resume else (None, None)
    if ckpt is not None:
        _check_run(path, ckpt, cfg)
        _check_model(path, ckpt, model)
        try:
            restore_state(model, opt, ckpt)
            if ema is not None:
                ema.load_state_dict(ckpt["ema"])
            sched.load_state_dict(ckpt["scheduler"])
            _set_rng_state(ckpt["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            raise ValueError(f"{path}: its state does not fit this run ({type(e).__name__}: {e})") from None
    point = ResumePoint(ckpt["step"], ckpt["position"], ckpt["skipped"]) if ckpt is not None else ResumePoint(0, 0, 0)
    if rank == 0:
        for tmp in [*out.glob("checkpoint*.tmp.pt"), *out.glob(METRICS_NAME + ".*.tmp.jsonl")]:
            tmp.unlink(missing_ok=True)
        _trim_metrics(out / METRICS_NAME, point.step)
    return point


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the rows of ``path`` up to ``step``; a last line that is not JSON (torn by a kill) is dropped, any
    other one is a ``ValueError`` naming the file and line."""
    if not path.exists():
        return
    lines = read_text(path).splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == last:
                break
            raise ValueError(f"{path}: line {i + 1}: not a JSON metrics row") from None
        if not isinstance(row, dict) or not isinstance(row.get("step", 0), (int, float)):
            raise ValueError(f"{path}: line {i + 1}: not a metrics row (a JSON object with a numeric step)")
        if row.get("step", 0) <= step:
            rows.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(r + "\n" for r in rows))
