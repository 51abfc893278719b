"""Loaders for the public sequential-recommendation formats.

- LC-Rec / LETTER JSON pair: ``<name>.inter.json`` maps user -> list of items
  in time order; ``<name>.item.json`` maps item -> ``{"title", "description",
  ...}`` (:func:`load_inter_json`).
- S3-Rec / SASRec text: one user per line, ``user item item ...`` in time
  order (:func:`load_sequences_txt`), optionally with an item JSON beside it
  (Amazon Beauty ships ``Beauty.txt`` + ``Beauty.item.json``).
- S3-Rec item attributes: ``<name>_item2attributes.json`` maps item -> list of
  attribute IDs (brand, sub-categories), read as a multi-hot SID input
  (:func:`load_item_attributes`).
- Interaction tables: CSV/TSV (standard library) or Parquet (needs pyarrow or
  pandas) with user, item and timestamp columns (:func:`load_interaction_table`).

:func:`load_dataset` picks the loader from a file or folder. The item
catalogue is the item file's keys when one is given (then an interaction with
an item missing from it is an error), otherwise the items seen in the
interactions. Items are indexed in numeric order when every raw ID is an
integer (so S3-Rec's 1-based IDs map to ``id - 1``), else in string order.
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from plum.data.interactions import InteractionData

__all__ = [
    "load_dataset",
    "load_inter_json",
    "load_item_attributes",
    "load_items_json",
    "load_sequences_txt",
    "load_interaction_table",
]


def _sort_ids(ids) -> list[str]:
    ids = list(ids)
    if all(_is_int(x) for x in ids):
        return sorted(ids, key=int)
    return sorted(ids)


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def _build(
    user_seqs: Sequence[tuple[str, Sequence[str]]],
    items: Mapping[str, Mapping] | None,
    source: str,
) -> InteractionData:
    """Raw (user, [item, ...]) lists + optional item metadata -> InteractionData."""
    if items is not None:
        item_ids = _sort_ids(items)
    else:
        item_ids = _sort_ids({i for _, seq in user_seqs for i in seq})
    index = {raw: i for i, raw in enumerate(item_ids)}
    sequences, user_ids = [], []
    for user, seq in user_seqs:
        try:
            sequences.append(np.fromiter((index[i] for i in seq), np.int64, count=len(seq)))
        except KeyError as err:
            raise ValueError(
                f"{source}: user {user!r} names item {err.args[0]!r}, which is not in the item file"
            ) from None
        user_ids.append(str(user))
    if len(set(user_ids)) != len(user_ids):
        raise ValueError(f"{source}: a user appears on more than one line")
    meta = tuple(dict(items[i]) for i in item_ids) if items is not None else None
    return InteractionData(tuple(sequences), tuple(user_ids), tuple(item_ids), meta)


def load_items_json(path: str | Path) -> dict[str, dict]:
    """Item metadata JSON: ``{item_id: {"title": ..., ...}}`` -> dict keyed by str ID."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ValueError(f"{path}: expected a JSON object mapping item id -> object of fields")
    return {str(k): v for k, v in raw.items()}


def load_item_attributes(path: str | Path, item_ids: Sequence[str]) -> np.ndarray:
    """Item attributes as SID input: S3-Rec's ``*_item2attributes.json`` -> ``[num_items, A]`` float32.

    The file maps raw item ID -> list of attribute IDs (``{"12": [4, 17, 30]}``; on S3-Rec's
    Beauty the first is the brand, the rest sub-categories, 637 in all). Row ``i`` is the
    multi-hot vector of item ``item_ids[i]``'s attributes over the ``A`` distinct attribute IDs
    of the file (sorted), scaled to unit L2 norm, so an item with many attributes does not
    weigh more in the SID tokenizer's standardised input; an item the file does not list gets a
    zero row. Pass :attr:`InteractionData.item_ids` as ``item_ids``.

    Raises:
        ValueError: the file is not such a mapping, names an item outside ``item_ids``, or
            lists no attribute at all.
    """
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict) or not all(
        isinstance(v, list) and all(isinstance(a, (int, str)) and not isinstance(a, bool) for a in v)
        for v in raw.values()
    ):
        raise ValueError(f"{path}: expected a JSON object mapping item id -> list of attribute ids")
    index = {str(i): n for n, i in enumerate(item_ids)}
    unknown = [k for k in raw if str(k) not in index]
    if unknown:
        raise ValueError(f"{path}: names {len(unknown)} item(s) that are not in the catalogue of "
                         f"{len(index)} items, e.g. {unknown[0]!r}")
    names = _sort_ids({str(a) for v in raw.values() for a in v})
    if not names:
        raise ValueError(f"{path}: lists no attribute")
    col = {a: j for j, a in enumerate(names)}
    out = np.zeros((len(index), len(names)), np.float32)
    for k, v in raw.items():
        out[index[str(k)], [col[str(a)] for a in v]] = 1.0
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norm, out=out, where=norm > 0)


def load_inter_json(inter_path: str | Path, item_path: str | Path | None = None) -> InteractionData:
    """LC-Rec / LETTER pair: ``*.inter.json`` (user -> items in time order) and
    an optional ``*.item.json`` (item -> metadata)."""
    with open(inter_path, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise ValueError(f"{inter_path}: expected a JSON object mapping user id -> list of item ids")
    users = _sort_ids(str(u) for u in raw)
    by_user = {str(u): v for u, v in raw.items()}
    user_seqs = [(u, [str(i) for i in by_user[u]]) for u in users]
    items = load_items_json(item_path) if item_path is not None else None
    return _build(user_seqs, items, str(inter_path))


def load_sequences_txt(path: str | Path, item_path: str | Path | None = None) -> InteractionData:
    """S3-Rec / SASRec text: ``user item item ...`` per line, time order.

    Blank lines are skipped; a line with a user and no item is an error.
    """
    user_seqs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) < 2:
                raise ValueError(f"{path}:{lineno}: expected 'user item [item ...]', got {line.strip()!r}")
            user_seqs.append((tokens[0], tokens[1:]))
    items = load_items_json(item_path) if item_path is not None else None
    return _build(user_seqs, items, str(path))


def _read_table(path: Path, columns: Sequence[str], delimiter: str | None) -> dict[str, list]:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(path, columns=list(columns))
            return {c: table.column(c).to_pylist() for c in columns}
        except ImportError:
            pass
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                f"reading {path.name} needs pyarrow (or pandas with a parquet engine): "
                "pip install pyarrow"
            ) from None
        frame = pd.read_parquet(path, columns=list(columns))
        return {c: frame[c].tolist() for c in columns}
    if delimiter is None:
        delimiter = "\t" if suffix in (".tsv", ".tab") else ","
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {reader.fieldnames}")
        out: dict[str, list] = {c: [] for c in columns}
        for row in reader:
            for c in columns:
                out[c].append(row[c])
    return out


def load_interaction_table(
    path: str | Path,
    *,
    user_col: str = "user",
    item_col: str = "item",
    time_col: str | None = "timestamp",
    item_path: str | Path | None = None,
    delimiter: str | None = None,
) -> InteractionData:
    """CSV / TSV / Parquet with one interaction per row.

    Rows are grouped by user and ordered by ``time_col`` (numeric when every
    value parses as a number, else as strings such as ISO dates); rows with
    equal timestamps keep their file order. ``time_col=None`` keeps file order.
    """
    path = Path(path)
    cols = [user_col, item_col] + ([time_col] if time_col else [])
    table = _read_table(path, cols, delimiter)
    users = [str(u) for u in table[user_col]]
    items = [str(i) for i in table[item_col]]
    if time_col:
        raw_t = table[time_col]
        try:
            times = [float(t) for t in raw_t]
        except (TypeError, ValueError):
            times = [str(t) for t in raw_t]
    else:
        times = list(range(len(users)))
    rows = defaultdict(list)
    for pos, (u, i, t) in enumerate(zip(users, items, times)):
        rows[u].append((t, pos, i))
    user_seqs = [(u, [i for _, _, i in sorted(rows[u])]) for u in _sort_ids(rows)]
    meta = load_items_json(item_path) if item_path is not None else None
    return _build(user_seqs, meta, str(path))


def load_dataset(path: str | Path, *, item_path: str | Path | None = None) -> InteractionData:
    """Load a dataset from a file or a folder, picking the format.

    A folder must hold exactly one interaction file: ``*.inter.json``, or a
    ``*.txt`` sequence file (``*.csv``, ``*.tsv`` and ``*.parquet`` tables are
    accepted too). The item file beside it, ``<name>.item.json``, is used when
    present. A file is read by its suffix.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.inter.json"))
        if not found:
            found = sorted(
                p for ext in ("*.txt", "*.csv", "*.tsv", "*.parquet") for p in path.glob(ext)
            )
        if len(found) != 1:
            raise ValueError(
                f"{path}: expected exactly one interaction file (*.inter.json, *.txt, *.csv, "
                f"*.tsv, *.parquet), found {[p.name for p in found]}; pass the file itself"
            )
        inter = found[0]
        stem = inter.name[: -len(".inter.json")] if inter.name.endswith(".inter.json") else inter.stem
        if item_path is None and (path / f"{stem}.item.json").exists():
            item_path = path / f"{stem}.item.json"
        path = inter
    if not path.exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    name = path.name.lower()
    if name.endswith(".inter.json"):
        return load_inter_json(path, item_path)
    if name.endswith(".txt"):
        return load_sequences_txt(path, item_path)
    if path.suffix.lower() in (".csv", ".tsv", ".tab", ".parquet", ".pq"):
        return load_interaction_table(path, item_path=item_path)
    raise ValueError(f"{path}: unknown format (expected .inter.json, .txt, .csv, .tsv or .parquet)")
