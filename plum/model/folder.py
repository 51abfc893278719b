"""The saved-model folder, one layout for every framework that trains the PLUM LM.

``config.json`` (the :class:`~plumrec.model.config.ModelConfig`), ``vocab.json`` (the
:class:`~plumrec.model.vocab.SIDVocab`), ``tokenizer.json`` (the text tokenizer) and ``model.safetensors``
(the torch ``state_dict`` names and layouts, with the SHA-256 of the three JSON files as sidecars). The torch
pipeline (``plumrec.pipeline.workspace.save_model``) and the JAX twin (``plumrec.jax.checkpoint.save_model``)
write it through :func:`write_model_folder`, so each loads the other's models.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from plumrec.io import atomic_dir, save_tensors
from plumrec.model.config import ModelConfig
from plumrec.model.vocab import SIDVocab, TextTokenizer

__all__ = ["write_model_folder"]


def write_model_folder(path: str | os.PathLike, state: dict[str, torch.Tensor], config: ModelConfig, vocab: SIDVocab,
                       text: TextTokenizer) -> Path:
    """Write the folder ``path`` atomically (built beside it, then swapped in).

    Args:
        path: the folder; an existing one is replaced.
        state: parameter name -> CPU tensor, the torch ``PlumLM.state_dict()`` names and shapes.
        config: the model's configuration.
        vocab: its SID vocabulary.
        text: its text tokenizer.
    """
    p = Path(path)
    with atomic_dir(p, keep=True) as tmp:
        files = [tmp / "config.json", tmp / "vocab.json", tmp / "tokenizer.json"]
        files[0].write_text(config.to_json())
        files[1].write_text(json.dumps(vocab.to_dict()))
        text.save(str(files[2]))
        save_tensors(tmp / "model.safetensors", state, sidecars=files)
    return p
