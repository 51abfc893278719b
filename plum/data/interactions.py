"""The in-memory form of a recommendation dataset.

Every loader in :mod:`plumrec.data.formats` and the synthetic catalogue return an
:class:`InteractionData`: per-user item sequences in time order over a dense
item index ``0 .. num_items - 1``, the raw user and item IDs of the source
files, and optional per-item metadata (title, description, categories, ...).

Item index ``i`` is the row of item ``i`` in every per-item array of the
package: content embeddings, Semantic IDs ``codes[i]``, trie leaves.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["InteractionData", "cooccurrence_pairs", "item_text"]


@dataclass(frozen=True)
class InteractionData:
    """Users' item sequences over a dense item index.

    Attributes:
        sequences: one int64 array per user, item indices in time order
            (oldest first). Every index is in ``[0, num_items)``.
        user_ids: raw user ID of each sequence, as in the source file.
        item_ids: raw item ID of each item index (``item_ids[i]`` is item ``i``).
        items: optional metadata per item index (dicts with keys such as
            ``"title"``, ``"description"``, ``"categories"``); ``None`` when
            the source had no item file.
    """

    sequences: tuple[np.ndarray, ...]
    user_ids: tuple[str, ...]
    item_ids: tuple[str, ...]
    items: tuple[Mapping, ...] | None = None

    def __post_init__(self):
        if len(self.sequences) != len(self.user_ids):
            raise ValueError(
                f"sequences and user_ids must have one entry per user, got "
                f"{len(self.sequences)} and {len(self.user_ids)}"
            )
        if self.items is not None and len(self.items) != len(self.item_ids):
            raise ValueError(
                f"items must have one entry per item id, got {len(self.items)} "
                f"for {len(self.item_ids)} item ids"
            )
        n = len(self.item_ids)
        for u, seq in enumerate(self.sequences):
            if seq.ndim != 1 or seq.dtype != np.int64:
                raise TypeError(f"sequences[{u}] must be a 1-D int64 array, got {seq.dtype} {seq.shape}")
            if seq.size and (seq.min() < 0 or seq.max() >= n):
                raise ValueError(
                    f"sequences[{u}] (user {self.user_ids[u]!r}) names item index "
                    f"{int(seq.max() if seq.max() >= n else seq.min())} outside [0, {n})"
                )

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def item_index(self) -> dict[str, int]:
        """Raw item ID -> dense item index."""
        return {raw: i for i, raw in enumerate(self.item_ids)}

    def item_counts(self) -> np.ndarray:
        """Number of interactions of each item, ``[num_items]`` int64."""
        if not self.sequences:
            return np.zeros(self.num_items, np.int64)
        return np.bincount(np.concatenate(self.sequences), minlength=self.num_items).astype(np.int64)

    def item_texts(self, fields: Sequence[str] = ("title", "description", "categories")) -> list[str]:
        """One text per item for the text encoder (see :func:`item_text`)."""
        if self.items is None:
            raise ValueError("this dataset has no item metadata (items is None); load it with an item file")
        return [item_text(meta, fields) for meta in self.items]

    def __repr__(self) -> str:  # the default would print every array
        return (
            f"InteractionData(users={self.num_users}, items={self.num_items}, "
            f"interactions={self.num_interactions}, metadata={self.items is not None})"
        )


def item_text(meta: Mapping, fields: Sequence[str] = ("title", "description", "categories")) -> str:
    """Render one item's metadata as text: ``"title. description. Categories: a, b"``.

    HTML entities (Amazon titles carry ``&amp;``) are decoded; ``categories``
    may be a list of strings or a list of category paths (lists of strings),
    whose distinct names are kept in order of appearance. Missing or empty
    fields are skipped.
    """
    parts = []
    for field in fields:
        value = meta.get(field)
        if value is None or value == "" or value == []:
            continue
        if field == "categories":
            names: list[str] = []
            for entry in value:
                for name in [entry] if isinstance(entry, str) else entry:
                    if name not in names:
                        names.append(name)
            parts.append("Categories: " + ", ".join(html.unescape(n) for n in names))
        else:
            parts.append(html.unescape(str(value)).strip())
    return ". ".join(p.rstrip(".") for p in parts if p)


def cooccurrence_pairs(
    sequences: Iterable[np.ndarray], num_items: int, *, window: int = 1
) -> np.ndarray:
    """Pairs of items engaged together: ``[P, 2]`` int64.

    For every sequence, each item is paired with the next ``window`` items
    after it (``window=1``: consecutive items). Self pairs (the same item
    twice in a row) are dropped; repeated pairs are kept, so a pair's
    multiplicity is its weight. This is the ``cooccurrence`` input of
    :meth:`plumrec.sid.SemanticIdTokenizer.fit` and of the quality report.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    chunks = []
    for u, seq in enumerate(sequences):
        seq = np.asarray(seq, np.int64)
        if seq.size and (seq.min() < 0 or seq.max() >= num_items):
            raise ValueError(f"sequences[{u}] names an item outside [0, {num_items})")
        for w in range(1, window + 1):
            if seq.size > w:
                chunks.append(np.stack([seq[:-w], seq[w:]], axis=1))
    if not chunks:
        return np.zeros((0, 2), np.int64)
    pairs = np.concatenate(chunks)
    return pairs[pairs[:, 0] != pairs[:, 1]]
