"""Datasets over an on-disk event store: the in-memory datasets' examples, streamed and resumed exactly."""
import numpy as np
import pytest
import torch
from tiny_training import tiny_lm_and_data as _setup
from tiny_training import tiny_train_config as _cfg

import plumrec.sequences as sequences
from plumrec.data import EventStore, write_event_store
from plumrec.model import SIDVocab
from plumrec.sequences import ExampleStream
from plumrec.train import CPTCorpus, SFTDataset, StoreCPTCorpus, StoreSFTDataset, train

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _store(path, seqs, num_items, shards=3):
    """An event store of ``seqs`` (users 0..), written through ``shards`` Parquet files."""
    users = np.concatenate([np.full(len(s), u, np.int64) for u, s in enumerate(seqs)])
    items = np.concatenate([np.asarray(s, np.int64) for s in seqs])
    path.mkdir(parents=True, exist_ok=True)
    files = []
    for k, idx in enumerate(np.array_split(np.arange(len(users)), shards)):
        files.append(path / f"events-{k}.parquet")
        pq.write_table(pa.table({"user": users[idx], "item": items[idx]}), files[-1])
    return EventStore.open(write_event_store(files, path / "store", num_items=num_items, batch_rows=5,
                                             progress=False))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    rng = np.random.default_rng(0)
    sizes = (8, 4)
    vocab = SIDVocab(0, sizes)
    sid = vocab.sid_to_tokens(np.stack([rng.integers(0, v, 30) for v in sizes], 1))
    seqs = [rng.integers(0, 30, n).astype(np.int64) for n in rng.integers(1, 14, 40)]  # a log has no empty users
    return vocab, sid, seqs, _store(tmp_path_factory.mktemp("events"), seqs, 30)


def _same(a, b):
    return (np.array_equal(a.tokens, b.tokens) and np.array_equal(a.weights, b.weights)
            and ((a.items is None and b.items is None) or np.array_equal(a.items, b.items)))


@pytest.mark.parametrize("max_items,min_history", [(50, 1), (4, 1), (3, 2)])
def test_sft_examples_equal_the_in_memory_dataset(world, max_items, min_history):
    vocab, sid, seqs, store = world
    ref = SFTDataset(seqs, sid, vocab, max_items=max_items, min_history=min_history)
    ds = StoreSFTDataset(store, sid, vocab, max_items=max_items, min_history=min_history)
    assert len(ds) == len(ref) > 100
    assert all(_same(ds[k], ref[k]) for k in range(len(ref)))
    assert _same(ds[-1], ref[len(ref) - 1])
    assert [ds.num_tokens(k) for k in range(len(ds))] == [len(ref[k].tokens) for k in range(len(ref))]
    assert (store.path / f"sft_starts_{min_history}.npy").exists()
    again = StoreSFTDataset(store.path, sid, vocab, max_items=max_items, min_history=min_history)  # the cached index
    assert isinstance(again.starts, np.memmap) and all(_same(again[k], ref[k]) for k in range(0, len(ref), 7))
    with pytest.raises(IndexError):
        ds[len(ref)]


def test_sft_index_is_built_in_chunks_of_users(world, tmp_path, monkeypatch):
    import plumrec.train.streaming as streaming

    vocab, sid, seqs, _ = world
    monkeypatch.setattr(streaming, "USER_CHUNK", 3)
    store = _store(tmp_path / "ev", seqs, 30)
    ref = SFTDataset(seqs, sid, vocab, max_items=5)
    ds = StoreSFTDataset(store, sid, vocab, max_items=5)
    assert all(_same(ds[k], ref[k]) for k in range(len(ref)))
    cpt = StoreCPTCorpus(store, sid, vocab)
    assert cpt.users.tolist() == [u for u, s in enumerate(seqs) if len(s) >= 2]


@pytest.mark.parametrize("max_items,seed,size", [(50, 0, None), (3, 7, 500)])
def test_cpt_examples_equal_the_behaviour_only_corpus(world, max_items, seed, size):
    vocab, sid, seqs, store = world
    ref = CPTCorpus(list(store), sid, vocab, behaviour_fraction=1.0, max_items=max_items, size=size, seed=seed)
    ds = StoreCPTCorpus(store, sid, vocab, max_items=max_items, size=size, seed=seed)
    assert len(ds) == len(ref) and ds.users.tolist() == ref.users
    assert all(_same(ds[i], ref[i]) for i in range(len(ref)))
    assert max(len(ds[i].tokens) for i in range(len(ds))) <= 3 + 2 * max_items  # <bos> <hist> window <eos>


def test_store_checks_the_catalogue_and_arguments(world):
    vocab, sid, seqs, store = world
    with pytest.raises(ValueError, match=r"sid_tokens has 29 items, the event store .* has num_items=30"):
        StoreSFTDataset(store, sid[:29], vocab)
    with pytest.raises(ValueError, match="max_items and min_history must be >= 1"):
        StoreSFTDataset(store, sid, vocab, min_history=0)
    with pytest.raises(ValueError, match="no SFT example"):
        StoreSFTDataset(store, sid, vocab, min_history=100)
    with pytest.raises(TypeError, match="store must be an EventStore or its folder"):
        StoreCPTCorpus(seqs, sid, vocab)


def test_stream_over_a_store_resumes_exactly_under_the_block_shuffle(world, monkeypatch):
    vocab, sid, seqs, store = world
    monkeypatch.setattr(sequences, "FULL_SHUFFLE_MAX", 16)
    monkeypatch.setattr(sequences, "SHUFFLE_BLOCK", 8)
    ds = StoreSFTDataset(store, sid, vocab, max_items=6)
    full = ExampleStream(ds, max_tokens=64, seed=2)
    batches = [full.next_batch() for _ in range(60)]  # more than an epoch
    assert full.position > len(ds)
    part = ExampleStream(ds, max_tokens=64, seed=2)
    for _ in range(17):
        part.next_batch()
    resumed = ExampleStream(ds, max_tokens=64, seed=2, position=part.position)
    for b in batches[17:]:
        r = resumed.next_batch()
        assert torch.equal(b.input_ids, r.input_ids) and torch.equal(b.items, r.items)


def test_training_on_a_store_resumes_exactly(tmp_path):
    """A tiny LM trained on the store-backed dataset: stopped after 3 steps and resumed == uninterrupted ==
    trained on the in-memory SFTDataset of the same sequences."""
    _, mem = _setup()
    store = _store(tmp_path / "ev", mem.sequences, len(mem.sid_tokens))
    ds = StoreSFTDataset(store, mem.sid_tokens, mem.vocab)
    full, _ = _setup()
    train(full, ds, _cfg(), tmp_path / "a")
    part, _ = _setup()
    train(part, ds, _cfg(), tmp_path / "b", stop_after=3)
    resumed, _ = _setup(seed=1)
    train(resumed, ds, _cfg(), tmp_path / "b")
    ref, _ = _setup()
    train(ref, mem, _cfg(), tmp_path / "c")
    start, _ = _setup()
    a, b, c, s = (m.state_dict() for m in (full, resumed, ref, start))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert not all(torch.equal(a[k], s[k]) for k in a), "training must move the weights"
