"""Training data for the PLUM LM: the CPT corpus and the SFT examples.

Every example is a :class:`plumrec.sequences.Example`: a token sequence with
a loss weight per token (``weights[t]`` weighs the loss of predicting
``tokens[t]`` from ``tokens[:t]``; ``weights[0]`` is always 0).

Formats (token names from :class:`plumrec.model.vocab.SIDVocab`; ``<sid i>`` is
item i's L SID tokens, ``<f>`` an optional feature token after each item)::

    behaviour (CPT)   <|bos|> <|hist|> <sid a> <f> <sid b> <f> ... <|eos|>      loss on every token
    grounding (CPT)   <|bos|> <|item|> <sid i> text("has title ... . categories: ...") <|eos|>
    SFT               <|bos|> <|hist|> <sid a> <f> ... <sid z> <f> | <sid next>  loss on <sid next> only
    SFT (sequence)    <|bos|> <|hist|> <sid a> <f> <sid b> <f> ... <sid z>        loss on every <sid> after a

An SFT prompt is a prefix of the behaviour format, so continued pre-training
on histories teaches exactly the continuation SFT and retrieval ask for.

Datasets are random-access: ``dataset[i]`` is a pure function of ``(seed,
i)``, so a training position (examples consumed) is all a checkpoint needs to
resume the data stream exactly. :class:`CPTCorpus` draws example ``i`` from
behaviour with probability ``behaviour_fraction`` (PLUM: 50%) and from
grounding otherwise.

The training loop packs examples into jagged batches with
:class:`plumrec.sequences.ExampleStream`.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from plumrec.model.vocab import SIDVocab, TextTokenizer
from plumrec.sequences import Example, check_histories, history_tokens, token_items

__all__ = ["CPTCorpus", "SFTDataset", "SequenceSFTDataset", "grounding_text"]


def _check_sid_tokens(sid_tokens: np.ndarray, vocab: SIDVocab) -> np.ndarray:
    sid_tokens = np.asarray(sid_tokens, np.int64)
    if sid_tokens.ndim != 2 or sid_tokens.shape[1] != vocab.num_levels:
        raise ValueError(f"sid_tokens must be [num_items, L={vocab.num_levels}], got {sid_tokens.shape}")
    vocab.tokens_to_sid(sid_tokens)  # raises when not SID tokens of their levels
    return sid_tokens


def _check_features(features, sequences, vocab: SIDVocab) -> None:
    """Per-user feature arrays must align with the sequences and index ``vocab.feature_tokens``."""
    if features is None:
        return
    if len(features) != len(sequences) or any(len(f) != len(s) for f, s in zip(features, sequences)):
        raise ValueError("features must align with sequences (one feature per item)")
    nf = len(vocab.feature_tokens)
    if any(len(f) and (np.min(f) < 0 or np.max(f) >= nf) for f in features):
        raise ValueError(f"feature values must be in [0, {nf}) (vocab.feature_tokens)")


def grounding_text(meta: Mapping) -> str:
    """The text after an item's SID: ``"has title T . categories : a , b"``."""
    parts = [f"has title {meta.get('title', '')}".strip()]
    cats: list[str] = []
    for entry in meta.get("categories") or []:
        for c in [entry] if isinstance(entry, str) else entry:
            if c not in cats:
                cats.append(c)
    if cats:
        parts.append("categories : " + " , ".join(cats))
    return " . ".join(parts)


class CPTCorpus:
    """Continued pre-training corpus: user histories in SIDs mixed with SID grounding text.

    Args:
        sequences: training item sequences, one int array per user.
        sid_tokens: ``[num_items, L]`` token ids of every item's SID (``vocab.sid_to_tokens(codes)``).
        vocab: the token layout.
        text_tokenizer: tokenizes the grounding text (needed when ``behaviour_fraction < 1``).
        items: metadata per item (``title``, ``categories``) for grounding.
        features: optional per-user int arrays aligned with ``sequences``: a
            feature token index after each item (e.g. a watch-time bucket).
        behaviour_fraction: probability that an example is a user history.
        max_items: longest history window (a random window of a longer one).
        size: nominal number of examples per epoch (default: users + items).
        seed: seeds every draw.
    """

    def __init__(self, sequences: Sequence[np.ndarray], sid_tokens: np.ndarray, vocab: SIDVocab, *,
                 text_tokenizer: TextTokenizer | None = None, items: Sequence[Mapping] | None = None,
                 features: Sequence[np.ndarray] | None = None, behaviour_fraction: float = 0.5,
                 max_items: int = 50, size: int | None = None, seed: int = 0):
        self.vocab = vocab
        self.sid_tokens = _check_sid_tokens(sid_tokens, vocab)
        check_histories(sequences, len(self.sid_tokens), "sequences")
        if not 0.0 <= behaviour_fraction <= 1.0:
            raise ValueError(f"behaviour_fraction must be in [0, 1], got {behaviour_fraction}")
        if behaviour_fraction < 1.0 and (text_tokenizer is None or items is None):
            raise ValueError("grounding examples (behaviour_fraction < 1) need text_tokenizer and items")
        if items is not None and len(items) != len(self.sid_tokens):
            raise ValueError(f"items must have one entry per item ({len(self.sid_tokens)}), got {len(items)}")
        _check_features(features, sequences, vocab)
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.users = [u for u, s in enumerate(sequences) if len(s) >= 2]
        if behaviour_fraction > 0 and not self.users:
            raise ValueError("no sequence has >= 2 items: nothing to learn from behaviour")
        self.sequences = [np.asarray(s, np.int64) for s in sequences]
        self.features = features
        self.behaviour_fraction = behaviour_fraction
        self.max_items = max_items
        self.seed = seed
        self.size = size if size is not None else len(self.users) + len(self.sid_tokens)
        self._text_cache: dict[int, np.ndarray] = {}
        self.text_tokenizer, self.items = text_tokenizer, items

    def __len__(self) -> int:
        return self.size

    def _grounding(self, item: int) -> np.ndarray:
        if item not in self._text_cache:
            v = self.vocab
            text = np.asarray(self.text_tokenizer.encode(grounding_text(self.items[item])), np.int64)
            self._text_cache[item] = np.concatenate([
                [v.token("<|bos|>"), v.token("<|item|>")], self.sid_tokens[item], text, [v.token("<|eos|>")]])
        return self._text_cache[item]

    def __getitem__(self, i: int) -> Example:
        rng = np.random.default_rng([self.seed, int(i)])
        if rng.random() < self.behaviour_fraction:
            u = self.users[int(rng.integers(len(self.users)))]
            seq = self.sequences[u]
            start = int(rng.integers(0, len(seq) - self.max_items + 1)) if len(seq) > self.max_items else 0
            window = slice(start, start + self.max_items)
            feats = None if self.features is None else np.asarray(self.features[u])[window]
            tokens = np.concatenate([history_tokens(self.vocab, self.sid_tokens, seq[window], feats),
                                     [self.vocab.token("<|eos|>")]])
        else:
            tokens = self._grounding(int(rng.integers(len(self.sid_tokens))))
        weights = np.ones(len(tokens), np.float32)
        weights[0] = 0.0
        return Example(tokens, weights)


class SFTDataset:
    """Next-item SFT: history -> SID of the next item, loss on the target's L tokens only.

    Example ``k`` is ``(user, cut)``: prompt ``sequences[user][:cut]`` (its
    last ``max_items``), target ``sequences[user][cut]``, for every ``cut`` in
    ``1 .. len - 1``. ``weights`` (optional) gives each example a loss
    weight: an array aligned with :attr:`examples` or a function
    ``(user, cut, target) -> float``.
    """

    def __init__(self, sequences: Sequence[np.ndarray], sid_tokens: np.ndarray, vocab: SIDVocab, *,
                 features: Sequence[np.ndarray] | None = None, max_items: int = 50,
                 weights: np.ndarray | Callable | None = None, min_history: int = 1):
        self.vocab = vocab
        self.sid_tokens = _check_sid_tokens(sid_tokens, vocab)
        check_histories(sequences, len(self.sid_tokens), "sequences")
        if max_items < 1 or min_history < 1:
            raise ValueError("max_items and min_history must be >= 1")
        _check_features(features, sequences, vocab)
        self.sequences = [np.asarray(s, np.int64) for s in sequences]
        self.features = features
        self.max_items = max_items
        self.examples = np.asarray([(u, c) for u, s in enumerate(self.sequences)
                                    for c in range(min_history, len(s))], np.int64).reshape(-1, 2)
        if len(self.examples) == 0:
            raise ValueError("no SFT example: every sequence is shorter than min_history + 1")
        if weights is None:
            self.weights = np.ones(len(self.examples), np.float32)
        elif callable(weights):
            self.weights = np.asarray([weights(int(u), int(c), int(self.sequences[u][c]))
                                       for u, c in self.examples], np.float32)
        else:
            self.weights = np.asarray(weights, np.float32)
            if self.weights.shape != (len(self.examples),):
                raise ValueError(f"weights must have one value per example ({len(self.examples)}), "
                                 f"got shape {self.weights.shape}")
        if not np.isfinite(self.weights).all() or (self.weights < 0).any():
            raise ValueError("weights must be finite and >= 0")

    def __len__(self) -> int:
        return len(self.examples)

    def prompt(self, history: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """Prompt tokens of a history (its last ``max_items`` items)."""
        history = np.asarray(history, np.int64)[-self.max_items:]
        if features is not None:
            features = np.asarray(features)[-self.max_items:]
        return history_tokens(self.vocab, self.sid_tokens, history, features)

    def num_tokens(self, i: int) -> int:
        """``len(self[i].tokens)`` without building the example: ``<|bos|> <|hist|>``, the window's SIDs (and
        feature tokens), the target's (lets :meth:`~plumrec.sequences.ExampleStream.skip_batch` pack other
        ranks' batches)."""
        c = int(self.examples[i][1])
        per_item = self.vocab.num_levels + (0 if self.features is None else 1)
        return 2 + min(c, self.max_items) * per_item + self.vocab.num_levels

    def __getitem__(self, i: int) -> Example:
        u, c = (int(x) for x in self.examples[i])
        seq = self.sequences[u]
        feats = None if self.features is None else np.asarray(self.features[u])[:c]
        prompt = self.prompt(seq[:c], feats)
        target = self.sid_tokens[seq[c]]
        tokens = np.concatenate([prompt, target])
        weights = np.zeros(len(tokens), np.float32)
        weights[len(prompt):] = self.weights[i]
        per_item = self.vocab.num_levels + (0 if feats is None else 1)
        items = np.concatenate([token_items(seq[:c][-self.max_items:], per_item),
                                np.full(len(target), seq[c], np.int64)])
        return Example(tokens, weights, items)


class SequenceSFTDataset:
    """Next-item SFT with every next item of a window as a target (the causal-LM form of
    :class:`SFTDataset`).

    A user's sequence ``s`` of ``n`` items gives the targets ``s[j]`` for
    ``j`` in ``min_history .. n - 1``, as :class:`SFTDataset` does, but one
    example carries many of them: the tokens are the history format of a
    window of at most ``max_items + 1`` items and the loss weighs the SID
    tokens of every target in it (never the feature tokens, never the
    window's first items). Under causal attention the loss of target ``j`` is
    exactly :class:`SFTDataset`'s for the prompt ``s[start:j]``, so an epoch
    asks the same questions for about ``1 / (mean history length)`` of the
    tokens.

    Windows: the targets of a user are cut, from the end, into blocks of at
    most ``stride`` (default ``max_items // 2``) consecutive positions; the
    block ``[j0, j1)`` is trained in the window ``s[max(0, j1 - 1 - max_items) : j1]``,
    so every target sees at most ``max_items`` items of history (retrieval's
    prompt length) and at least ``min(j0, max_items + 1 - stride)``. A
    sequence of up to ``max_items + 1`` items is one example. ``weights``
    (optional) is a function ``(user, cut, target) -> float`` giving each
    target's loss weight.
    """

    def __init__(self, sequences: Sequence[np.ndarray], sid_tokens: np.ndarray, vocab: SIDVocab, *,
                 features: Sequence[np.ndarray] | None = None, max_items: int = 50,
                 weights: Callable | None = None, min_history: int = 1, stride: int | None = None):
        self.vocab = vocab
        self.sid_tokens = _check_sid_tokens(sid_tokens, vocab)
        check_histories(sequences, len(self.sid_tokens), "sequences")
        if max_items < 1 or min_history < 1:
            raise ValueError("max_items and min_history must be >= 1")
        stride = max(max_items // 2, 1) if stride is None else stride
        if not 1 <= stride <= max_items:
            raise ValueError(f"stride must be in [1, max_items={max_items}], got {stride}")
        if weights is not None and not callable(weights):
            raise TypeError("weights must be a function (user, cut, target) -> float")
        _check_features(features, sequences, vocab)
        self.sequences = [np.asarray(s, np.int64) for s in sequences]
        self.features = features
        self.max_items, self.stride, self.min_history, self.weights = max_items, stride, min_history, weights
        blocks = []  # (user, j0, j1)
        for u, s in enumerate(self.sequences):
            j1 = len(s)
            while j1 > min_history:
                j0 = max(min_history, j1 - stride)
                blocks.append((u, j0, j1))
                j1 = j0
        if not blocks:
            raise ValueError("no SFT example: every sequence is shorter than min_history + 1")
        self.blocks = np.asarray(blocks, np.int64)
        self.num_targets = int((self.blocks[:, 2] - self.blocks[:, 1]).sum())

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> Example:
        u, j0, j1 = (int(x) for x in self.blocks[i])
        start = max(0, j1 - 1 - self.max_items)
        seq = self.sequences[u]
        feats = None if self.features is None else np.asarray(self.features[u])[start:j1]
        tokens = history_tokens(self.vocab, self.sid_tokens, seq[start:j1], feats)
        per_item = self.vocab.num_levels + (0 if feats is None else 1)
        w = np.zeros((j1 - start, per_item), np.float32)
        w[j0 - start:, :self.vocab.num_levels] = 1.0 if self.weights is None else np.asarray(
            [float(self.weights(u, j, int(seq[j]))) for j in range(j0, j1)], np.float32)[:, None]
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"weights must be finite and >= 0 (user {u})")
        return Example(tokens, np.concatenate([np.zeros(2, np.float32), w.reshape(-1)]),
                       token_items(seq[start:j1], per_item))
