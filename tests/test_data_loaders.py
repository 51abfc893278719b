"""Loaders (LC-Rec JSON pair, S3-Rec text, CSV/TSV/Parquet), leave-one-out
splits and co-occurrence pairs, on tiny files written to tmp_path."""
from __future__ import annotations

import json

import numpy as np
import pytest

from plum.data import (
    InteractionData,
    cooccurrence_pairs,
    item_text,
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
    items = _write_json(tmp_path / "Tiny.item.json", {str(i): {"title": f"t{i}", "description": f"d{i}"} for i in range(3)})
    data = load_inter_json(inter, items)
    assert data.user_ids == ("0", "1", "10")
    assert [s.tolist() for s in data.sequences] == [[0, 1, 2], [2, 0], [1, 2, 0, 1]]
    assert data.item_texts() == ["t0. d0", "t1. d1", "t2. d2"]
    # load_dataset on the folder finds the pair
    again = load_dataset(tmp_path)
    assert again.item_ids == data.item_ids and [s.tolist() for s in again.sequences] == [s.tolist() for s in data.sequences]


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


def test_leave_one_out():
    seqs = (np.array([0, 1, 2, 3, 4]), np.array([5, 6, 7]), np.array([2, 4]))
    data = InteractionData(seqs, ("a", "b", "c"), tuple(str(i) for i in range(8)))
    split = leave_one_out(data)
    assert [s.tolist() for s in split.train] == [[0, 1, 2], [5], [2, 4]]  # short user: all training
    assert split.test.users.tolist() == split.valid.users.tolist() == [0, 1]
    assert split.valid.targets.tolist() == [3, 6]
    assert [h.tolist() for h in split.valid.histories] == [[0, 1, 2], [5]]
    assert split.test.targets.tolist() == [4, 7]
    assert [h.tolist() for h in split.test.histories] == [[0, 1, 2, 3], [5, 6]]
    # no target ever leaks into its own history or into training
    for u, h, t in zip(split.test.users, split.test.histories, split.test.targets):
        assert len(h) == len(seqs[u]) - 1 and seqs[u][-1] == t
    with pytest.raises(ValueError, match="min_length"):
        leave_one_out(data, min_length=2)


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


def test_interaction_data_validation():
    with pytest.raises(ValueError, match="outside"):
        InteractionData((np.array([0, 3]),), ("u",), ("a", "b"))
    with pytest.raises(TypeError, match="int64"):
        InteractionData((np.array([0, 1], np.int32),), ("u",), ("a", "b"))
    with pytest.raises(ValueError, match="one entry per user"):
        InteractionData((np.array([0]),), ("u", "v"), ("a",))


def test_cooccurrence_pairs():
    seqs = [np.array([0, 1, 1, 2]), np.array([3])]
    assert cooccurrence_pairs(seqs, 4).tolist() == [[0, 1], [1, 2]]  # the (1, 1) repeat is dropped
    assert sorted(map(tuple, cooccurrence_pairs(seqs, 4, window=2).tolist())) == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert cooccurrence_pairs([np.array([5])], 6).shape == (0, 2)
    with pytest.raises(ValueError, match="outside"):
        cooccurrence_pairs([np.array([0, 9])], 4)
    with pytest.raises(ValueError, match="window"):
        cooccurrence_pairs(seqs, 4, window=0)


def test_item_text_fields():
    meta = {"title": "A &lt;b&gt;", "description": "", "categories": ["x", "y", "x"]}
    assert item_text(meta) == "A <b>. Categories: x, y"
    assert item_text(meta, fields=("title",)) == "A <b>"
