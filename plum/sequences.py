"""Item sequences as the models see them: histories, examples and packed batches.

Shared by training (:mod:`plumrec.train`), generative retrieval
(:mod:`plumrec.retrieval`) and the baselines (:mod:`plumrec.baselines`), which
sit side by side above this module and never import each other:

- :func:`check_histories`: item sequences over a catalogue of ``num_items``;
- :func:`history_tokens`: the history format ``<|bos|> <|hist|> <sid a> <f>
  <sid b> <f> ...`` that CPT trains on, SFT prompts with and retrieval
  decodes after (token ids of :class:`plumrec.model.vocab.SIDVocab`);
- :class:`Example`: one token sequence with a loss weight per token
  (``weights[t]`` weighs predicting ``tokens[t]`` from ``tokens[:t]``;
  ``weights[0]`` is always 0) and optionally the item of every token;
- :func:`pack` / :class:`PackedBatch`: examples concatenated into one jagged
  batch without padding (``cu_seqlens`` for ``history_attention``), with the
  positions that carry a loss gathered so that logits are computed only there;
- :class:`ExampleStream`: an endless, seeded stream of packed batches of a
  random-access dataset, whose position is its whole state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from plumrec.model.vocab import SIDVocab

__all__ = ["Example", "PackedBatch", "ExampleStream", "check_histories", "history_tokens", "pack", "token_items"]

FULL_SHUFFLE_MAX = 1 << 22  # up to 4M examples a full permutation per epoch (32 MB): small datasets' order is kept
SHUFFLE_BLOCK = 1 << 16  # block-shuffle unit above it: 512 KB of permutation in memory, blocks mix across the epoch


def check_histories(sequences: Sequence[np.ndarray], num_items: int, name: str = "histories") -> None:
    """Raise a ``ValueError`` naming the first history with an item outside ``[0, num_items)``."""
    for u, seq in enumerate(sequences):
        seq = np.asarray(seq)
        if seq.ndim != 1 or seq.dtype.kind not in "iu":
            raise TypeError(f"{name}[{u}] must be a 1-D integer array of item indices, got {seq.dtype} {seq.shape}")
        if seq.size and (seq.min() < 0 or seq.max() >= num_items):
            bad = int(seq[(seq < 0) | (seq >= num_items)][0])
            raise ValueError(f"{name}[{u}] names unknown item {bad}: the catalogue has items [0, {num_items})")


@dataclass(frozen=True)
class Example:
    """One training sequence: its tokens, a loss weight per token and optionally the item of each token."""

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


def token_items(items: np.ndarray, per_item: int) -> np.ndarray:
    """The item of every token of :func:`history_tokens` ``(items)`` with ``per_item`` tokens an item:
    -1 for the two head tokens, then each item repeated ``per_item`` times (its SID and feature tokens)."""
    return np.concatenate([np.full(2, -1, np.int64), np.repeat(np.asarray(items, np.int64), per_item)])


def history_tokens(vocab: SIDVocab, sid_tokens: np.ndarray, items: np.ndarray,
                   features: np.ndarray | None = None) -> np.ndarray:
    """``<|bos|> <|hist|>`` then every item's SID tokens (and feature token)."""
    body = sid_tokens[items]                                            # [n, L]
    if features is not None:
        feats = np.asarray([vocab.feature(int(f)) for f in features], np.int64)[:, None]
        body = np.concatenate([body, feats], 1)
    head = np.asarray([vocab.token("<|bos|>"), vocab.token("<|hist|>")], np.int64)
    return np.concatenate([head, body.reshape(-1)])


@dataclass
class PackedBatch:
    """Examples packed back to back.

    ``input_ids [T]``, ``cu_seqlens`` int32 ``[B+1]``, ``max_seqlen``;
    ``loss_index [M]``: packed positions whose *next* token carries a loss,
    ``targets [M]`` those next tokens, ``weights [M]`` their loss weights.
    ``items [T]`` (int64, or None when an example has none): the item whose SID
    each token is part of, -1 for other tokens (the SFT datasets' examples
    carry them; :class:`~plumrec.train.codebook_loss.CodebookLoss`'s distillation reads them).
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

    Order: a dataset of at most :data:`FULL_SHUFFLE_MAX` examples is read in
    the permutation ``default_rng([seed, epoch]).permutation(n)`` of each
    epoch. A larger one is cut into contiguous blocks of :data:`SHUFFLE_BLOCK`
    indices (the last one partial); an epoch reads the blocks in the order
    ``default_rng([seed, epoch]).permutation(num_blocks)`` and the indices of
    block ``b`` in the order ``default_rng([seed, epoch, b]).permutation``, so
    the memory is ``O(num_blocks + SHUFFLE_BLOCK)``, not ``O(n)``.
    """

    def __init__(self, dataset, *, max_tokens: int, seed: int = 0, position: int = 0):
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        self.dataset, self.max_tokens, self.seed, self.position = dataset, max_tokens, seed, position
        self._perm_epoch, self._perm, self._last_slot = -1, None, 0
        self._block, self._block_perm = None, None  # (epoch, block) and its permutation

    def _index(self, p: int) -> int:
        n = len(self.dataset)
        epoch, r = divmod(p, n)
        if epoch != self._perm_epoch:
            size = n if n <= FULL_SHUFFLE_MAX else -(-n // SHUFFLE_BLOCK)
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(size)
            self._perm_epoch = epoch
            if n > FULL_SHUFFLE_MAX:  # the slot of the partial last block in the epoch's block order
                self._last_slot = int(np.flatnonzero(self._perm == size - 1)[0])
        if n <= FULL_SHUFFLE_MAX:
            return int(self._perm[r])
        block_n, last_n, j = SHUFFLE_BLOCK, n - (len(self._perm) - 1) * SHUFFLE_BLOCK, self._last_slot
        if r < j * block_n:
            slot, off = divmod(r, block_n)
        elif r < j * block_n + last_n:
            slot, off = j, r - j * block_n
        else:
            slot, off = divmod(r - j * block_n - last_n, block_n)
            slot += j + 1
        b = int(self._perm[slot])
        if self._block != (epoch, b):
            size = last_n if b == len(self._perm) - 1 else block_n
            self._block_perm = np.random.default_rng([self.seed, epoch, b]).permutation(size)
            self._block = (epoch, b)
        return b * block_n + int(self._block_perm[off])

    @property
    def epoch(self) -> float:
        return self.position / len(self.dataset)

    def _take(self, measure) -> tuple[list, int]:
        """Consume the examples of the next batch: ``measure(i) -> (tokens, value)`` for each drawn index;
        the batch takes examples while their tokens (a longer one counted as ``max_tokens``: it is cut to its
        tail) fit ``max_tokens``, and at least one. Returns their values and the batch's tokens."""
        values, total = [], 0
        while True:
            n, value = measure(self._index(self.position))
            n = min(n, self.max_tokens)
            if values and total + n > self.max_tokens:
                return values, total
            values.append(value)
            total += n
            self.position += 1

    def skip_batch(self) -> int:
        """Advance past the batch :meth:`next_batch` would return, and return its token count, without
        building its examples when the dataset tells their lengths (``dataset.num_tokens(i)``, as the SFT
        datasets do): each rank of a distributed run packs only its own batch and skips the others'."""
        length = getattr(self.dataset, "num_tokens", None)
        if length is None:
            return self.next_batch().num_tokens
        return self._take(lambda i: (length(i), None))[1]

    def next_batch(self) -> PackedBatch:
        def measure(i: int) -> tuple[int, Example]:
            ex = self.dataset[i]
            return len(ex.tokens), (ex.tail(self.max_tokens) if len(ex.tokens) > self.max_tokens else ex)

        return pack(self._take(measure)[0])
