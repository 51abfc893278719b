"""A run's work directory: saved model folders (written atomically, every damaged file named on load,
a fuzz test over their files) and the SID artefacts of ``workdir/sid``."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from damage import OPS, damage_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from plumrec.model import PlumLM, SIDVocab, preset
from plumrec.model.vocab import train_word_tokenizer
from plumrec.pipeline.config import load_run_config
from plumrec.pipeline.stages import run_sid
from plumrec.pipeline.workspace import Workspace, load_model, save_model

FILES = ("config.json", "vocab.json", "tokenizer.json", "model.safetensors")


def _tiny_model():
    text = train_word_tokenizer(["red shoes", "blue shoes", "a soft light cream"])
    vocab = SIDVocab(text.vocab_size, (4, 4))
    torch.manual_seed(0)
    model = PlumLM(preset("tiny", vocab_size=vocab.size, hidden_size=32, intermediate_size=48,
                          moe_intermediate_size=16, head_dim=16))
    return model, vocab, text


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, vocab, text = _tiny_model()
    return save_model(model, vocab, text, tmp_path_factory.mktemp("saved") / "model"), model


def _same_model(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return a.config == b.config and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_model_swaps_the_folder_in_and_keeps_other_files(saved, tmp_path):
    path, model = saved
    d = Path(shutil.copytree(path, tmp_path / "model"))
    (d / "README.md").write_text("kept")
    m, vocab, text = load_model(d)
    assert _same_model(m, model) and vocab.size == model.config.vocab_size
    save_model(m, vocab, text, d)
    assert sorted(p.name for p in d.iterdir()) == sorted([*FILES, "README.md"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left
    os.replace(d, tmp_path / "model.replaced")  # a kill between atomic_dir's two renames
    assert _same_model(load_model(d)[0], model)


def test_damaged_model_folders_name_the_file(saved, tmp_path):
    path, model = saved
    d = Path(shutil.copytree(path, tmp_path / "model"))
    originals = {f: (d / f).read_bytes() for f in FILES}
    (d / "model.safetensors").write_bytes(originals["model.safetensors"][:-50])
    with pytest.raises(ValueError, match="model/model.safetensors: not a readable safetensors file"):
        load_model(d)
    (d / "model.safetensors").write_bytes(originals["model.safetensors"])
    (d / "vocab.json").unlink()
    with pytest.raises(ValueError, match="model/vocab.json not found"):
        load_model(d)
    (d / "vocab.json").write_bytes(originals["vocab.json"])
    cfg = json.loads(originals["config.json"])
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    with pytest.raises(ValueError, match="model/config.json is not the file that .*model.safetensors was saved with"):
        load_model(d)
    # a folder without the SHA-256 records (written by hand): the config and vocabulary are checked
    # against the weights
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in FILES[:3]:
        (legacy / f).write_bytes(originals[f])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(legacy / "model.safetensors"))
    assert _same_model(load_model(legacy)[0], model)
    (legacy / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"legacy/model.safetensors does not hold the expected tensors \(as .*config"):
        load_model(legacy)
    (legacy / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**7}))
    with pytest.raises(ValueError, match=r"legacy/config.json describes a model of over [\d,]+ parameters, more than"):
        load_model(legacy)  # refused before anything is allocated
    (legacy / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(ValueError, match="legacy is a Hugging Face checkpoint"):
        load_model(legacy)
    (legacy / "config.json").write_text(json.dumps({**cfg, "colour": 3}))
    with pytest.raises(ValueError, match=r"legacy/config.json: not a PLUM model config \(unknown ModelConfig fields"):
        load_model(legacy)
    (legacy / "config.json").write_bytes(originals["config.json"])
    (legacy / "vocab.json").write_text(json.dumps({**json.loads(originals["vocab.json"]), "codebook_sizes": [4, 8]}))
    with pytest.raises(ValueError, match=r"legacy/vocab.json: the model has vocab_size \d+ but the SID vocabulary"):
        load_model(legacy)
    (legacy / "vocab.json").write_text('{"base_size": 3')
    with pytest.raises(ValueError, match=r"legacy/vocab.json: line 1: not valid JSON"):
        load_model(legacy)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(FILES), op=st.sampled_from(OPS), where=st.floats(0, 1),
       bit=st.integers(0, 7), tail=st.binary(min_size=1, max_size=24))
def test_a_damaged_model_folder_loads_identically_or_raises_a_value_error_naming_it(saved, name, op, where, bit,
                                                                                    tail):
    path, model = saved
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(shutil.copytree(path, Path(tmp) / "model"))
        damage_file(d / name, op, where, bit, tail)
        try:
            loaded, vocab, text = load_model(d)
        except ValueError as e:
            assert str(d) in str(e), e
        else:
            assert _same_model(loaded, model) and text.encode("red shoes") == [text.encode("red")[0],
                                                                               text.encode("shoes")[0]]


SMALL = {"data": {"synthetic": {"num_items": 60, "num_users": 40, "num_topics": 3, "subtopics_per_topic": 2,
                                "max_length": 8}},
         "sid": {"codebook_sizes": [8, 4], "epochs": 3, "warmup_epochs": 1, "hidden_dims": [16], "latent_dim": 8,
                 "batch_size": 64}}


def test_sid_artefacts_are_swapped_in_together_and_checked_on_read(tmp_path):
    ws = Workspace(load_run_config(None, workdir=str(tmp_path / "work"), **SMALL))
    run_sid(ws, progress=False)
    codes, _, sizes = ws.sid()
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["sid"] and sizes == (8, 4)
    sid = tmp_path / "work" / "sid"
    np.save(sid / "codes.npy", codes.astype(">i4"))  # any byte order and integer width reads the same
    again = ws.sid()[0]
    assert again.dtype == np.int64 and again.dtype.isnative and np.array_equal(again, codes)
    np.save(sid / "codes.npy", codes[:, :1])
    with pytest.raises(ValueError, match=r"sid/codes.npy: expected \[num_items, 2\] integer codes"):
        ws.sid()
    np.save(sid / "codes.npy", codes + 8)
    with pytest.raises(ValueError, match=r"sid/codes.npy holds codes outside the codebook sizes \(8, 4\)"):
        ws.sid()
    (sid / "codes.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match=r"sid/codes.npy: not a readable .npy file"):
        ws.sid()
    np.save(sid / "codes.npy", codes)
    os.replace(sid, tmp_path / "work" / "sid.replaced")  # a kill between the two renames of run_sid
    assert np.array_equal(ws.sid()[0], codes)
