"""The on-disk event store: Parquet shards -> CSR arrays, the sort contract's errors, atomic writes."""
import json

import numpy as np
import pytest

from plumrec.data import EventStore, write_event_store

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _shards(tmp_path, rows, cuts, **cols):
    """Write ``rows`` (tuples of the ``cols`` names) as Parquet files cut at the row indices ``cuts``."""
    names = list(cols)
    paths, bounds = [], [0, *cuts, len(rows)]
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = rows[a:b]
        table = pa.table({n: pa.array([r[i] for r in part], type=cols[n]) for i, n in enumerate(names)})
        path = tmp_path / f"part-{k}.parquet"
        pq.write_table(table, path, row_group_size=3)
        paths.append(path)
    return paths


def _log(seqs, users):
    """Rows (user, item, time) of the sequences, users in the given (sorted) order, times increasing."""
    return [(u, int(i), 100 * k + t) for k, (u, s) in enumerate(zip(users, seqs)) for t, i in enumerate(s)]


SEQS = [[3, 1, 4, 1, 5], [9], [2, 6, 5, 3, 5, 8, 9, 7], [0, 0], [4, 6]]


@pytest.mark.parametrize("users,utype", [([2, 5, 7, 8, 40], pa.int64()), (["a", "ab", "b", "ba", "c"], pa.string())])
def test_store_holds_the_sequences_across_files_and_batches(tmp_path, users, utype):
    rows = _log(SEQS, users)
    paths = _shards(tmp_path, rows, [4, 11], user=utype, item=pa.int32(), time=pa.int64())  # users span the cuts
    out = write_event_store(paths, tmp_path / "store", num_items=10, time_col="time", batch_rows=3, progress=False)
    store = EventStore.open(out)
    assert len(store) == len(SEQS) and store.num_events == len(rows) and store.num_items == 10
    assert [s.tolist() for s in store] == SEQS
    assert all(s.dtype == np.int64 for s in store)
    assert store[-1].tolist() == SEQS[-1]
    assert store.lengths().tolist() == [len(s) for s in SEQS] and store.lengths(1, 3).tolist() == [1, 8]
    assert store.items.dtype == np.int32 and store.offsets.tolist() == [0, 5, 6, 14, 16, 18]
    meta = json.loads((out / "store.json").read_text())
    assert meta == {"format": "plum.EventStore", "version": 1, "num_users": 5, "num_events": 18, "num_items": 10}
    assert sorted(p.name for p in out.iterdir()) == ["items.npy", "offsets.npy", "store.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(IndexError):
        store[5]


def test_rewriting_replaces_the_store(tmp_path):
    paths = _shards(tmp_path, _log(SEQS, range(5)), [], user=pa.int64(), item=pa.int64())
    write_event_store(paths, tmp_path / "s", num_items=10, progress=False)
    (tmp_path / "s" / "stale.npy").write_bytes(b"x")
    paths = _shards(tmp_path, _log([[1, 2]], [0]), [], user=pa.int64(), item=pa.int64())
    out = write_event_store(paths, tmp_path / "s", num_items=10, progress=False)
    assert [s.tolist() for s in EventStore.open(out)] == [[1, 2]] and not (out / "stale.npy").exists()


@pytest.mark.parametrize("mutate,match", [
    (lambda r: r.__setitem__(6, (0, 2, 600)), r"part-1.parquet: row 3: user 0 comes after user 1"),
    (lambda r: r.__setitem__(3, (0, 1, 1)), r"part-0.parquet: row 4: time 1 is before the user's previous event at 2"),
    (lambda r: r.__setitem__(8, (2, 10, 202)), r"part-1.parquet: row 5: item 10 is outside \[0, num_items=10\)"),
    (lambda r: r.__setitem__(4, (1, 9, 0)), r"part-1.parquet: row 1: user 1 comes after user 2"),
])
def test_contract_violations_name_the_file_and_row_and_leave_nothing(tmp_path, mutate, match):
    rows = _log(SEQS, range(5))
    mutate(rows)
    if match.endswith("user 2"):  # user 2 ends part-0: part-1 starting with user 1 goes back across files
        rows[:4] = [(2, 1, 0)] * 4
    paths = _shards(tmp_path, rows, [4], user=pa.int64(), item=pa.int64(), time=pa.int64())
    with pytest.raises(ValueError, match=match):
        write_event_store(paths, tmp_path / "store", num_items=10, time_col="time", batch_rows=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-0.parquet", "part-1.parquet"]


def test_time_may_repeat_and_restart_with_a_new_user(tmp_path):
    rows = [(0, 1, 5), (0, 2, 5), (1, 3, 0), (1, 4, 7)]
    paths = _shards(tmp_path, rows, [2], user=pa.int64(), item=pa.int64(), time=pa.int64())
    out = write_event_store(paths, tmp_path / "s", num_items=5, time_col="time", batch_rows=1, progress=False)
    assert [s.tolist() for s in EventStore.open(out)] == [[1, 2], [3, 4]]


def test_bad_columns_and_arguments(tmp_path):
    paths = _shards(tmp_path, [(0, 1.5)], [], user=pa.int64(), item=pa.float64())
    with pytest.raises(ValueError, match=r"part-0.parquet: column 'item' must hold integer item indices"):
        write_event_store(paths, tmp_path / "s", num_items=5, progress=False)
    with pytest.raises(ValueError, match=r"part-0.parquet: missing column\(s\) \['when'\]"):
        write_event_store(paths, tmp_path / "s", num_items=5, time_col="when", progress=False)
    paths = _shards(tmp_path, [(0, None)], [], user=pa.int64(), item=pa.int64())
    with pytest.raises(ValueError, match=r"part-0.parquet: row 1: 'item' is null"):
        write_event_store(paths, tmp_path / "s", num_items=5, progress=False)
    with pytest.raises(ValueError, match="num_items must be an int >= 1, got 0"):
        write_event_store(paths, tmp_path / "s", num_items=0, progress=False)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="junk.parquet: not a readable Parquet file"):
        write_event_store([tmp_path / "junk.parquet"], tmp_path / "s", num_items=5, progress=False)
    assert not (tmp_path / "s").exists()


def test_open_refuses_a_folder_that_is_not_a_store(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere: not an event store"):
        EventStore.open(tmp_path / "nowhere")
    paths = _shards(tmp_path, _log(SEQS, range(5)), [], user=pa.int64(), item=pa.int64())
    out = write_event_store(paths, tmp_path / "s", num_items=10, progress=False)
    np.save(out / "offsets.npy", np.array([0, 3], np.int64))
    with pytest.raises(ValueError, match=r"s: not an event store .*do not match 5 users"):
        EventStore.open(out)
