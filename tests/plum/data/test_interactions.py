"""Users' item sequences over a dense item index, their checks, item texts and co-occurrence pairs."""
import numpy as np
import pytest

from plumrec.data import InteractionData, cooccurrence_pairs, item_text


def test_interaction_data_validation():
    with pytest.raises(ValueError, match="outside"):
        InteractionData((np.array([0, 3]),), ("u",), ("a", "b"))
    with pytest.raises(TypeError, match="int64"):
        InteractionData((np.array([0, 1], np.int32),), ("u",), ("a", "b"))
    with pytest.raises(ValueError, match="one entry per user"):
        InteractionData((np.array([0]),), ("u", "v"), ("a",))
    with pytest.raises(ValueError, match="items must have one entry per item id, got 1 for 2 item ids"):
        InteractionData((np.array([0]),), ("u",), ("a", "b"), items=({"title": "a"},))


def test_counts_index_and_repr():
    data = InteractionData((np.array([0, 2, 2]), np.array([], np.int64)), ("u", "v"), ("a", "b", "c"))
    assert (data.num_users, data.num_items, data.num_interactions) == (2, 3, 3)
    assert data.item_counts().tolist() == [1, 0, 2] and data.item_counts().dtype == np.int64
    assert InteractionData((), (), ("a",)).item_counts().tolist() == [0]
    assert data.item_index() == {"a": 0, "b": 1, "c": 2}
    assert repr(data) == "InteractionData(users=2, items=3, interactions=3, metadata=False)"


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
    assert item_text({"title": "T", "description": "Long. "}) == "T. Long"
    with_items = InteractionData((np.array([0]),), ("u",), ("a",), items=({"title": "A"},))
    assert with_items.item_texts() == ["A"]
