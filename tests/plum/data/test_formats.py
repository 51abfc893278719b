"""Loaders (LC-Rec JSON pair, S3-Rec text, CSV/TSV/Parquet) on tiny files written to tmp_path (the loaded
data itself: test_interactions.py; splits: test_splits.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from plumrec.data import (
    InteractionData,
    leave_one_out,
    load_dataset,
    load_inter_json,
    load_interaction_table,
    load_item_attributes,
    load_sequences_txt,
)

ITEMS = {
    "1": {"title": "Red &amp; Gold Nail Polish", "categories": [["Beauty", "Nails"], ["Beauty", "Makeup"]]},
    "2": {"title": "BB Cream", "description": "A light cream."},
    "3": {"title": "Shampoo"},
    "10": {"title": "Conditioner"},  # numeric order puts "10" last, not after "1"
}


def _write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def _seqs(data: InteractionData):
    """Sequences as raw item IDs per raw user ID."""
    return {u: [data.item_ids[i] for i in s] for u, s in zip(data.user_ids, data.sequences)}


def test_sequences_txt_with_item_file(tmp_path):
    txt = tmp_path / "Tiny.txt"
    txt.write_text("1 1 2 3 10\n2 3 1 2\n\n3 10 3 1 2 3\n")
    data = load_sequences_txt(txt, _write_json(tmp_path / "Tiny.item.json", ITEMS))
    assert data.item_ids == ("1", "2", "3", "10")  # numeric order: S3-Rec id k -> index k-1 when dense
    assert data.user_ids == ("1", "2", "3")
    assert _seqs(data) == {"1": ["1", "2", "3", "10"], "2": ["3", "1", "2"], "3": ["10", "3", "1", "2", "3"]}
    assert all(s.dtype == np.int64 for s in data.sequences)
    assert data.num_interactions == 12
    assert data.item_counts().tolist() == [3, 3, 4, 2]
    assert data.items[0]["title"] == "Red &amp; Gold Nail Polish"
    texts = data.item_texts()
    assert texts[0] == "Red & Gold Nail Polish. Categories: Beauty, Nails, Makeup"
    assert texts[1] == "BB Cream. A light cream"


def test_sequences_txt_without_item_file_uses_seen_items(tmp_path):
    txt = tmp_path / "x.txt"
    txt.write_text("u1 b a\nu2 c b\n")
    data = load_sequences_txt(txt)
    assert data.item_ids == ("a", "b", "c") and data.items is None
    assert _seqs(data) == {"u1": ["b", "a"], "u2": ["c", "b"]}
    with pytest.raises(ValueError, match="no item metadata"):
        data.item_texts()


def test_inter_json_pair(tmp_path):
    inter = _write_json(tmp_path / "Tiny.inter.json", {"0": [0, 1, 2], "1": [2, 0], "10": [1, 2, 0, 1]})
    items = _write_json(tmp_path / "Tiny.item.json",
                        {str(i): {"title": f"t{i}", "description": f"d{i}"} for i in range(3)})
    data = load_inter_json(inter, items)
    assert data.user_ids == ("0", "1", "10")
    assert [s.tolist() for s in data.sequences] == [[0, 1, 2], [2, 0], [1, 2, 0, 1]]
    assert data.item_texts() == ["t0. d0", "t1. d1", "t2. d2"]
    # load_dataset on the folder finds the pair
    again = load_dataset(tmp_path)
    assert again.item_ids == data.item_ids
    assert [s.tolist() for s in again.sequences] == [s.tolist() for s in data.sequences]


def test_unknown_item_is_an_error(tmp_path):
    inter = _write_json(tmp_path / "a.inter.json", {"0": [0, 7]})
    items = _write_json(tmp_path / "a.item.json", {"0": {"title": "x"}})
    with pytest.raises(ValueError, match="names item '7'"):
        load_inter_json(inter, items)
    txt = tmp_path / "b.txt"
    txt.write_text("1 0 5\n")
    with pytest.raises(ValueError, match="names item '5'"):
        load_sequences_txt(txt, items)


def test_malformed_inputs(tmp_path):
    txt = tmp_path / "bad.txt"
    txt.write_text("1 2 3\nlonely\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        load_sequences_txt(txt)
    dup = tmp_path / "dup.txt"
    dup.write_text("1 2 3\n1 3 4\n")
    with pytest.raises(ValueError, match="more than one line"):
        load_sequences_txt(dup)
    bad_json = _write_json(tmp_path / "c.inter.json", {"0": 3})
    with pytest.raises(ValueError, match="user id -> list"):
        load_inter_json(bad_json)
    many = tmp_path / "many"
    many.mkdir()
    (many / "a.txt").write_text("1 2\n")
    (many / "b.csv").write_text("user,item,timestamp\n")
    with pytest.raises(ValueError, match="exactly one interaction file"):
        load_dataset(many)
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "missing.txt")


def test_item_attributes(tmp_path):
    """S3-Rec's item2attributes: one unit-norm multi-hot row per catalogue item, columns in numeric attribute
    order, a zero row for an item the file does not list; an unknown item or a malformed file is an error."""
    ids = ("1", "2", "3", "10")
    path = _write_json(tmp_path / "T_item2attributes.json", {"10": [7, 3], "1": [3], "2": [12, 7, 3, 40]})
    got = load_item_attributes(path, ids)
    assert got.dtype == np.float32 and got.shape == (4, 4)  # attributes 3, 7, 12, 40
    expect = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]], np.float64)
    expect[[0, 1, 3]] /= np.sqrt([[1], [4], [2]])
    np.testing.assert_allclose(got, expect, rtol=1e-7)
    with pytest.raises(ValueError, match=r"not in the catalogue of 4 items, e.g. '5'"):
        load_item_attributes(_write_json(tmp_path / "u.json", {"1": [3], "5": [3]}), ids)
    for bad in ({"1": 3}, [[3]], {"1": [[3]]}, {"1": [True]}):
        with pytest.raises(ValueError, match="item id -> list of attribute ids"):
            load_item_attributes(_write_json(tmp_path / "b.json", bad), ids)
    with pytest.raises(ValueError, match="lists no attribute"):
        load_item_attributes(_write_json(tmp_path / "e.json", {"1": []}), ids)


def test_csv_table_orders_by_timestamp(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text(
        "user,item,timestamp\n"
        "u2,i3,5\n"
        "u1,i2,20\n"
        "u1,i1,10\n"
        "u2,i1,5\n"  # tie with the row above: file order kept
        "u1,i3,30\n"
        "u2,i2,1\n"
    )
    data = load_interaction_table(csv)
    assert _seqs(data) == {"u1": ["i1", "i2", "i3"], "u2": ["i2", "i3", "i1"]}
    tsv = tmp_path / "log.tsv"
    tsv.write_text("uid\tiid\tts\nu1\tb\t2020-01-02\nu1\ta\t2020-01-01\n")
    data = load_interaction_table(tsv, user_col="uid", item_col="iid", time_col="ts")
    assert _seqs(data) == {"u1": ["a", "b"]}
    with pytest.raises(ValueError, match="missing column"):
        load_interaction_table(csv, time_col="time")


def test_parquet_table(tmp_path):
    path = tmp_path / "log.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")  # any parquet path: the loader must explain what to install
        with pytest.raises(ImportError, match="pip install pyarrow"):
            try:
                import pandas  # noqa: F401
            except ImportError:
                load_interaction_table(path)
            else:
                pytest.skip("pandas without pyarrow: the error comes from pandas' engine")
        return
    pq.write_table(pa.table({"user": ["u1", "u1", "u2"], "item": ["b", "a", "a"], "timestamp": [2, 1, 7]}), path)
    assert _seqs(load_interaction_table(path)) == {"u1": ["a", "b"], "u2": ["a"]}


def test_leave_one_out_on_beauty_layout(tmp_path):
    """Beauty's convention: S3-Rec ids are 1-based, index = id - 1."""
    txt = tmp_path / "Beauty.txt"
    txt.write_text("1 1 2 3 4 5\n2 6 7 8 9 10 4 11\n")
    items = {str(i): {"title": f"item {i}"} for i in range(1, 12)}
    _write_json(tmp_path / "Beauty.item.json", items)
    data = load_dataset(tmp_path)
    assert [int(x) for x in data.item_ids] == list(range(1, 12))
    split = leave_one_out(data)
    assert (split.test.targets + 1).tolist() == [5, 11]
    assert (split.valid.targets + 1).tolist() == [4, 4]


def test_bad_timestamps_name_the_file_row_and_value(tmp_path):
    """Numbers sort as numbers (10 after 5) and ISO dates as dates; one bad value, or a column mixing
    numbers and dates, is an error naming the file, the row, its line and the value."""
    csv = tmp_path / "log.csv"
    csv.write_text("user,item,timestamp\nu1,a,10\nu1,b,5\nu2,a,1e2\nu2,b,-3.5\n")
    assert _seqs(load_interaction_table(csv)) == {"u1": ["b", "a"], "u2": ["b", "a"]}
    csv.write_text("user,item,timestamp\nu1,a,10\nu1,b,5\nu2,a,oops\nu2,b,7\n")
    with pytest.raises(ValueError, match=r"log.csv: row 3 \(line 4\): 'timestamp' value 'oops' is neither a number"):
        load_interaction_table(csv)
    csv.write_text('user,item,timestamp\nu1,a,10\nu1,"b\nc",nan\n')  # a quoted field over two lines
    with pytest.raises(ValueError, match=r"row 2 \(line 4\): 'timestamp' value 'nan'"):
        load_interaction_table(csv)
    tsv = tmp_path / "log.tsv"
    tsv.write_text("u\ti\tts\nx\tb\t2020-01-02T00:00:00Z\nx\ta\t2020-01-01 23:00:00-02:00\nx\tc\t2019-12-31\n")
    assert _seqs(load_interaction_table(tsv, user_col="u", item_col="i", time_col="ts")) == {"x": ["c", "b", "a"]}
    tsv.write_text("u\ti\tts\nx\tb\t2020-01-02\nx\ta\t2020-02-30\n")
    with pytest.raises(ValueError, match=r"log.tsv: row 2 \(line 3\): 'ts' value '2020-02-30' is neither"):
        load_interaction_table(tsv, user_col="u", item_col="i", time_col="ts")
    tsv.write_text("u\ti\tts\nx\tb\t2020-01-02\nx\ta\t17\n")
    with pytest.raises(ValueError, match=r"row 2 \(line 3\): 'ts' value '17' is a number, but row 1's is a date"):
        load_interaction_table(tsv, user_col="u", item_col="i", time_col="ts")
    csv.write_text("user,item,timestamp\nu1,a,10\nu1,b\n")
    with pytest.raises(ValueError, match=r"log.csv:3: row 2 has no 'timestamp' value"):
        load_interaction_table(csv)


def test_undecodable_and_truncated_files_name_the_file_and_line(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_bytes(b"user,item,timestamp\nu1,a,1\nu1,caf\xe9,2\n")
    with pytest.raises(ValueError, match=r"log.csv: line 3: not UTF-8"):
        load_interaction_table(csv)
    txt = tmp_path / "seq.txt"
    txt.write_bytes(b"1 2 3\n2 3 \xff\n")
    with pytest.raises(ValueError, match=r"seq.txt: line 2: not UTF-8"):
        load_sequences_txt(txt)
    inter = tmp_path / "a.inter.json"
    inter.write_text('{"0": [1, 2],\n "1": [2')
    with pytest.raises(ValueError, match=r"a.inter.json: line 2: not valid JSON"):
        load_inter_json(inter)
    inter.write_text('{"0": ["1"]}')
    items = tmp_path / "a.item.json"
    items.write_bytes(b'{"1": {"title": "\xc3"}}')
    with pytest.raises(ValueError, match=r"a.item.json: line 1: not UTF-8"):
        load_dataset(tmp_path)
    attrs = tmp_path / "x_item2attributes.json"
    attrs.write_text('{"1": [1, 2')
    with pytest.raises(ValueError, match=r"x_item2attributes.json: line 1: not valid JSON"):
        load_item_attributes(attrs, ["1"])
