"""The saved-model folder: what write_model_folder writes, the torch loader reads back exactly, and an
edited JSON file is refused by its SHA-256 sidecar."""
from __future__ import annotations

import pytest
import torch

from plumrec.model import PlumLM, SIDVocab, preset
from plumrec.model.folder import write_model_folder
from plumrec.model.vocab import train_word_tokenizer
from plumrec.pipeline.workspace import load_model


def test_folder_round_trip_and_sidecars(tmp_path):
    text = train_word_tokenizer(["a red lipstick", "a blue mascara for lashes"])
    vocab = SIDVocab(text.vocab_size, (8, 4))
    torch.manual_seed(0)
    model = PlumLM(preset("tiny", vocab_size=vocab.size))
    out = write_model_folder(tmp_path / "m", model.state_dict(), model.config, vocab, text)
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json"} <= {p.name for p in out.iterdir()}
    loaded, v2, t2 = load_model(out)
    assert loaded.config == model.config and v2.to_dict() == vocab.to_dict()
    assert t2.encode("a red lipstick") == text.encode("a red lipstick")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    write_model_folder(out, model.state_dict(), model.config, vocab, text)  # replaces the folder
    (out / "vocab.json").write_text((out / "vocab.json").read_text().replace("8", "9"))
    with pytest.raises(ValueError, match="vocab.json"):
        load_model(out)
