"""The token vocabulary: text tokens, special tokens and one token per (level, code).

Layout of token ids (:class:`SIDVocab`)::

    [0, base_size)                      text tokens of the base tokenizer
    [base_size, +len(special_tokens))   special tokens (<|bos|>, <|hist|>, ...)
    then len(feature_tokens)            optional per-item feature tokens
    then V_0 tokens                     SID level 0 codes  <|s0_0|> ... <|s0_{V_0-1}|>
    then V_1 tokens                     SID level 1 codes, ... up to level L-1

so the codes of level ``l`` are the contiguous slice :meth:`SIDVocab.level_slice`,
which is what the constrained beam search reads its logits from. ``base_size``
is the model's number of embedding rows, which may exceed the text
tokenizer's vocabulary (Qwen3 pads its 151,669 tokens to 151,936 rows).

:func:`extend_vocabulary` grows a model's embedding (and untied LM head) to
``vocab.size``; new rows get the mean of the existing rows plus Gaussian
noise of ``noise_scale`` times their per-dimension std (Hewitt's recipe for
new tokens, which keeps the initial distribution of the old tokens intact).
:func:`init_sid_embeddings` then optionally adds the SID tokenizer's geometry
to the SID rows: each code's codeword through a fixed random projection, so
that codes the tokenizer put close together start close in the model too.

Text tokenizers (:class:`TextTokenizer`) wrap a ``tokenizers.Tokenizer``:
either a checkpoint's ``tokenizer.json`` (:func:`plumrec.model.hf.load_tokenizer`)
or, when training from scratch, a word-level tokenizer fitted on the
catalogue text (:func:`train_word_tokenizer`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from plumrec.io import atomic_path, require_file

__all__ = ["SIDVocab", "SPECIAL_TOKENS", "TextTokenizer", "extend_vocabulary", "init_sid_embeddings",
           "train_word_tokenizer"]

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|hist|>", "<|next|>", "<|item|>", "<|text|>")


@dataclass(frozen=True)
class SIDVocab:
    """Token-id layout of text + special + feature + SID tokens (see the module docstring)."""

    base_size: int
    codebook_sizes: tuple[int, ...]
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS
    feature_tokens: tuple[str, ...] = ()
    _special_index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "codebook_sizes", tuple(int(v) for v in self.codebook_sizes))
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))
        object.__setattr__(self, "feature_tokens", tuple(self.feature_tokens))
        if not isinstance(self.base_size, int) or self.base_size < 0:
            raise ValueError(f"base_size must be an int >= 0, got {self.base_size!r}")
        if not self.codebook_sizes or min(self.codebook_sizes) < 1:
            raise ValueError(f"codebook_sizes must be non-empty positive ints, got {self.codebook_sizes}")
        names = self.special_tokens + self.feature_tokens
        if len(set(names)) != len(names):
            raise ValueError("special_tokens and feature_tokens must be distinct names")
        missing = [t for t in ("<|bos|>", "<|eos|>", "<|hist|>") if t not in self.special_tokens]
        if missing:
            raise ValueError(f"special_tokens must include {missing}")
        object.__setattr__(self, "_special_index", {t: self.base_size + i for i, t in enumerate(names)})

    # -- layout ----------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def sid_start(self) -> int:
        return self.base_size + len(self.special_tokens) + len(self.feature_tokens)

    @property
    def size(self) -> int:
        return self.sid_start + sum(self.codebook_sizes)

    def token(self, name: str) -> int:
        """Id of a special or feature token by name."""
        try:
            return self._special_index[name]
        except KeyError:
            raise KeyError(f"unknown special/feature token {name!r}; have {sorted(self._special_index)}") from None

    def feature(self, k: int) -> int:
        if not 0 <= k < len(self.feature_tokens):
            raise ValueError(f"feature index must be in [0, {len(self.feature_tokens)}), got {k}")
        return self.base_size + len(self.special_tokens) + k

    def level_offset(self, level: int) -> int:
        if not 0 <= level < self.num_levels:
            raise ValueError(f"level must be in [0, {self.num_levels}), got {level}")
        return self.sid_start + sum(self.codebook_sizes[:level])

    def level_slice(self, level: int) -> slice:
        o = self.level_offset(level)
        return slice(o, o + self.codebook_sizes[level])

    # -- conversion ------------------------------------------------------------------
    def sid_to_tokens(self, codes) -> np.ndarray:
        """Codes ``[..., L]`` -> token ids ``[..., L]`` (int64); codes are range-checked."""
        codes = np.asarray(codes)
        if codes.dtype.kind not in "iu":
            raise TypeError(f"codes must be integers, got {codes.dtype}")
        if codes.shape[-1] != self.num_levels:
            raise ValueError(f"codes must have L = {self.num_levels} levels in the last dim, got shape {codes.shape}")
        sizes = np.asarray(self.codebook_sizes)
        if codes.size and ((codes < 0).any() or (codes >= sizes).any()):
            bad = np.argwhere((codes < 0) | (codes >= sizes))[0]
            raise ValueError(f"code {int(codes[tuple(bad)])} at index {tuple(int(b) for b in bad)} is outside "
                             f"the codebook of level {int(bad[-1])} (size {sizes[bad[-1]]})")
        offsets = np.asarray([self.level_offset(l) for l in range(self.num_levels)], np.int64)
        return codes.astype(np.int64) + offsets

    def tokens_to_sid(self, tokens) -> np.ndarray:
        """Token ids ``[..., L]`` -> codes ``[..., L]``; raises if a token is not a SID token of its level."""
        tokens = np.asarray(tokens, np.int64)
        offsets = np.asarray([self.level_offset(l) for l in range(self.num_levels)], np.int64)
        codes = tokens - offsets
        if codes.size and ((codes < 0).any() or (codes >= np.asarray(self.codebook_sizes)).any()):
            raise ValueError("tokens are not SID tokens of their levels")
        return codes

    def token_names(self) -> list[str]:
        """Names of the added tokens, in id order from ``base_size``."""
        names = list(self.special_tokens + self.feature_tokens)
        for l, v in enumerate(self.codebook_sizes):
            names += [f"<|s{l}_{c}|>" for c in range(v)]
        return names

    def check_codebooks(self, codebook_sizes: Sequence[int]) -> None:
        """Raise if this vocabulary was not built for a SID tokenizer with ``codebook_sizes``."""
        if tuple(int(v) for v in codebook_sizes) != self.codebook_sizes:
            raise ValueError(f"the vocabulary has SID tokens for codebooks {self.codebook_sizes} but the SID "
                             f"tokenizer has codebooks {tuple(codebook_sizes)}; rebuild the vocabulary")

    def check_model(self, vocab_size: int) -> None:
        if vocab_size != self.size:
            raise ValueError(f"the model has vocab_size {vocab_size} but the SID vocabulary has {self.size} tokens "
                             f"({self.base_size} text + {len(self.special_tokens) + len(self.feature_tokens)} "
                             f"special + {sum(self.codebook_sizes)} SID); call extend_vocabulary")

    def to_dict(self) -> dict:
        return {"base_size": self.base_size, "codebook_sizes": list(self.codebook_sizes),
                "special_tokens": list(self.special_tokens), "feature_tokens": list(self.feature_tokens)}

    @classmethod
    def from_dict(cls, d: dict) -> "SIDVocab":
        """The inverse of :meth:`to_dict`; a missing or malformed field is a ``ValueError`` naming it."""
        if not isinstance(d, dict):
            raise ValueError(f"a SIDVocab dict must be a mapping, got {type(d).__name__}")
        d = {"feature_tokens": [], **d}

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_list(v, of) -> bool:
            return isinstance(v, (list, tuple)) and all(of(x) for x in v)

        for name, ok, want in (("base_size", is_int(d.get("base_size")), "an int"),
                               ("codebook_sizes", is_list(d.get("codebook_sizes"), is_int), "a list of ints"),
                               ("special_tokens", is_list(d.get("special_tokens"), lambda x: isinstance(x, str)),
                                "a list of strings"),
                               ("feature_tokens", is_list(d["feature_tokens"], lambda x: isinstance(x, str)),
                                "a list of strings")):
            if not ok:
                raise ValueError(f"SIDVocab field {name!r} must be {want}, got {d.get(name)!r}")
        return cls(d["base_size"], tuple(d["codebook_sizes"]), tuple(d["special_tokens"]), tuple(d["feature_tokens"]))


@torch.no_grad()
def extend_vocabulary(model, vocab: SIDVocab, *, noise_scale: float = 0.1, seed: int = 0):
    """Grow ``model`` (a :class:`plumrec.model.PlumLM`) from ``vocab.base_size`` to ``vocab.size`` tokens.

    The model's current vocabulary must be exactly the base (text) vocabulary.
    New embedding rows (and untied LM-head rows) are ``mean + noise_scale *
    std * N(0, 1)`` of the existing rows, per dimension. Returns the model.
    """
    old = model.config.vocab_size
    if old != vocab.base_size:
        raise ValueError(f"the model has {old} tokens but vocab.base_size is {vocab.base_size}; the SID vocabulary "
                         "must extend the model's own text vocabulary")
    if old == 0:
        raise ValueError("cannot initialise new rows from an empty vocabulary")
    gen = torch.Generator().manual_seed(seed)
    n_new = vocab.size - old

    def grow(weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach().float().cpu()
        mean, std = w.mean(0), w.std(0) if w.shape[0] > 1 else torch.zeros(w.shape[1])
        new = mean + noise_scale * std * torch.randn(n_new, w.shape[1], generator=gen)
        return torch.cat([weight.detach(), new.to(weight)], 0)

    emb = grow(model.embed_tokens.weight)
    model.embed_tokens = nn.Embedding.from_pretrained(emb, freeze=False)
    if model.lm_head is not None:
        head = nn.Linear(model.config.hidden_size, vocab.size, bias=False).to(emb)
        head.weight.copy_(grow(model.lm_head.weight))
        model.lm_head = head
    model.config = model.config.replace(vocab_size=vocab.size)
    return model


@torch.no_grad()
def init_sid_embeddings(model, vocab: SIDVocab, codewords: Sequence, *, scale: float, seed: int = 0):
    """Add the SID tokenizer's codewords to ``model``'s SID token rows (in place; returns the model).

    For level ``l`` with codewords ``C_l [V_l, D]`` (the RQ-VAE's codebook: the
    centroid of level 0, the residual centroids below it), the rows of
    :meth:`SIDVocab.level_slice` ``(l)`` get ``+ C_l @ P_l`` where ``P_l [D, H]``
    is a Gaussian projection drawn from ``seed``, one per level (so the levels
    start in different subspaces), rescaled so that the added rows' mean norm
    is ``scale``. The existing random init stays underneath, so rows are full
    rank and codes with equal codewords still differ. The embedding and, when
    untied, the LM head get the same rows: the output logit of a code then
    starts to favour codes near the one the hidden state points at.

    Args:
        model: a :class:`plumrec.model.PlumLM` whose vocabulary is ``vocab.size``.
        vocab: the SID vocabulary (its ``codebook_sizes`` must match ``codewords``).
        codewords: one ``[V_l, D]`` array per level
            (:attr:`plumrec.sid.SemanticIdTokenizer.codewords`).
        scale: mean L2 norm of the added rows per level, > 0 (an initialised row
            of ``hidden_size`` 384 and ``initializer_range`` 0.02 has norm ~0.39).
        seed: seed of the projections.
    """
    if model.config.vocab_size != vocab.size:
        raise ValueError(f"model has {model.config.vocab_size} tokens but vocab.size is {vocab.size}: "
                         "call extend_vocabulary first")
    if isinstance(scale, bool) or not (isinstance(scale, (int, float)) and np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    codewords = [torch.as_tensor(np.asarray(c), dtype=torch.float64) for c in codewords]
    if len(codewords) != vocab.num_levels:
        raise ValueError(f"codewords has {len(codewords)} levels but vocab has {vocab.num_levels}")
    for l, (c, v) in enumerate(zip(codewords, vocab.codebook_sizes)):
        if c.ndim != 2 or c.shape[0] != v:
            raise ValueError(f"codewords[{l}] must be [{v}, D] (level {l}'s codebook size), got {tuple(c.shape)}")
        if c.shape[1] != codewords[0].shape[1]:
            raise ValueError(f"codewords[{l}] has width {c.shape[1]}, codewords[0] {codewords[0].shape[1]}")
        if not torch.isfinite(c).all():
            raise ValueError(f"codewords[{l}] has non-finite values")
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    rows = []
    for l, c in enumerate(codewords):
        s = c @ torch.randn(c.shape[1], hidden, generator=gen, dtype=torch.float64)
        norm = s.norm(dim=1).mean()
        if norm == 0:
            raise ValueError(f"codewords[{l}] are all zero: nothing to initialise from")
        rows.append(s * (scale / norm))
    for weight in [model.embed_tokens.weight] + ([] if model.lm_head is None else [model.lm_head.weight]):
        for l, s in enumerate(rows):
            weight[vocab.level_slice(l)] += s.to(weight)
    return model


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` seen as ``encode(str) -> list[int]`` without special tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def save(self, path: str) -> None:
        """Write the ``tokenizer.json`` file ``path`` atomically."""
        with atomic_path(path) as tmp:
            self.tokenizer.save(str(tmp))

    @classmethod
    def load(cls, path: str) -> "TextTokenizer":
        """A ``tokenizer.json`` file; a missing or unreadable one is a ``ValueError`` naming it."""
        from tokenizers import Tokenizer

        path = require_file(path, "a text tokenizer (tokenizers' tokenizer.json)")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # the tokenizers library's own error
            raise ValueError(f"{path}: not a readable tokenizers file ({e}); it may be truncated or damaged") from None

    @classmethod
    def from_json(cls, text: str) -> "TextTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    def to_json(self) -> str:
        return self.tokenizer.to_str()


def train_word_tokenizer(texts: Sequence[str], *, vocab_size: int = 4096, min_frequency: int = 1) -> TextTokenizer:
    """A lower-casing word-level tokenizer fitted on ``texts`` (for models trained from scratch).

    Digits are split into single tokens, so numbers cost no vocabulary."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer

    tok = Tokenizer(WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    trainer = WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=["[UNK]"])
    tok.train_from_iterator(list(texts), trainer=trainer)
    return TextTokenizer(tok)
