"""Checkpoints of the JAX training loop and model directories the torch side loads.

A checkpoint is the folder ``checkpoint-<step>/`` (the name the torch loop uses, so
:func:`plumrec.train.checkpoint.list_checkpoints` lists both) with two files, written into a temporary
folder and renamed into place (:func:`plumrec.io.write_tagged`):

- ``tensors.safetensors``: the parameters (``params['<name>']``), the optax state
  (``opt_state<key path>``, every leaf named by its ``jax.tree_util`` key path, e.g.
  ``opt_state[1][0].mu['norm.weight']``) and the weight average (``ema['<name>']``), its header recording
  the SHA-256 of the tensors and of ``state.json``;
- ``state.json``: the format tag, the step, the data position (examples consumed), the count of skipped
  steps, the seed (the dropout keys are ``fold_in`` of it, so it is the whole RNG state), the run's
  :class:`~plumrec.train.config.TrainConfig` and the :class:`~plumrec.model.config.ModelConfig`.

:func:`read_checkpoint` checks the files (a damaged or foreign folder is a ``ValueError`` naming it);
:func:`restore_checkpoint` puts the tensors into the structure of live templates (``opt.init(params)``),
with a ``ValueError`` naming every missing, unexpected or reshaped tensor. Torch checkpoints
(format 3) and these refuse each other by their ``format`` tag.

:func:`save_model` writes the model directory of :func:`plumrec.pipeline.workspace.save_model`
(``config.json``, ``vocab.json``, ``tokenizer.json``, ``model.safetensors`` in the torch ``state_dict``
names and layouts), so ``plumrec.pipeline.workspace.load_model`` and the torch retriever read a
JAX-trained model; :func:`load_params` reads such a directory back.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import torch

from plumrec.io import (
    MissingFileError,
    check_sidecars,
    read_json,
    read_tagged,
    read_tensors,
    write_tagged,
)
from plumrec.jax.model import param_shapes, params_from_torch_state
from plumrec.model.config import ModelConfig
from plumrec.model.folder import write_model_folder
from plumrec.train.checkpoint import STATE_NAME, checkpoint_path, list_checkpoints

__all__ = ["FORMAT", "VERSION", "TENSORS_NAME", "Checkpoint", "flatten_tree", "unflatten_like", "save_checkpoint",
           "read_checkpoint", "restore_checkpoint", "save_model", "load_params"]

FORMAT = "plumrec.jax.checkpoint"
VERSION = 1
TENSORS_NAME = "tensors.safetensors"
_PARTS = ("params", "opt_state", "ema")


class Checkpoint(NamedTuple):
    """A restored checkpoint: ``params`` and ``ema`` (None when not kept) are dicts name -> array,
    ``opt_state`` the optax state; ``step`` (optimizer steps done), ``position`` (examples consumed),
    ``skipped`` (steps skipped as non-finite), ``seed``; ``config`` the recorded ``TrainConfig.to_dict()``."""
    params: dict
    opt_state: Any
    ema: dict | None
    step: int
    position: int
    skipped: int
    seed: int
    config: dict


def _to_torch(a) -> torch.Tensor:
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":  # numpy has no bfloat16 of its own: go through float32 (exact)
        return torch.from_numpy(np.ascontiguousarray(a.astype(np.float32))).to(torch.bfloat16)
    return torch.from_numpy(np.array(a, copy=True))


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def flatten_tree(tree, prefix: str) -> dict[str, torch.Tensor]:
    """Every leaf of ``tree`` (arrays) as a CPU torch tensor named ``prefix + keystr(key path)``."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {prefix + jax.tree_util.keystr(path): _to_torch(leaf) for path, leaf in leaves}


def unflatten_like(template, tensors: dict, prefix: str, where: str = "the checkpoint"):
    """The tree of ``template``'s structure whose leaves are ``tensors[prefix + keystr(key path)]`` (the
    inverse of :func:`flatten_tree`), each as a ``jax.Array`` of the template leaf's dtype. ``ValueError``
    naming the missing, unexpected, reshaped or retyped tensors (``where`` names the source)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [prefix + jax.tree_util.keystr(path) for path, _ in leaves]
    have = {k for k in tensors if k.startswith(prefix)}
    problems = []
    if missing := [n for n in names if n not in have]:
        problems.append(f"it lacks {len(missing)} tensors ({', '.join(missing[:4])})")
    if unknown := sorted(have - set(names)):
        problems.append(f"it has {len(unknown)} unexpected tensors ({', '.join(unknown[:4])})")
    for n, (_, leaf) in zip(names, leaves):
        if n in have and (tuple(tensors[n].shape), _dtype_name(tensors[n])) != (tuple(leaf.shape), str(leaf.dtype)):
            problems.append(f"{n} is {_dtype_name(tensors[n])} {tuple(tensors[n].shape)} in it, this run needs "
                            f"{leaf.dtype} {tuple(leaf.shape)}")
    if problems:
        raise ValueError(f"{where} does not fit this run's {prefix} (another model, optimizer or config): "
                         + "; ".join(problems[:6]))
    values = []
    for n, (_, leaf) in zip(names, leaves):
        t = tensors[n]
        arr = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        values.append(jax.numpy.array(arr, dtype=leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, values)


def save_checkpoint(out_dir: str | os.PathLike, *, params: dict, opt_state, step: int, position: int, skipped: int,
                    seed: int, config: dict, model_config: ModelConfig, ema: dict | None = None,
                    keep: int | None = None) -> Path:
    """Write ``out_dir/checkpoint-<step>`` atomically (see the module docstring) and return its path.

    Args:
        params: name -> array, the model's parameters.
        opt_state: the optax state of ``params`` (any pytree of arrays).
        step, position, skipped: optimizer steps done, examples consumed, steps skipped (ints >= 0).
        seed: the run's seed (the dropout keys derive from it and the step).
        config: ``TrainConfig.to_dict()`` of the run; model_config: the model's config.
        ema: the weight average (name -> array) or None.
        keep: keep only the ``keep`` newest checkpoints of ``out_dir`` at or below ``step`` (None: all);
            newer ones (of a run this one started afresh over) are deleted.
    """
    for name, v in (("step", step), ("position", position), ("skipped", skipped)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    tensors = {**flatten_tree(params, "params"), **flatten_tree(opt_state, "opt_state")}
    if ema is not None:
        tensors.update(flatten_tree(ema, "ema"))
    meta = {"format": FORMAT, "version": VERSION, "step": step, "position": position, "skipped": skipped,
            "seed": int(seed), "config": json.loads(json.dumps(config)), "model_config": model_config.to_dict(),
            "ema": ema is not None}
    path = write_tagged(checkpoint_path(out_dir, step), meta, tensors, meta_name=STATE_NAME,
                        tensors_name=TENSORS_NAME)
    if keep is not None:
        kept = 0
        for s, p in list_checkpoints(out_dir):
            if s <= step and kept < keep:
                kept += 1
            else:
                shutil.rmtree(p, ignore_errors=True)
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(state, tensors)`` of the checkpoint folder ``path``: the checked ``state.json`` and every tensor
    (CPU torch tensors by name), SHA-256 checked. ``ValueError`` naming the folder when it is damaged,
    incomplete or not a JAX training checkpoint (a torch one included); :class:`MissingFileError` when
    ``state.json`` is missing."""
    folder, meta = read_tagged(path, meta_name=STATE_NAME, tensors_name=TENSORS_NAME, fmt=FORMAT, version=VERSION,
                               what="a plumrec JAX training checkpoint", noun="JAX training checkpoint",
                               missing="a JAX training checkpoint needs it")
    for key, kind in (("step", int), ("position", int), ("skipped", int), ("seed", int), ("config", dict),
                      ("model_config", dict), ("ema", bool)):
        v = meta.get(key)
        if not isinstance(v, kind) or (kind is int and (isinstance(v, bool) or v < 0)):
            raise ValueError(f"{folder}: damaged checkpoint (entry {key!r} is {v!r}, expected {kind.__name__})")
    tensors = read_tensors(folder / TENSORS_NAME)
    unknown = sorted(k for k in tensors if not k.startswith(_PARTS))
    if unknown:
        raise ValueError(f"{folder}: damaged checkpoint (tensors {unknown[:4]} belong to no part)")
    return meta, tensors


def restore_checkpoint(path: str | os.PathLike, state: dict, tensors: dict, *, params: dict, opt_state,
                       model_config: ModelConfig, ema: dict | None = None) -> Checkpoint:
    """The :class:`Checkpoint` of :func:`read_checkpoint`'s ``(state, tensors)``, its trees in the structure,
    shapes and dtypes of the templates ``params``, ``opt_state`` (``opt.init(params)``) and ``ema`` (None:
    the checkpoint must hold no weight average). ``ValueError`` naming ``path`` and the mismatch (another
    model config, tensor names, shapes or dtypes, a weight average kept or not)."""
    where = str(path)
    old = state["model_config"]
    new = model_config.to_dict()
    if json.loads(json.dumps(new)) != old:
        diff = [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in sorted(set(old) | set(new))
                if json.loads(json.dumps(new.get(k))) != old.get(k)]
        raise ValueError(f"{where} is a checkpoint of another model ({'; '.join(diff[:6])})")
    if state["ema"] != (ema is not None):
        raise ValueError(f"{where}: the weight average is {'' if state['ema'] else 'not '}in it, this run "
                         f"{'keeps' if ema is not None else 'keeps none'} (ema_decay)")
    return Checkpoint(unflatten_like(params, tensors, "params", where),
                      unflatten_like(opt_state, tensors, "opt_state", where),
                      None if ema is None else unflatten_like(ema, tensors, "ema", where),
                      state["step"], state["position"], state["skipped"], state["seed"], state["config"])


def save_model(params: dict, cfg: ModelConfig, vocab, text, path: str | os.PathLike) -> Path:
    """Write the model folder of :func:`plumrec.model.folder.write_model_folder` (the torch pipeline's
    layout): ``params`` must have the names and shapes of :func:`~plumrec.jax.model.param_shapes` ``(cfg)``
    (torch layouts); ``vocab`` a :class:`~plumrec.model.vocab.SIDVocab`, ``text`` a
    :class:`~plumrec.model.vocab.TextTokenizer`."""
    shapes = param_shapes(cfg)
    if set(params) != set(shapes) or any(tuple(params[k].shape) != s for k, s in shapes.items()):
        raise ValueError(f"params do not match cfg: {sorted(set(params) ^ set(shapes))[:4]} differ in names, "
                         f"{[k for k in shapes if k in params and tuple(params[k].shape) != shapes[k]][:4]} in shape")
    return write_model_folder(path, {k: _to_torch(params[k]) for k in shapes}, cfg, vocab, text)


def load_params(path: str | os.PathLike, dtype=None) -> tuple[dict, ModelConfig]:
    """``(params, cfg)`` of a model directory that :func:`save_model` or the torch ``save_model`` wrote
    (``config.json`` and ``model.safetensors``, checked against each other and their recorded SHA-256).
    ``dtype``: cast every array to it (default: the file's dtype)."""
    p = Path(path)
    cfg_file, weights = p / "config.json", p / "model.safetensors"
    if not cfg_file.is_file():
        raise MissingFileError(f"{p} is not a saved PLUM model (no config.json)")
    check_sidecars(weights)
    try:
        cfg = ModelConfig.from_dict(read_json(cfg_file))
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{cfg_file}: not a PLUM model config ({e})") from None
    return params_from_torch_state(weights, cfg, dtype), cfg
