"""The folder of a saved :class:`~plumrec.sid.tokenizer.SemanticIdTokenizer`: ``config.json`` (format tag,
version, the :class:`~plumrec.sid.tokenizer.SIDConfig` fields, the input widths) and ``model.safetensors``
(the RQ-VAE's state and the fitted codes).

The folder is written into a temporary folder and swapped in (:func:`plumrec.io.atomic_dir`, other files
in it kept), so a kill leaves the old or the new tokenizer; the weights' header records the SHA-256 of the
tensors and of ``config.json``. Reading checks both, then the format, the fields and every tensor's name,
shape and value range: a damaged, missing or foreign file is a ``ValueError`` naming it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from plumrec.io import read_tagged, read_tensors, resolve_dir, write_tagged
from plumrec.sid.rqvae import RQVAE

__all__ = ["FORMAT", "VERSION", "write_tokenizer", "read_tokenizer", "build_rqvae"]

FORMAT = "plum.sid.SemanticIdTokenizer"  # the format tag saved tokenizers carry
VERSION = 1


def write_tokenizer(path: str | Path, config: dict, input_dims: Sequence[int], tensors: dict) -> Path:
    """Write ``config.json`` (``config``: the SIDConfig fields) and ``model.safetensors`` into the folder
    ``path``, swapped in atomically."""
    meta = {"format": FORMAT, "version": VERSION, "config": config, "input_dims": list(input_dims)}
    return write_tagged(path, meta, tensors, meta_name="config.json", tensors_name="model.safetensors", keep=True)


def read_tokenizer(path: str | Path) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """``(folder, config.json's dict, tensors)`` of a saved tokenizer, checked as the module docstring says
    (the folder is :func:`plumrec.io.resolve_dir` of ``path``)."""
    folder, meta = read_tagged(path, meta_name="config.json", tensors_name="model.safetensors", fmt=FORMAT,
                               version=VERSION, what="a saved SemanticIdTokenizer", noun="tokenizer",
                               missing=f"{resolve_dir(path)} is not a saved SemanticIdTokenizer")
    cfg_file = folder / "config.json"
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{cfg_file}: 'config' must be an object of SIDConfig fields, got {meta.get('config')!r}")
    dims = meta.get("input_dims")
    if not (isinstance(dims, list) and dims and all(type(d) is int and d > 0 for d in dims)):
        raise ValueError(f"{cfg_file}: 'input_dims' must be a non-empty list of positive ints, got {dims!r}")
    return folder, meta, read_tensors(folder / "model.safetensors")


def build_rqvae(input_dims: Sequence[int], cfg, tensors: dict[str, torch.Tensor], weights: Path
                ) -> tuple[RQVAE, np.ndarray | None]:
    """The RQ-VAE of the SIDConfig ``cfg`` with the state ``tensors`` (read from ``weights``), and the fitted
    codes among them (``None`` if it has none). Names and shapes are compared with the config's model
    (:meth:`RQVAE.state_shapes`) before it is built; codes must be ``[N, L]`` integers within the codebooks."""
    tensors = dict(tensors)
    codes = tensors.pop("fitted_codes", None)
    args = (input_dims, cfg.latent_dim, cfg.hidden_dims, cfg.codebook_sizes)
    expected = RQVAE.state_shapes(*args)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        diff = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        raise ValueError(f"{weights} does not match the model of {weights.parent / 'config.json'}: tensors "
                         f"{diff[:8]} are missing, unexpected or of another shape")
    model = RQVAE(*args)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    if codes is None:
        return model, None
    sizes = np.asarray(cfg.codebook_sizes)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.ndim != 2 or codes.shape[1] != len(sizes):
        raise ValueError(f"{weights}: fitted_codes must be [N, {len(sizes)}] integers, got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    out = codes.numpy().astype(np.int64)
    if len(out) and ((out < 0) | (out >= sizes)).any():
        raise ValueError(f"{weights}: fitted_codes hold codes outside the codebook sizes {tuple(sizes.tolist())}")
    return model, out
