"""plumrec.data.scale: the synthetic catalogue and event log of the scale benchmark, written block by block."""
from __future__ import annotations

import numpy as np
import pytest

from plumrec.data import scale as S
from plumrec.data.events import EventStore, write_event_store


def test_clustered_embeddings_are_their_centres_plus_noise(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "BLOCK_ROWS", 100)  # three blocks, the last partial
    path, labels_path = S.write_clustered_embeddings(tmp_path / "e.npy", 250, dim=8, num_clusters=5, noise=0.1,
                                                     seed=3, progress=False)
    emb, labels = np.load(path, mmap_mode="r"), np.load(labels_path)
    assert emb.shape == (250, 8) and emb.dtype == np.float32 and labels.shape == (250,)
    assert set(np.unique(labels)) == set(range(5))
    centres = np.stack([emb[labels == c].mean(0) for c in range(5)])
    assert (np.linalg.norm(emb - centres[labels], axis=1) < 0.1 * 8).all()  # noise radius ~0.1 * sqrt(8)
    again, _ = S.write_clustered_embeddings(tmp_path / "f.npy", 250, dim=8, num_clusters=5, noise=0.1, seed=3,
                                            progress=False)
    np.testing.assert_array_equal(np.load(again), emb)
    with pytest.raises(ValueError, match="num_items must be an int >= 1"):
        S.write_clustered_embeddings(tmp_path / "g.npy", 0)


def test_synthetic_events_feed_the_event_store(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "BLOCK_ROWS", 200)
    paths = S.write_synthetic_events(tmp_path / "ev", 3000, num_items=97, mean_length=5.0, num_shards=3,
                                     progress=False)
    assert [p.name for p in paths] == [f"events-0000{k}.parquet" for k in range(3)]
    store = EventStore.open(write_event_store(paths, tmp_path / "store", num_items=97, time_col="time",
                                              progress=False))
    assert 3000 <= store.num_events < 3000 + 3 * 200
    lengths = store.lengths(0, len(store))
    assert lengths.min() >= 1 and abs(lengths.mean() - 5.0) < 0.5
    items = np.concatenate([store[u] for u in range(len(store))])
    counts = np.bincount(items, minlength=97)
    assert counts.max() > 5 * np.median(counts)  # a power law: a few popular items
