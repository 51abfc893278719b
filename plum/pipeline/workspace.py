"""A run's work directory: its data and split (:class:`Workspace`), the SID artefacts under
``workdir/sid``, and saved model directories.

A saved model directory holds ``config.json`` (:class:`~plumrec.model.ModelConfig`),
``model.safetensors``, ``vocab.json`` (:class:`~plumrec.model.SIDVocab`) and
``tokenizer.json`` (the text tokenizer). It is written into a temporary folder and
swapped in (:func:`~plumrec.io.atomic_dir`), the weights' header recording the SHA-256
of the tensors and of the three other files; loading checks them, then the config,
the vocabulary and every tensor's name and shape against the config, so a damaged,
missing or foreign file is a ``ValueError`` naming it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from plumrec.data import leave_one_out, load_dataset, make_synthetic_catalogue
from plumrec.io import (
    MissingFileError,
    check_sidecars,
    read_json,
    read_npy,
    read_tensors,
    require_file,
    resolve_dir,
)
from plumrec.model.config import ModelConfig
from plumrec.model.folder import write_model_folder
from plumrec.model.model import PlumLM
from plumrec.model.vocab import SIDVocab, TextTokenizer
from plumrec.sid.tokenizer import SemanticIdTokenizer, SIDConfig
from plumrec.sid.trie import SIDTrie
from plumrec.train.corpus import grounding_text
from plumrec.train.distributed import dist_env, full_model_state

__all__ = ["Workspace", "embeddings_digest", "save_model", "load_model"]


def embeddings_digest(embeddings) -> list[str]:
    """SHA-256 of each embedding array (dtype, shape and bytes): what SIDs were fitted on."""
    return [hashlib.sha256(f"{e.dtype}{e.shape}".encode() + np.ascontiguousarray(e).tobytes()).hexdigest()
            for e in embeddings]


def save_model(model: PlumLM, vocab: SIDVocab, text: TextTokenizer, path: str | os.PathLike) -> Path:
    """Write a model directory (every rank must call it when distributed; rank 0 writes)."""
    state = full_model_state(model)
    p = Path(path)
    if dist_env()[0] != 0:
        return p
    return write_model_folder(p, state, model.config, vocab, text)


def load_model(path: str | os.PathLike, device="cpu") -> tuple[PlumLM, SIDVocab, TextTokenizer]:
    """The model, vocabulary and text tokenizer of a model directory written by :func:`save_model`."""
    p = resolve_dir(path)
    cfg_file, vocab_file, weights = p / "config.json", p / "vocab.json", p / "model.safetensors"
    if not cfg_file.exists():
        raise MissingFileError(f"{p} is not a saved PLUM model (no config.json)")
    check_sidecars(weights)
    cfg_dict = read_json(cfg_file)
    if isinstance(cfg_dict, dict) and "model_type" in cfg_dict:
        raise ValueError(f"{p} is a Hugging Face checkpoint; load it with plumrec.model.hf.load_hf_model")
    try:
        cfg = ModelConfig.from_dict(cfg_dict)
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{cfg_file}: not a PLUM model config ({e})") from None
    vocab_dict = read_json(require_file(vocab_file, "a saved PLUM model needs it"))
    try:
        vocab = SIDVocab.from_dict(vocab_dict)
        vocab.check_model(cfg.vocab_size)
    except ValueError as e:
        raise ValueError(f"{vocab_file}: {e}") from None
    size = require_file(weights, "a saved PLUM model needs it").stat().st_size
    least = (cfg.vocab_size + 2 * cfg.num_hidden_layers) * cfg.hidden_size  # embedding + two norms a layer
    if least > size:  # checked before the model is built: a damaged config allocates nothing
        raise ValueError(f"{cfg_file} describes a model of over {least:,} parameters, more than the "
                         f"{size:,} bytes of {weights} can hold")
    model = PlumLM(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(read_tensors(weights, expected=expected, config=str(cfg_file)))
    return model.to(device), vocab, TextTokenizer.load(str(p / "tokenizer.json"))


class Workspace:
    """The data of a run (``data`` section: a dataset directory and its content embeddings, or the
    synthetic catalogue), its leave-one-out split, and the SID artefacts under ``workdir/sid``."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.dir = Path(cfg["workdir"])
        self.dir.mkdir(parents=True, exist_ok=True)
        d = cfg["data"]
        if d["path"]:
            self.data = load_dataset(d["path"])
            if not d["embeddings"]:
                raise ValueError("data.embeddings must list .npy files of item content embeddings for data.path")
            self.embeddings = [read_npy(e) for e in d["embeddings"]]
            for e, arr in zip(d["embeddings"], self.embeddings):
                if arr.ndim != 2:
                    raise ValueError(f"{e}: item embeddings must be a 2-D [num_items, dim] array, got {arr.shape}")
        else:
            syn = make_synthetic_catalogue(**{"seed": cfg["seed"], **d["synthetic"]})
            self.data, self.embeddings = syn.data, [syn.embeddings["text"], syn.embeddings["meta"]]
        self.split = leave_one_out(self.data)

    @property
    def num_items(self) -> int:
        return self.data.num_items

    def sid(self):
        """The SID artefacts of ``workdir/sid``: ``(codes [num_items, L] int, trie, codebook_sizes)``.

        Refuses (``ValueError`` naming the field) SIDs fitted with another ``sid`` config
        section or seed, or on other embeddings than ``data.embeddings`` (widths, and the
        SHA-256 recorded by :func:`run_sid` in ``sid/inputs.json``): re-run ``plum sid``.
        """
        path = resolve_dir(self.dir / "sid")
        if not (path / "codes.npy").exists():
            raise MissingFileError(f"{path}/codes.npy not found: run `plum sid` first")
        tok = SemanticIdTokenizer.load(path)
        self._check_sid(path, tok)
        codes = read_npy(path / "codes.npy")
        sizes = np.asarray(tok.codebook_sizes)
        if codes.ndim != 2 or codes.dtype.kind not in "iu" or codes.shape[1] != len(sizes):
            raise ValueError(f"{path / 'codes.npy'}: expected [num_items, {len(sizes)}] integer codes, got "
                             f"{codes.dtype} {codes.shape}")
        codes = codes.astype(np.int64, copy=False)  # native byte order
        if ((codes < 0) | (codes >= sizes)).any():
            raise ValueError(f"{path / 'codes.npy'} holds codes outside the codebook sizes {tok.codebook_sizes}")
        trie = SIDTrie.load(str(path / "trie.safetensors"), mmap=False)
        if len(codes) != self.num_items:
            raise ValueError(f"{path} has SIDs for {len(codes)} items but the data has {self.num_items}")
        return codes, trie, tok.codebook_sizes

    def sid_inputs(self) -> dict:
        """What the SIDs are fitted from: the seed, the ``sid`` section and the embeddings' digests."""
        return {"seed": self.cfg["seed"], "sid": json.loads(json.dumps(self.cfg["sid"])),
                "embeddings_sha256": embeddings_digest(self.embeddings)}

    def _check_sid(self, path: Path, tok: SemanticIdTokenizer) -> None:
        inputs = self.sid_inputs()
        # Both sides as complete, normalised SIDConfigs, so that a field the run config leaves at its
        # default is compared too (a field the saved config lacks takes its default on both sides).
        fitted = dataclasses.asdict(tok.config)
        wanted = dataclasses.asdict(SIDConfig(**{**inputs["sid"], "seed": inputs["seed"]}))
        hint = "re-run `plum sid` (or use another workdir)"
        for k, v in wanted.items():
            if fitted[k] != v:
                name = "seed" if k == "seed" else f"sid.{k}"
                raise ValueError(f"{path} was fitted with {name}={fitted[k]!r}, the run config says {v!r}: {hint}")
        dims = [int(e.shape[1]) for e in self.embeddings]
        if list(tok.model.input_dims) != dims:
            raise ValueError(f"{path} was fitted on embeddings of widths {list(tok.model.input_dims)}, "
                             f"data.embeddings have {dims}: {hint}")
        rec = path / "inputs.json"
        recorded = read_json(rec) if rec.exists() else {}
        if not isinstance(recorded, dict):
            raise ValueError(f"{rec}: expected a JSON object of the SID inputs, got {type(recorded).__name__}")
        if rec.exists() and recorded.get("embeddings_sha256") != inputs["embeddings_sha256"]:
            raise ValueError(f"{path} was fitted on other embeddings than data.embeddings "
                             f"(their SHA-256 differ from {rec}): {hint}")

    def grounding_texts(self) -> list[str]:
        items = self.data.items or [{} for _ in range(self.num_items)]
        return [grounding_text(m) for m in items]
