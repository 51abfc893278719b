"""Atomic, rotated, sharded checkpoints and exact resume, at the same or another world size.

``checkpoint-<step>/`` is a folder. Its tensors (model, optimizer state, weight average) are
:mod:`torch.distributed.checkpoint` (DCP) files: every rank writes its own shards (``*.distcp``) and
rank 0 the index (``.metadata``), so no rank gathers the whole model, under DDP or FSDP2 alike.
``state.json`` holds the rest: the step, the data position (examples consumed), the count of skipped
steps, the scheduler, the RNG states (rank 0's), the optimizer's hyper-parameters, the world size, the
run's :class:`TrainConfig`, the model's config, the SHA-256 of every DCP file and of its own content.
The folder is written under ``checkpoint-<step>.tmp`` and renamed into place once complete;
``checkpoint`` is a symbolic link to the newest. After a save the newest ``keep_checkpoints`` folders
stay; an older one is deleted only once the new one is complete. The output directory must be one file
system that every rank sees.

Nothing in a checkpoint is unpickled as code: :func:`load_checkpoint` checks every file's SHA-256 first
(so a truncated, damaged or foreign checkpoint is a ``ValueError`` naming it, never other weights), reads
the DCP index with torch's weights-only unpickler and refuses an index whose entries are not all tensors
(DCP would unpickle a non-tensor entry with torch's unrestricted unpickler); the tensors load through
``torch.load(weights_only=True)``. The single-file ``checkpoint-<step>.pt`` of earlier versions is refused
with a ``ValueError`` that says so.

:func:`resume_checkpoint` takes the newest checkpoint that loads (a damaged one is renamed
``<name>.damaged``, with a warning) and refuses (``ValueError`` naming it) another model (tensor names or
shapes), a step beyond the run's ``steps``, a ``TrainConfig`` that differs outside
:data:`~plumrec.train.config.SAFE_TO_CHANGE`, or a world size whose global batch differs: a run of ``W``
processes with ``grad_accum=A`` resumes at ``W'`` processes with ``grad_accum=A'`` exactly when
``W * A == W' * A'`` (each step then takes the same examples, see :mod:`plumrec.train.distributed`). The
metrics log (``metrics.jsonl``) drops a torn last line (a kill mid-append) and the rows after the
checkpoint, which the resumed run writes again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from plumrec.io import atomic_path, read_text
from plumrec.train.config import SAFE_TO_CHANGE, TrainConfig
from plumrec.train.distributed import dist_env
from plumrec.train.optim import ParameterEMA

__all__ = ["CKPT_NAME", "STATE_NAME", "METRICS_NAME", "FORMAT", "ResumePoint", "checkpoint_path",
           "list_checkpoints", "latest_checkpoint", "save_checkpoint", "load_checkpoint", "resume_checkpoint"]

CKPT_NAME = "checkpoint"  # the link to the newest checkpoint folder
STATE_NAME = "state.json"
METRICS_NAME = "metrics.jsonl"
FORMAT = 3  # the "format" entry of a checkpoint this module writes and reads
_STEPPED = re.compile(r"checkpoint-(\d+)")
_OLD = re.compile(r"checkpoint(-\d+)?\.pt")
_ENTRIES = {"step": int, "position": int, "skipped": int, "world_size": int, "config": dict, "scheduler": dict,
            "rng": dict, "optimizer": dict, "files": dict}
_SAFE_METADATA = [dcp_metadata.Metadata, dcp_metadata.TensorStorageMetadata, dcp_metadata.TensorProperties,
                  dcp_metadata.ChunkStorageMetadata, dcp_metadata.StorageMeta, dcp_metadata.MetadataIndex,
                  dcp_metadata._MEM_FORMAT_ENCODING, dcp.filesystem._StorageInfo, torch.Size]


class ResumePoint(NamedTuple):
    """Where a run continues: optimizer steps done, examples consumed, steps skipped as non-finite, and the
    caller's ``extra`` state saved with the checkpoint (None when it has none)."""
    step: int
    position: int
    skipped: int
    extra: dict | None = None


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / f"checkpoint-{step}"


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The ``(step, path)`` of every ``checkpoint-<step>`` folder in ``out_dir``, newest first."""
    out = Path(out_dir)
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := _STEPPED.fullmatch(p.name))
             and p.is_dir() and not p.is_symlink()]
    return sorted(found, reverse=True)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest ``checkpoint-<step>`` folder of ``out_dir`` (None when there is none); not loaded."""
    found = list_checkpoints(out_dir)
    return found[0][1] if found else None


def _rng_state() -> dict:
    """This process's RNG states as JSON values (lists of ints), exactly."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state().tolist(), "python": [version, list(internal), gauss],
             "numpy": [str(name), keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _model_config(model) -> dict | None:
    """The model's ``config`` dataclass as plain values (None when it has none)."""
    cfg = getattr(getattr(model, "module", model), "config", None)
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        return None
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _body_sha256(state: dict) -> str:
    body = {k: v for k, v in state.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _tensors(model, opt, ema: ParameterEMA | None) -> tuple[dict, list]:
    """``({"model", "optimizer"[, "ema"]: tensors}, optimizer param_groups)`` of this rank (DTensor shards
    under FSDP2), as DCP saves and loads them; the optimizer's per-parameter state must be tensors."""
    msd, osd = get_state_dict(model, opt)
    for name, per in osd["state"].items():
        if any(not isinstance(v, torch.Tensor) for v in per.values()):
            raise ValueError(f"optimizer state of {name} holds values that are not tensors; checkpoints store "
                             "tensor state only")
    tensors = {"model": msd, "optimizer": osd["state"]}
    if ema is not None:
        tensors["ema"] = ema.state_dict()
    return tensors, osd["param_groups"]


@contextlib.contextmanager
def _quiet():
    """Silence DCP's warning that it runs in one process (which it is told: ``no_dist``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    if dist_env()[1] > 1:
        dist.barrier()


def save_checkpoint(out_dir: str | os.PathLike, model, opt, sched, *, step: int, position: int, cfg: TrainConfig,
                    skipped: int = 0, ema: ParameterEMA | None = None, extra: dict | None = None) -> Path:
    """Write ``out_dir/checkpoint-<step>/`` atomically (every rank its shards, rank 0 the rest), point
    ``checkpoint`` at it and delete all but the newest ``cfg.keep_checkpoints``. Every rank must call it.
    ``extra``: JSON values of the caller's own state at this step (kept in ``state.json``, given back by
    :func:`resume_checkpoint`). Returns the new folder's path.

    Checkpoints of a higher step than ``step`` (left by a run that this one started afresh over) are deleted."""
    out = Path(out_dir)
    rank, world = dist_env()
    path, tmp = checkpoint_path(out, step), out / f"checkpoint-{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    tensors, groups = _tensors(model, opt, ema)
    with _quiet():
        dcp.save(tensors, storage_writer=_Writer(tmp, sync_files=True), no_dist=world == 1)
    if rank == 0:
        state = {"format": FORMAT, "step": step, "position": position, "skipped": skipped, "world_size": world,
                 "config": cfg.to_dict(), "model_config": _model_config(model), "scheduler": sched.state_dict(),
                 "rng": _rng_state(), "optimizer": {"param_groups": groups, "stepped": bool(tensors["optimizer"])},
                 "ema": ema is not None, "files": {p.name: _sha256(p) for p in sorted(tmp.iterdir())}}
        if extra is not None:
            state["extra"] = extra
        state["sha256"] = _body_sha256(state)
        with atomic_path(tmp / STATE_NAME) as t:
            t.write_text(json.dumps(state))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _link_newest(out, path)
        kept = 0
        for s, p in list_checkpoints(out):
            if s <= step and kept < cfg.keep_checkpoints:
                kept += 1
            else:
                shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return path


def _link_newest(out: Path, path: Path) -> None:
    """Make ``out/checkpoint`` a relative symbolic link to ``path``, renamed into place."""
    tmp = out / f"{CKPT_NAME}.{os.getpid()}.link.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(path.name, tmp)
    os.replace(tmp, out / CKPT_NAME)


def _read_state(path: Path) -> dict:
    """``state.json`` of the folder ``path``, its own SHA-256 and entries checked."""
    try:
        state = json.loads(read_text(path / STATE_NAME))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e}); it is incomplete, damaged "
                         "or not a checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not a plumrec training checkpoint of format {FORMAT} (found {found!r}); it "
                         "is another folder, or was written by another version of plumrec")
    if state.get("sha256") != _body_sha256(state):
        raise ValueError(f"{path}: damaged checkpoint ({STATE_NAME} fails its SHA-256 check)")
    for key, kind in _ENTRIES.items():
        v = state.get(key)
        if not isinstance(v, kind) or isinstance(v, bool) or (kind is int and v < 0):
            raise ValueError(f"{path}: damaged checkpoint (entry {key!r} is {type(v).__name__}, expected "
                             f"{'an int >= 0' if kind is int else kind.__name__})")
    return state


def _read_metadata(path: Path) -> dcp_metadata.Metadata:
    """The DCP index of ``path``, unpickled by torch's weights-only unpickler; every entry must be a tensor."""
    try:
        with open(path / ".metadata", "rb") as f, torch.serialization.safe_globals(_SAFE_METADATA), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on a pickle protocol above 2 (then refused)
            meta = torch._weights_only_unpickler.Unpickler(f).load()
    except Exception as e:  # UnpicklingError, EOFError, ...: an index that is not plain DCP metadata
        raise ValueError(f"{path}: not a loadable checkpoint index ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(meta, dcp_metadata.Metadata) or not all(
            isinstance(m, dcp_metadata.TensorStorageMetadata) for m in meta.state_dict_metadata.values()):
        raise ValueError(f"{path}: its DCP index holds entries that are not tensors")
    if meta.storage_meta is None:
        meta.storage_meta = dcp_metadata.StorageMeta()
    return meta


class _Writer(dcp.FileSystemWriter):
    """A DCP writer whose index is pickled with protocol 2, which torch's weights-only unpickler reads."""

    def finish(self, metadata: dcp_metadata.Metadata, results) -> None:
        super().finish(metadata, results)
        metadata.storage_meta = None  # the writer's ids and paths, which a reader does not need
        with atomic_path(Path(self.path) / ".metadata") as tmp, open(tmp, "wb") as f:
            pickle.dump(metadata, f, protocol=2)


class _SafeReader(dcp.FileSystemReader):
    """A DCP reader whose index is read by :func:`_read_metadata` (no pickled code runs)."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        meta = _read_metadata(Path(self.path))
        meta.storage_meta.load_id = self.load_id
        return meta


def load_checkpoint(path: str | os.PathLike, *, tensors: bool = False) -> dict:
    """The checked state of the checkpoint folder ``path`` (the entries of ``state.json``); with ``tensors``
    also ``"model"``, ``"optimizer"`` (per-parameter state) and ``"ema"`` (when kept) as whole CPU tensors,
    read in this process alone. A missing folder is a :class:`FileNotFoundError`; a damaged, foreign or
    old single-file checkpoint a ``ValueError`` naming it."""
    path = Path(path)
    if path.is_file() and _OLD.fullmatch(path.name):
        raise ValueError(f"{path}: a single-file checkpoint of an earlier plumrec version; this version writes "
                         f"and resumes from checkpoint folders (format {FORMAT}, torch.distributed.checkpoint); "
                         "start the run afresh in a new output directory")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    state = _read_state(path)
    present = sorted(p.name for p in path.iterdir() if p.name != STATE_NAME)
    if present != sorted(state["files"]):
        raise ValueError(f"{path}: damaged checkpoint (it holds {present}, its state lists {sorted(state['files'])})")
    for name, digest in state["files"].items():
        if _sha256(path / name) != digest:
            raise ValueError(f"{path}: damaged checkpoint ({name} fails its SHA-256 check)")
    meta = _read_metadata(path)
    if tensors:
        full = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()}
        with _quiet():
            dcp.load(full, storage_reader=_SafeReader(path), no_dist=True)
        state["model"], state["optimizer_state"], state["ema_state"] = {}, {}, {}
        for key, value in full.items():
            part, _, name = key.partition(".")
            state[{"model": "model", "optimizer": "optimizer_state", "ema": "ema_state"}[part]][name] = value
    return state


def _newest_loadable(out: Path) -> tuple[Path | None, dict | None]:
    """The newest checkpoint of ``out`` that loads; the damaged ones newer than it are renamed
    ``<name>.damaged`` (with a warning). ``ValueError`` listing every reason when none loads."""
    old = sorted(p.name for p in out.glob("checkpoint*.pt") if _OLD.fullmatch(p.name))
    if old:
        raise ValueError(f"{out} holds single-file checkpoints of an earlier plumrec version ({', '.join(old[:3])}); "
                         f"this version writes and resumes from checkpoint folders (format {FORMAT}); start the "
                         "run afresh in a new output directory, or move them away")
    chosen, ckpt, damaged = None, None, []
    for _, path in list_checkpoints(out):
        try:
            chosen, ckpt = path, load_checkpoint(path)
            break
        except ValueError as e:
            chosen = None
            damaged.append((path, str(e)))
    rank = dist_env()[0]
    _barrier()  # every rank has read the files before rank 0 renames one
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
    """``ValueError`` unless the checkpoint belongs to this run: the same global batch (world size times
    ``grad_accum``), a step within ``cfg.steps``, a config that differs only in :data:`SAFE_TO_CHANGE`
    (and in ``grad_accum`` where the world size makes up for it)."""
    world = dist_env()[1]
    recorded = dict(ckpt["config"])
    old_accum = recorded.get("grad_accum", 1)
    if ckpt["world_size"] * old_accum != world * cfg.grad_accum:
        raise ValueError(f"{path} was written by {ckpt['world_size']} processes with grad_accum={old_accum}, this "
                         f"run has {world} with grad_accum={cfg.grad_accum}; the global batch (processes x "
                         "grad_accum) must stay the same, or the data order would differ")
    recorded["grad_accum"] = cfg.grad_accum
    if ckpt["step"] > cfg.steps:
        raise ValueError(f"{path} is at step {ckpt['step']}, beyond this run's steps={cfg.steps}; resume with "
                         f"steps >= {ckpt['step']} or use a new output directory")
    changes = cfg.resume_changes(recorded)
    if changes:
        raise ValueError(f"{path} was written with another TrainConfig ({'; '.join(changes)}); resume with the "
                         "checkpoint's values or use a new output directory (fields that may change: "
                         f"{', '.join(SAFE_TO_CHANGE)})")


def _check_model(path: Path, ckpt: dict, model) -> None:
    """``ValueError`` unless the checkpoint's model tensors have the names and shapes of ``model``'s."""
    have = {k: tuple(v.shape) for k, v in getattr(model, "module", model).state_dict().items()}
    saved = {k.partition(".")[2]: tuple(m.size) for k, m in _read_metadata(path).state_dict_metadata.items()
             if k.startswith("model.")}
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


def _restore(path: Path, ckpt: dict, model, opt, sched, ema: ParameterEMA | None) -> None:
    """Load the checkpoint's tensors into this rank's (sharded) model, optimizer and weight average, then
    the scheduler and the RNG states."""
    if (ema is not None) != bool(ckpt.get("ema")):
        raise ValueError("the weight average is " + ("not " if ema is not None else "") + "in it")
    opt.zero_grad(set_to_none=True)  # without gradients, get_state_dict gives the optimizer a state to load into
    tensors, _ = _tensors(model, opt, ema)
    if not ckpt["optimizer"].get("stepped", True):
        tensors["optimizer"] = {}
    with _quiet():
        dcp.load(tensors, storage_reader=_SafeReader(path), no_dist=dist_env()[1] == 1)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in ckpt["optimizer"]["param_groups"]]
    set_state_dict(model, opt, model_state_dict=tensors["model"],
                   optim_state_dict={"state": tensors["optimizer"], "param_groups": groups})
    if ema is not None:
        ema.load_state_dict(tensors["ema"])
    sched.load_state_dict(ckpt["scheduler"])
    _set_rng_state(ckpt["rng"])


def resume_checkpoint(out_dir: str | os.PathLike, model, opt, sched, ema: ParameterEMA | None,
                      cfg: TrainConfig, *, resume: bool = True) -> ResumePoint:
    """Restore the newest checkpoint of ``out_dir`` that loads into the (wrapped) model, optimizer, scheduler,
    weight average and RNGs, after the checks of the module docstring (``extra``: what the checkpoint was
    saved with, see :func:`save_checkpoint`); ``ResumePoint(0, 0, 0)`` when there is
    none, or with ``resume=False`` (nothing is read; the run's first save deletes the newer checkpoints).
    Trims ``metrics.jsonl`` to the step it returns and removes the temporary files a killed save left."""
    out = Path(out_dir)
    rank = dist_env()[0]
    path, ckpt = _newest_loadable(out) if resume else (None, None)
    if ckpt is not None:
        _check_run(path, ckpt, cfg)
        _check_model(path, ckpt, model)
        try:
            _restore(path, ckpt, model, opt, sched, ema)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            raise ValueError(f"{path}: its state does not fit this run ({type(e).__name__}: {e})") from None
    point = ResumePoint(ckpt["step"], ckpt["position"], ckpt["skipped"], ckpt.get("extra")) if ckpt is not None \
        else ResumePoint(0, 0, 0)
    if rank == 0:
        for tmp in out.glob("checkpoint-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        for tmp in [*out.glob(f"{CKPT_NAME}.*.link.tmp"), *out.glob(METRICS_NAME + ".*.tmp.jsonl")]:
            tmp.unlink(missing_ok=True)
        _trim_metrics(out / METRICS_NAME, point.step)
    _barrier()
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
