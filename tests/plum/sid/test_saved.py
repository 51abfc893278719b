"""The folder of a saved SID tokenizer: written atomically, read back checked (format, version, fields,
tensor names, shapes and code ranges), every error naming the file (saving a fitted tokenizer and damaged
folders: test_tokenizer.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from plumrec.io import save_tensors, write_json
from plumrec.sid.rqvae import RQVAE
from plumrec.sid.saved import FORMAT, VERSION, build_rqvae, read_tokenizer, write_tokenizer

CFG = SimpleNamespace(latent_dim=4, hidden_dims=(6,), codebook_sizes=(3, 2))


def _tensors(dims=(5,)):
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in RQVAE(dims, CFG.latent_dim, CFG.hidden_dims, CFG.codebook_sizes)
             .state_dict().items()}
    return {**state, "fitted_codes": torch.tensor([[0, 1], [2, 0], [2, 1]])}


def test_written_folder_reads_back_into_the_same_model(tmp_path):
    tensors = _tensors()
    d = write_tokenizer(tmp_path / "sid", {"latent_dim": 4}, [5], tensors)
    folder, meta, back = read_tokenizer(d)
    assert folder == d and meta == {"format": FORMAT, "version": VERSION, "config": {"latent_dim": 4},
                                    "input_dims": [5]}
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    model, codes = build_rqvae([5], CFG, back, d / "model.safetensors")
    assert not model.training and codes.tolist() == [[0, 1], [2, 0], [2, 1]]
    assert all(torch.equal(model.state_dict()[k], tensors[k]) for k in model.state_dict())
    assert build_rqvae([5], CFG, {k: v for k, v in back.items() if k != "fitted_codes"}, d)[1] is None


def _folder(path, meta, tensors):
    """A folder whose ``config.json`` is ``meta`` and whose weights record that very file (as a save would)."""
    path.mkdir()
    write_json(path / "config.json", meta)
    save_tensors(path / "model.safetensors", tensors, sidecars=[path / "config.json"])
    return path


@pytest.mark.parametrize("change, match", [
    ({"format": "other"}, r"config.json is not a saved SemanticIdTokenizer \(format 'other'\)"),
    ({"version": 2}, "config.json: unsupported tokenizer format version 2"),
    ({"config": [1]}, "config.json: 'config' must be an object of SIDConfig fields, got \\[1\\]"),
    ({"input_dims": [5, 0]}, "config.json: 'input_dims' must be a non-empty list of positive ints"),
    ({"input_dims": []}, "config.json: 'input_dims' must be a non-empty list of positive ints"),
])
def test_a_foreign_config_is_refused_naming_the_file(tmp_path, change, match):
    meta = {"format": FORMAT, "version": VERSION, "config": {}, "input_dims": [5]}
    d = _folder(tmp_path / "sid", {**meta, **change}, _tensors())
    with pytest.raises(ValueError, match=match):
        read_tokenizer(d)
    assert read_tokenizer(_folder(tmp_path / "ok", meta, _tensors()))[1] == meta


def test_an_edited_config_or_a_missing_folder_is_refused(tmp_path):
    d = write_tokenizer(tmp_path / "sid", {}, [5], _tensors())
    (d / "config.json").write_text((d / "config.json").read_text().replace("[\n    5\n  ]", "[6]"))
    with pytest.raises(ValueError, match="config.json is not the file that .*model.safetensors was saved with"):
        read_tokenizer(d)
    with pytest.raises(FileNotFoundError, match="is not a saved SemanticIdTokenizer"):
        read_tokenizer(tmp_path / "nothing")


def test_build_refuses_other_shapes_and_codes_outside_the_codebooks(tmp_path):
    w = tmp_path / "model.safetensors"
    tensors = _tensors()
    with pytest.raises(ValueError, match=r"model.safetensors does not match the model of .*config.json: tensors "
                                         r"\['decoders.0.2.bias', 'decoders.0.2.weight'"):
        build_rqvae([6], CFG, {k: v for k, v in _tensors((5,)).items()}, w)
    with pytest.raises(ValueError, match=r"tensors \['codebooks.1'\] are missing"):
        build_rqvae([5], CFG, {k: v for k, v in tensors.items() if k != "codebooks.1"}, w)
    for bad in (torch.zeros(3, 2), torch.zeros(3, 3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"fitted_codes must be \[N, 2\] integers"):
            build_rqvae([5], CFG, {**tensors, "fitted_codes": bad}, w)
    with pytest.raises(ValueError, match=r"fitted_codes hold codes outside the codebook sizes \(3, 2\)"):
        build_rqvae([5], CFG, {**tensors, "fitted_codes": torch.tensor([[0, 2]])}, w)
