"""Training data for the PLUM LM: the CPT corpus, SFT examples and jagged packing.

Every example is a token sequence with a loss weight per token
(:class:`Example`): ``weights[t]`` weighs the loss of predicting
``tokens[t]`` from ``tokens[:t]`` (``weights[0]`` is always 0).

Formats (token names from :class:`plum.model.vocab.SIDVocab`; ``<sid i>`` is
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

:func:`pack` concatenates examples into one jagged batch without padding
(``cu_seqlens`` for ``history_attention``) and gathers the positions that
carry a loss, so logits are computed only there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from plum.model.vocab import SIDVocab, TextTokenizer

__all__ = ["Example", "PackedBatch", "CPTCorpus", "SFTDataset", "SequenceSFTDataset", "pack", "ExampleStream",
           "check_histories", "grounding_text"]


@dataclass(frozen=True)
class Example:
    tokens: np.ndarray   # int64 [n]
    weights: np.ndarray  # float32 [n]; weights[t] weighs predicting tokens[t]
    items: np.ndarray | None = None  # int64 [n]: the item whose SID tokens[t] is part of, -1 for other tokens

    def __post_init__(self):
        if self.tokens.ndim != 1 or self.tokens.shape != self.weights.shape:
            raise ValueError(f"tokens and weights must be 1-D of one length, got {self.tokens.shape} "
                             f"and {self.weights.shape}")
        if self.items is not None and self.items.shape != self.tokens.shape:
            raise ValueError(f"items must be 1-D of the tokens' length {self.tokens.shape}, got {self.items.shape}")

    def tail(self, n: int) -> "Example":
        """The last ``n`` tokens (with their weights and items)."""
        return Example(self.tokens[-n:], self.weights[-n:], None if self.items is None else self.items[-n:])


def _token_items(items: np.ndarray, per_item: int) -> np.ndarray:
    """The item of every token of :func:`history_tokens` ``(items)`` with ``per_item`` tokens an item:
    -1 for the two head tokens, then each item repeated ``per_item`` times (its SID and feature tokens)."""
    return np.concatenate([np.full(2, -1, np.int64), np.repeat(np.asarray(items, np.int64), per_item)])


def check_histories(sequences: Sequence[np.ndarray], num_items: int, name: str = "histories") -> None:
    """Raise a ``ValueError`` naming the first history with an item outside ``[0, num_items)``."""
    for u, seq in enumerate(sequences):
        seq = np.asarray(seq)
        if seq.ndim != 1 or seq.dtype.kind not in "iu":
            raise TypeError(f"{name}[{u}] must be a 1-D integer array of item indices, got {seq.dtype} {seq.shape}")
        if seq.size and (seq.min() < 0 or seq.max() >= num_items):
            bad = int(seq[(seq < 0) | (seq >= num_items)][0])
            raise ValueError(f"{name}[{u}] names unknown item {bad}: the catalogue has items [0, {num_items})")


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


def history_tokens(vocab: SIDVocab, sid_tokens: np.ndarray, items: np.ndarray,
                   features: np.ndarray | None = None) -> np.ndarray:
    """``<|bos|> <|hist|>`` then every item's SID tokens (and feature token)."""
    body = sid_tokens[items]                                            # [n, L]
    if features is not None:
        feats = np.asarray([vocab.feature(int(f)) for f in features], np.int64)[:, None]
        body = np.concatenate([body, feats], 1)
    head = np.asarray([vocab.token("<|bos|>"), vocab.token("<|hist|>")], np.int64)
    return np.concatenate([head, body.reshape(-1)])


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
        items = np.concatenate([_token_items(seq[:c][-self.max_items:], per_item),
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
                       _token_items(seq[start:j1], per_item))


@dataclass
class PackedBatch:
    """Examples packed back to back.

    ``input_ids [T]``, ``cu_seqlens`` int32 ``[B+1]``, ``max_seqlen``;
    ``loss_index [M]``: packed positions whose *next* token carries a loss,
    ``targets [M]`` those next tokens, ``weights [M]`` their loss weights.
    ``items [T]`` (int64, or None when an example has none): the item whose SID
    each token is part of, -1 for other tokens (the SFT datasets' examples
    carry them; :class:`~plum.train.loop.CodebookLoss`'s distillation reads them).
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    loss_index: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    num_examples: int
    items: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.cu_seqlens.to(device), self.max_seqlen,
                           self.loss_index.to(device), self.targets.to(device), self.weights.to(device),
                           self.num_examples, None if self.items is None else self.items.to(device))


def pack(examples: Sequence[Example]) -> PackedBatch:
    """Pack examples into one jagged batch (no padding)."""
    if not examples:
        raise ValueError("pack needs at least one example")
    lens = np.asarray([len(e.tokens) for e in examples], np.int64)
    if (lens < 2).any():
        raise ValueError("every example needs >= 2 tokens")
    tokens = np.concatenate([e.tokens for e in examples])
    w = np.concatenate([e.weights for e in examples])
    cu = np.concatenate([[0], np.cumsum(lens)])
    starts = np.zeros(len(tokens), bool)
    starts[cu[:-1]] = True
    # position p predicts p + 1 when p + 1 is in the same sequence and weighs > 0
    nxt = np.arange(1, len(tokens))
    keep = (~starts[1:]) & (w[1:] > 0)
    idx = nxt[keep] - 1
    items = None
    if all(e.items is not None for e in examples):
        items = torch.from_numpy(np.concatenate([e.items for e in examples]).astype(np.int64))
    return PackedBatch(torch.from_numpy(tokens), torch.from_numpy(cu.astype(np.int32)), int(lens.max()),
                       torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(tokens[idx + 1]),
                       torch.from_numpy(w[idx + 1].astype(np.float32)), len(examples), items)


class ExampleStream:
    """An endless, seeded, reshuffled-every-epoch stream of a dataset's examples,
    cut into packed batches of at most ``max_tokens`` tokens.

    ``position`` (examples consumed so far) is the whole state: a stream built
    with the same dataset and seed at the same position yields the same batches.
    """

    def __init__(self, dataset, *, max_tokens: int, seed: int = 0, position: int = 0):
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        self.dataset, self.max_tokens, self.seed, self.position = dataset, max_tokens, seed, position
        self._perm_epoch, self._perm = -1, None

    def _index(self, p: int) -> int:
        n = len(self.dataset)
        epoch = p // n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[p % n])

    @property
    def epoch(self) -> float:
        return self.position / len(self.dataset)

    def next_batch(self) -> PackedBatch:
        examples, total = [], 0
        while True:
            ex = self.dataset[self._index(self.position)]
            n = len(ex.tokens)
            if n > self.max_tokens:
                ex = ex.tail(self.max_tokens)
                n = self.max_tokens
            if examples and total + n > self.max_tokens:
                break
            examples.append(ex)
            total += n
            self.position += 1
        return pack(examples)
