"""Training datasets over an on-disk :class:`~plumrec.data.events.EventStore`, for interaction logs that
do not fit in memory.

They are random-access like the in-memory datasets of :mod:`plumrec.train.corpus` (``dataset[i]`` a
pure function of ``i`` and the seed), so :class:`~plumrec.sequences.ExampleStream` streams them and a
checkpoint's position resumes them exactly. Each example reads only the items it needs from the
memory-mapped store; the per-user indexes they need (a few bytes a user) are built once, in chunks of
users, and kept as memory-mapped ``.npy`` files in the store folder:

- :class:`StoreSFTDataset`: :class:`~plumrec.train.corpus.SFTDataset`'s examples (weight 1, no features),
  in its order;
- :class:`StoreCPTCorpus`: behaviour-only :class:`~plumrec.train.corpus.CPTCorpus` (``behaviour_fraction=1``),
  the same example for the same ``(seed, i)``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from plumrec.data.events import EventStore
from plumrec.io import atomic_path
from plumrec.model.vocab import SIDVocab
from plumrec.sequences import Example, history_tokens, token_items
from plumrec.train.corpus import _check_sid_tokens

__all__ = ["StoreCPTCorpus", "StoreSFTDataset"]

USER_CHUNK = 1 << 20  # users read at a time while building an index: 8 MB of offsets in memory


def _store(store) -> EventStore:
    if isinstance(store, EventStore):
        return store
    if isinstance(store, (str, os.PathLike)):
        return EventStore.open(store)
    raise TypeError(f"store must be an EventStore or its folder, got {type(store).__name__}")


def _sid_tokens(store: EventStore, sid_tokens: np.ndarray, vocab: SIDVocab) -> np.ndarray:
    sid_tokens = _check_sid_tokens(sid_tokens, vocab)
    if len(sid_tokens) != store.num_items:
        raise ValueError(f"sid_tokens has {len(sid_tokens)} items, the event store {store.path} has "
                         f"num_items={store.num_items}")
    return sid_tokens


def _cached_index(path: Path, length: int | None, build: Callable[[Path], None]) -> np.ndarray:
    """The memory-mapped int64 ``.npy`` at ``path``, written first by ``build(tmp)`` (:func:`plumrec.io.atomic_path`)
    when it is missing or, with ``length`` given, of another length."""
    if path.exists():
        try:
            arr = np.load(path, mmap_mode="r")
            if arr.dtype == np.int64 and arr.ndim == 1 and (length is None or len(arr) == length):
                return arr
        except (OSError, ValueError):
            pass
    with atomic_path(path) as tmp:
        build(tmp)
    return np.load(path, mmap_mode="r")


class StoreSFTDataset:
    """Next-item SFT over an event store: :class:`~plumrec.train.corpus.SFTDataset`'s examples.

    Example ``k`` is ``(user, cut)`` in lexicographic order, ``cut`` in ``min_history .. n_user - 1``:
    prompt ``store[user][:cut]`` (its last ``max_items``), target ``store[user][cut]``, weight 1;
    ``dataset[k]`` equals ``SFTDataset(list(store), sid_tokens, vocab, max_items=..., min_history=...)[k]``.

    ``starts`` (int64 ``[num_users + 1]``, memory-mapped from ``sft_starts_<min_history>.npy`` in the
    store folder): the first example of each user; example ``k``'s user is found by binary search.
    """

    def __init__(self, store, sid_tokens: np.ndarray, vocab: SIDVocab, *, max_items: int = 50,
                 min_history: int = 1):
        self.store = _store(store)
        self.vocab = vocab
        self.sid_tokens = _sid_tokens(self.store, sid_tokens, vocab)
        if max_items < 1 or min_history < 1:
            raise ValueError("max_items and min_history must be >= 1")
        self.max_items, self.min_history = max_items, min_history
        self.starts = _cached_index(self.store.path / f"sft_starts_{min_history}.npy", len(self.store) + 1,
                                    self._write_starts)
        if len(self) == 0:
            raise ValueError("no SFT example: every sequence is shorter than min_history + 1")

    def _write_starts(self, tmp: Path) -> None:
        num_users = len(self.store)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(num_users + 1,))
        out[0] = total = 0
        for s in range(0, num_users, USER_CHUNK):
            counts = np.maximum(self.store.lengths(s, min(s + USER_CHUNK, num_users)) - self.min_history, 0)
            cum = np.cumsum(counts) + total
            out[s + 1:s + 1 + len(cum)] = cum
            total = int(cum[-1])
        out.flush()
        del out

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _cut(self, k: int) -> tuple[int, int]:
        """``(user, cut)`` of example ``k``."""
        n = len(self)
        if not -n <= k < n:
            raise IndexError(f"example {k} is out of range for {n} examples")
        k = int(k) % n
        u = int(np.searchsorted(self.starts, k, side="right")) - 1
        return u, self.min_history + k - int(self.starts[u])

    def num_tokens(self, k: int) -> int:
        """``len(self[k].tokens)`` without reading the items: ``<|bos|> <|hist|>``, the window's SIDs, the
        target's (lets :meth:`~plumrec.sequences.ExampleStream.skip_batch` pack other ranks' batches)."""
        _, c = self._cut(k)
        return 2 + (min(c, self.max_items) + 1) * self.vocab.num_levels

    def __getitem__(self, k: int) -> Example:
        u, c = self._cut(k)
        lo = max(0, c - self.max_items)
        off = int(self.store.offsets[u])
        seq = np.asarray(self.store.items[off + lo:off + c + 1], np.int64)
        hist, target_item = seq[:-1], int(seq[-1])
        prompt = history_tokens(self.vocab, self.sid_tokens, hist)
        target = self.sid_tokens[target_item]
        tokens = np.concatenate([prompt, target])
        weights = np.zeros(len(tokens), np.float32)
        weights[len(prompt):] = 1.0
        items = np.concatenate([token_items(hist, self.vocab.num_levels),
                                np.full(len(target), target_item, np.int64)])
        return Example(tokens, weights, items)


class StoreCPTCorpus:
    """Behaviour-only continued pre-training over an event store: :class:`~plumrec.train.corpus.CPTCorpus`
    with ``behaviour_fraction=1``.

    Example ``i`` draws, with ``np.random.default_rng([seed, i])`` and CPTCorpus's draws, a user among
    those with >= 2 items (``users``, int64, memory-mapped from ``cpt_users.npy`` in the store folder)
    and a window of at most ``max_items`` of its items: ``<|bos|> <|hist|> <sid a> ... <|eos|>``, loss
    on every token but the first. ``size`` (default ``len(users) + num_items``, CPTCorpus's) is the
    nominal number of examples per epoch.
    """

    def __init__(self, store, sid_tokens: np.ndarray, vocab: SIDVocab, *, max_items: int = 50,
                 size: int | None = None, seed: int = 0):
        self.store = _store(store)
        self.vocab = vocab
        self.sid_tokens = _sid_tokens(self.store, sid_tokens, vocab)
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.max_items, self.seed = max_items, seed
        self.users = _cached_index(self.store.path / "cpt_users.npy", None, self._write_users)
        if not len(self.users):
            raise ValueError("no sequence has >= 2 items: nothing to learn from behaviour")
        self.size = size if size is not None else len(self.users) + len(self.sid_tokens)
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")

    def _write_users(self, tmp: Path) -> None:
        """Two passes over the offsets in chunks of users: count the users with >= 2 items, then write them."""
        num_users = len(self.store)

        def chunks():
            for s in range(0, num_users, USER_CHUNK):
                yield np.flatnonzero(self.store.lengths(s, min(s + USER_CHUNK, num_users)) >= 2) + s

        n = sum(len(keep) for keep in chunks())
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(n,))
        at = 0
        for keep in chunks():
            out[at:at + len(keep)] = keep
            at += len(keep)
        out.flush()
        del out

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Example:
        rng = np.random.default_rng([self.seed, int(i)])
        rng.random()  # CPTCorpus's behaviour-or-grounding draw: always behaviour here
        u = int(self.users[int(rng.integers(len(self.users)))])
        lo, hi = int(self.store.offsets[u]), int(self.store.offsets[u + 1])
        n = hi - lo
        start = int(rng.integers(0, n - self.max_items + 1)) if n > self.max_items else 0
        window = np.asarray(self.store.items[lo + start:lo + min(n, start + self.max_items)], np.int64)
        tokens = np.concatenate([history_tokens(self.vocab, self.sid_tokens, window),
                                 [self.vocab.token("<|eos|>")]])
        weights = np.ones(len(tokens), np.float32)
        weights[0] = 0.0
        return Example(tokens, weights)
