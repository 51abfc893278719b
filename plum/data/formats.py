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
  pandas) with user, item and timestamp columns (:func:`load_interaction_table`);
  timestamps are numbers or ISO 8601 dates.

:func:`load_dataset` picks the loader from a file or folder. The item
catalogue is the item file's keys when one is given (then an interaction with
an item missing from it is an error), otherwise the items seen in the
interactions. Items are indexed in numeric order when every raw ID is an
integer (so S3-Rec's 1-based IDs map to ``id - 1``), else in string order.
Every parse error is a ``ValueError`` naming the file and the line (or row).
"""
from __future__ import annotations

import csv
import datetime
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from plumrec.data.interactions import InteractionData
from plumrec.io import read_json, read_text

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
    raw = read_json(path)
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
    raw = read_json(path)
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
    raw = read_json(inter_path)
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
    for lineno, line in enumerate(io.StringIO(read_text(path), newline=None), 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) < 2:
            raise ValueError(f"{path}:{lineno}: expected 'user item [item ...]', got {line.strip()!r}")
        user_seqs.append((tokens[0], tokens[1:]))
    items = load_items_json(item_path) if item_path is not None else None
    return _build(user_seqs, items, str(path))


def _read_parquet(path: Path, columns: Sequence[str]) -> dict[str, list]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    try:
        if pq is not None:
            table = pq.read_table(path, columns=list(columns))
            return {c: table.column(c).to_pylist() for c in columns}
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                f"reading {path.name} needs pyarrow (or pandas with a parquet engine): "
                "pip install pyarrow"
            ) from None
        frame = pd.read_parquet(path, columns=list(columns))
        return {c: frame[c].tolist() for c in columns}
    except ImportError:
        raise
    except Exception as e:  # pyarrow's and pandas' own errors: name the file
        raise ValueError(f"{path}: not a readable Parquet file with columns {list(columns)} ({e})") from None


def _read_csv(path: Path, columns: Sequence[str], delimiter: str) -> tuple[dict[str, list], list[int]]:
    """The ``columns`` of a CSV/TSV file, and the line of each row (its last line when a field spans several)."""
    out: dict[str, list] = {c: [] for c in columns}
    lines: list[int] = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; header is {reader.fieldnames}")
            for row in reader:
                for c in columns:
                    if row[c] is None:
                        raise ValueError(f"{path}:{reader.line_num}: row {len(lines) + 1} has no {c!r} value "
                                         f"(fewer fields than the header's {len(reader.fieldnames)})")
                    out[c].append(row[c])
                lines.append(reader.line_num)
    except UnicodeDecodeError:
        read_text(path)  # raises the ValueError that names the line
        raise
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    return out, lines


def _read_table(path: Path, columns: Sequence[str], delimiter: str | None) -> tuple[dict[str, list], list[int]]:
    """The ``columns`` of a table file, and the line of each row (none for Parquet)."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path, columns), []
    if delimiter is None:
        delimiter = "\t" if suffix in (".tsv", ".tab") else ","
    return _read_csv(path, columns, delimiter)


def _epoch(d: datetime.datetime) -> float:
    """Seconds since the epoch; a date without an offset is taken as UTC."""
    return (d if d.tzinfo is not None else d.replace(tzinfo=datetime.timezone.utc)).timestamp()


def _time_value(v) -> tuple[str, float] | None:
    """``(kind, sort key)`` of one timestamp: a ``"number"``, or an ISO 8601 ``"date"`` (seconds since the
    epoch); ``None`` when it is neither (or not finite)."""
    try:
        if isinstance(v, datetime.datetime):  # Parquet timestamps (pandas' Timestamp too)
            return "date", _epoch(v)
        if isinstance(v, datetime.date):
            return "date", _epoch(datetime.datetime(v.year, v.month, v.day))
    except (ValueError, OverflowError, OSError):  # NaT, out of range
        return None
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return "number", int(v)
    if isinstance(v, (float, np.floating)):
        return ("number", float(v)) if math.isfinite(v) else None
    if not isinstance(v, str) or not v.strip():
        return None
    s = v.strip()
    try:
        return "number", int(s)
    except ValueError:
        pass
    try:
        x = float(s)
        return ("number", x) if math.isfinite(x) else None
    except ValueError:
        pass
    try:
        return "date", _epoch(datetime.datetime.fromisoformat(s[:-1] + "+00:00" if s[-1] in "Zz" else s))
    except (ValueError, OverflowError, OSError):
        return None


def _parse_times(path: Path, col: str, values: Sequence, lines: Sequence[int]) -> list[float]:
    """Sort keys of a timestamp column: every value a number, or every value an ISO 8601 date. A value that
    is neither, or of the other kind than the first row's, is a ``ValueError`` naming the row and line."""
    keys: list[float] = []
    first = None
    for r, v in enumerate(values):
        parsed = _time_value(v)
        where = f"{path}: row {r + 1}" + (f" (line {lines[r]})" if lines else "")
        if parsed is None:
            raise ValueError(f"{where}: {col!r} value {v!r} is neither a number nor an ISO 8601 date")
        if first is None:
            first = parsed[0]
        elif parsed[0] != first:
            raise ValueError(f"{where}: {col!r} value {v!r} is a {parsed[0]}, but row 1's is a {first}; "
                             "a timestamp column holds numbers or dates, not both")
        keys.append(parsed[1])
    return keys


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

    Rows are grouped by user and ordered by ``time_col``: numbers (Unix
    times, step counts) or ISO 8601 dates (``2020-01-05``,
    ``2020-01-05T10:00:00+02:00``; without an offset, UTC), one kind per
    column; rows with equal timestamps keep their file order.
    ``time_col=None`` keeps file order.

    Raises:
        ValueError: naming the file and the row (and line): a timestamp that is
            neither a number nor a date, a row with missing fields, a missing
            column, bytes that are not UTF-8.
    """
    path = Path(path)
    cols = [user_col, item_col] + ([time_col] if time_col else [])
    table, lines = _read_table(path, cols, delimiter)
    users = [str(u) for u in table[user_col]]
    items = [str(i) for i in table[item_col]]
    times = _parse_times(path, time_col, table[time_col], lines) if time_col else list(range(len(users)))
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
