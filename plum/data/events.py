"""Users' item sequences on disk, for interaction logs that do not fit in memory.

An event store is a folder holding the sequences in CSR form:

- ``items.npy``: every event's item index (the item's row in the catalogue's
  embedding file), users one after another, each in time order; int32 when
  ``num_items < 2**31``, else int64;
- ``offsets.npy``: int64 ``[num_users + 1]``; user ``u``'s items are
  ``items[offsets[u]:offsets[u + 1]]``;
- ``store.json``: ``{"format": "plum.EventStore", "version": 1, "num_users",
  "num_events", "num_items"}``.

:func:`write_event_store` builds one from Parquet shards sorted by user (and
by time within a user) one batch of rows at a time, so its memory is bounded
by the batch size, not by the number of events. :class:`EventStore` memory-maps
the arrays: ``store[u]`` reads one user's items from disk.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from plumrec.io import atomic_dir

__all__ = ["EventStore", "write_event_store"]

FORMAT, VERSION = "plum.EventStore", 1
_COPY_CHUNK = 1 << 22  # offsets copied from the raw file to the .npy this many at a time (32 MB)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading Parquet event logs needs pyarrow: pip install plum-kernels[scale]") from None
    return pa, pq


def _show(v) -> str:
    """A value of a row as the error messages print it (numpy scalars as the Python value)."""
    return repr(v.item() if isinstance(v, np.generic) else v)


class _OrderCheck:
    """Checks, batch by batch, that users never decrease and that time never goes back within a user;
    remembers the last row's user and time across batches and files."""

    def __init__(self):
        self.user = self.time = None
        self.started = False

    def new_users(self, where: str, row0: int, users: np.ndarray, times: np.ndarray | None) -> np.ndarray:
        """The positions in the batch where a new user starts; ``row0`` is the file's row (0-based) of
        the batch's first row."""
        try:
            prev = np.concatenate([np.asarray([self.user if self.started else users[0]], users.dtype), users[:-1]])
            back = np.flatnonzero(np.asarray(users < prev, bool))
            new = np.asarray(users != prev, bool)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: row {row0 + 1}: user values of mixed types cannot be ordered ({e})") from None
        if len(back):
            r = int(back[0])
            raise ValueError(f"{where}: row {row0 + r + 1}: user {_show(users[r])} comes after user {_show(prev[r])}; "
                             "rows must be sorted by user")
        new[0] |= not self.started
        starts = np.flatnonzero(new)
        if times is not None:
            self._check_times(where, row0, times, starts)
            self.time = times[-1]
        self.user, self.started = users[-1], True
        return starts

    def _check_times(self, where: str, row0: int, times: np.ndarray, starts: np.ndarray) -> None:
        same = np.ones(len(times), bool)
        same[starts] = False
        try:
            prev = np.concatenate([np.asarray([times[0] if self.time is None else self.time], times.dtype), times[:-1]])
            back = np.flatnonzero(same & np.asarray(times < prev, bool))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: row {row0 + 1}: time values of mixed types cannot be ordered ({e})") from None
        if len(back):
            r = int(back[0])
            raise ValueError(f"{where}: row {row0 + r + 1}: time {_show(times[r])} is before the user's previous "
                             f"event at {_show(prev[r])}; a user's rows must be in time order")


def _column(pa, batch, name: str, where: str, row0: int) -> np.ndarray:
    col = batch.column(name)
    if col.null_count:
        r = int(np.flatnonzero(np.asarray(col.is_null()))[0])
        raise ValueError(f"{where}: row {row0 + r + 1}: {name!r} is null")
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col.to_numpy(zero_copy_only=False)


def _items(pa, batch, name: str, where: str, row0: int, num_items: int) -> np.ndarray:
    if not pa.types.is_integer(batch.column(name).type):
        raise ValueError(f"{where}: column {name!r} must hold integer item indices, got {batch.column(name).type}")
    items = _column(pa, batch, name, where, row0).astype(np.int64, copy=False)
    bad = np.flatnonzero((items < 0) | (items >= num_items))
    if len(bad):
        r = int(bad[0])
        raise ValueError(f"{where}: row {row0 + r + 1}: item {int(items[r])} is outside [0, num_items={num_items})")
    return items


def _open_files(pq, paths: Sequence[Path], columns: list[str]) -> list:
    files = []
    for p in paths:
        try:
            f = pq.ParquetFile(p)
        except Exception as e:  # pyarrow's own errors: name the file
            raise ValueError(f"{p}: not a readable Parquet file ({e})") from None
        missing = [c for c in columns if c not in f.schema_arrow.names]
        if missing:
            raise ValueError(f"{p}: missing column(s) {missing}; the file has {f.schema_arrow.names}")
        files.append(f)
    return files


def write_event_store(paths, out_dir, *, num_items: int, user_col: str = "user", item_col: str = "item",
                      time_col: str | None = None, batch_rows: int = 1 << 20, progress: bool = True) -> Path:
    """Build the event store ``out_dir`` from the Parquet files ``paths`` (read in the given order).

    Contract: the rows of all files together are sorted by ``user_col`` (non-decreasing ints, or
    strings), and within a user in time order (``time_col``, when given, non-decreasing within a user);
    ``item_col`` holds int item indices in ``[0, num_items)``. A violation, a null, a missing column
    is a ``ValueError`` naming the file and the row (1-based within the file). The store is written in
    a temporary folder beside ``out_dir`` and swapped in (:func:`plumrec.io.atomic_dir`: an existing
    ``out_dir`` is replaced);
    after an error ``out_dir`` is as it was. Memory is bounded by ``batch_rows``. Returns ``out_dir``.
    """
    from tqdm.auto import tqdm

    pa, pq = _pyarrow()
    paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not paths:
        raise ValueError("paths is empty: no Parquet file to read")
    for name, value in (("num_items", num_items), ("batch_rows", batch_rows)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    columns = [user_col, item_col] + ([time_col] if time_col is not None else [])
    files = _open_files(pq, paths, columns)
    total = sum(f.metadata.num_rows for f in files)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        dtype = np.int32 if num_items < 2**31 else np.int64
        items = np.lib.format.open_memmap(tmp / "items.npy", mode="w+", dtype=dtype, shape=(total,))
        check, row, num_users = _OrderCheck(), 0, 0
        with open(tmp / "offsets.raw", "wb") as raw, tqdm(total=total, desc="events", unit="row", unit_scale=True,
                                                           disable=not progress) as bar:
            for path, f in zip(paths, files):
                row0 = 0
                for batch in f.iter_batches(batch_size=batch_rows, columns=columns):
                    n = batch.num_rows
                    if n == 0:
                        continue
                    where = str(path)
                    users = _column(pa, batch, user_col, where, row0)
                    times = None if time_col is None else _column(pa, batch, time_col, where, row0)
                    it = _items(pa, batch, item_col, where, row0, num_items)
                    starts = check.new_users(where, row0, users, times)
                    (starts.astype(np.int64) + row).tofile(raw)
                    items[row:row + n] = it
                    num_users += len(starts)
                    row, row0 = row + n, row0 + n
                    bar.update(n)
            np.asarray([row], np.int64).tofile(raw)
        if row != total:
            raise ValueError(f"{paths}: read {row} rows, the Parquet metadata says {total}")
        items.flush()
        del items
        _raw_to_npy(tmp / "offsets.raw", tmp / "offsets.npy", num_users + 1)
        (tmp / "store.json").write_text(json.dumps({"format": FORMAT, "version": VERSION, "num_users": num_users,
                                                    "num_events": total, "num_items": int(num_items)}))
    return out


def _raw_to_npy(raw: Path, npy: Path, n: int) -> None:
    """Copy ``n`` int64 values of the raw file ``raw`` into the ``.npy`` file ``npy`` in chunks; remove ``raw``."""
    src = np.memmap(raw, dtype=np.int64, mode="r", shape=(n,))
    dst = np.lib.format.open_memmap(npy, mode="w+", dtype=np.int64, shape=(n,))
    for s in range(0, n, _COPY_CHUNK):
        dst[s:s + _COPY_CHUNK] = src[s:s + _COPY_CHUNK]
    dst.flush()
    del src, dst
    raw.unlink()


class EventStore(Sequence):
    """The users' item sequences of an event store folder, memory-mapped (see the module docstring).

    ``len(store)`` is the number of users; ``store[u]`` is a copy of user ``u``'s items (int64
    ``[n_u]``, in time order); ``store.lengths(start, stop)`` the users' sequence lengths (int64).
    """

    def __init__(self, path: Path, items: np.ndarray, offsets: np.ndarray, num_items: int):
        self.path, self.items, self.offsets, self.num_items = Path(path), items, offsets, int(num_items)

    @classmethod
    def open(cls, path) -> "EventStore":
        """Open the store folder ``path``; a missing or malformed folder is a ``ValueError`` naming it."""
        path = Path(path)
        try:
            meta = json.loads((path / "store.json").read_text())
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}")
            items = np.load(path / "items.npy", mmap_mode="r")
            offsets = np.load(path / "offsets.npy", mmap_mode="r")
            nu, ne = int(meta["num_users"]), int(meta["num_events"])
            if items.shape != (ne,) or offsets.shape != (nu + 1,) or offsets.dtype != np.int64 \
                    or items.dtype.kind not in "iu":
                raise ValueError(f"items {items.dtype} {items.shape} and offsets {offsets.dtype} {offsets.shape} "
                                 f"do not match {nu} users and {ne} events")
            if int(offsets[0]) != 0 or int(offsets[-1]) != ne:
                raise ValueError(f"offsets run from {int(offsets[0])} to {int(offsets[-1])}, not 0 to {ne}")
            return cls(path, items, offsets, int(meta["num_items"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not an event store written by write_event_store ({e})") from None

    @property
    def num_events(self) -> int:
        return int(self.items.shape[0])

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def __getitem__(self, u):
        if not isinstance(u, (int, np.integer)) or isinstance(u, bool):
            raise TypeError(f"an EventStore is indexed by one user (an int), got {type(u).__name__}")
        n = len(self)
        if not -n <= u < n:
            raise IndexError(f"user {u} is out of range for {n} users")
        u = int(u) % n
        lo, hi = int(self.offsets[u]), int(self.offsets[u + 1])
        return np.array(self.items[lo:hi], np.int64)

    def lengths(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """int64 ``[stop - start]``: the number of items of users ``start .. stop - 1``."""
        stop = len(self) if stop is None else stop
        return np.diff(np.asarray(self.offsets[start:stop + 1], np.int64))
