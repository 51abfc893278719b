"""Examples, jagged packing, the token stream and history prompts shared by training and retrieval."""
import numpy as np
import pytest
from sft_world import sft_world

from plumrec.model import SIDVocab
from plumrec.sequences import Example, ExampleStream, check_histories, history_tokens, pack, token_items
from plumrec.train import SFTDataset


@pytest.fixture(scope="module")
def world():
    return sft_world()


def test_pack_layout():
    a = Example(np.array([1, 2, 3]), np.array([0, 1, 1], np.float32))
    b = Example(np.array([4, 5, 6, 7]), np.array([0, 0, 0, 2], np.float32))
    p = pack([a, b])
    assert p.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7] and p.cu_seqlens.tolist() == [0, 3, 7]
    assert p.max_seqlen == 4 and p.num_examples == 2
    # position 0 predicts 2, 1 predicts 3, 5 predicts 7; never across the boundary (2 -> 4)
    assert p.loss_index.tolist() == [0, 1, 5] and p.targets.tolist() == [2, 3, 7]
    assert p.weights.tolist() == [1, 1, 2]
    with pytest.raises(ValueError, match="at least one"):
        pack([])


def test_stream_budget_and_resume(world):
    vocab, sid, text, items, seqs = world
    d = SFTDataset(seqs, sid, vocab)
    s = ExampleStream(d, max_tokens=64, seed=1)
    batches = [s.next_batch() for _ in range(6)]
    assert all(b.num_tokens <= 64 for b in batches)
    s2 = ExampleStream(d, max_tokens=64, seed=1)
    for _ in range(3):
        s2.next_batch()
    s3 = ExampleStream(d, max_tokens=64, seed=1, position=s2.position)
    for b in batches[3:]:
        assert b.input_ids.tolist() == s3.next_batch().input_ids.tolist()


def test_example_checks_shapes_and_tail_keeps_items():
    e = Example(np.arange(5), np.ones(5, np.float32), np.array([-1, -1, 3, 3, 4]))
    t = e.tail(2)
    assert t.tokens.tolist() == [3, 4] and t.items.tolist() == [3, 4] and t.weights.tolist() == [1, 1]
    assert Example(np.arange(3), np.ones(3, np.float32)).tail(1).items is None
    with pytest.raises(ValueError, match="tokens and weights must be 1-D of one length"):
        Example(np.arange(3), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="items must be 1-D of the tokens' length"):
        Example(np.arange(3), np.ones(3, np.float32), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="every example needs >= 2 tokens"):
        pack([Example(np.arange(1), np.ones(1, np.float32))])


def test_stream_refuses_an_empty_dataset_and_a_tiny_budget(world):
    vocab, sid, text, items, seqs = world
    with pytest.raises(ValueError, match="the dataset is empty"):
        ExampleStream([], max_tokens=64)
    with pytest.raises(ValueError, match="max_tokens must be >= 2, got 1"):
        ExampleStream(SFTDataset(seqs, sid, vocab), max_tokens=1)


def test_history_tokens_and_their_items():
    vocab = SIDVocab(0, (4, 4), feature_tokens=("<|f0|>", "<|f1|>"))
    sid = vocab.sid_to_tokens(np.array([[0, 1], [2, 3], [3, 0]]))
    head = [vocab.token("<|bos|>"), vocab.token("<|hist|>")]
    assert history_tokens(vocab, sid, np.array([2, 0])).tolist() == head + [*sid[2], *sid[0]]
    with_features = history_tokens(vocab, sid, np.array([1]), features=np.array([1]))
    assert with_features.tolist() == head + [*sid[1], vocab.feature(1)]
    assert token_items(np.array([2, 0]), 2).tolist() == [-1, -1, 2, 2, 0, 0]


def test_check_histories_names_the_bad_history():
    check_histories([np.array([0, 2]), np.array([], np.int64)], 3)
    with pytest.raises(ValueError, match=r"seqs\[1\] names unknown item 3: the catalogue has items \[0, 3\)"):
        check_histories([np.array([0]), np.array([1, 3])], 3, name="seqs")
    with pytest.raises(ValueError, match=r"histories\[0\] names unknown item -1"):
        check_histories([np.array([-1])], 3)
    with pytest.raises(TypeError, match=r"histories\[0\] must be a 1-D integer array"):
        check_histories([np.array([0.5])], 3)


def _order(stream, start, count):
    return [stream._index(p) for p in range(start, start + count)]


def _block_order(n, block, seed, epoch):
    """The expected epoch order of the block shuffle, written out block by block."""
    nb = -(-n // block)
    out = []
    for b in np.random.default_rng([seed, epoch]).permutation(nb):
        size = min(block, n - b * block)
        out += (b * block + np.random.default_rng([seed, epoch, int(b)]).permutation(size)).tolist()
    return out


@pytest.mark.parametrize("n", [23, 24])  # a partial last block, and none
def test_block_shuffle_visits_every_index_once_and_resumes_anywhere(monkeypatch, n):
    import plumrec.sequences as sequences

    monkeypatch.setattr(sequences, "FULL_SHUFFLE_MAX", 8)
    monkeypatch.setattr(sequences, "SHUFFLE_BLOCK", 4)
    stream = ExampleStream(list(range(n)), max_tokens=8, seed=3)
    order = _order(stream, 0, 3 * n)
    for e in range(3):
        epoch = order[e * n:(e + 1) * n]
        assert sorted(epoch) == list(range(n))
        assert epoch == _block_order(n, 4, 3, e)
    assert order[:n] != order[n:2 * n]
    for p in range(0, 3 * n, 5):  # a stream rebuilt at p continues identically
        assert _order(ExampleStream(list(range(n)), max_tokens=8, seed=3, position=p), p, 2 * n) \
            == _order(stream, p, 2 * n)


def test_small_datasets_keep_the_full_permutation():
    n = 37
    stream = ExampleStream(list(range(n)), max_tokens=8, seed=4)
    expected = np.concatenate([np.random.default_rng([4, e]).permutation(n) for e in range(2)]).tolist()
    assert _order(stream, 0, 2 * n) == expected


@pytest.mark.parametrize("with_features", [False, True])
def test_skip_batch_packs_by_length_exactly_as_next_batch(world, with_features):
    """``skip_batch`` advances by the batch ``next_batch`` would build (the SFT dataset's ``num_tokens`` equals
    each example's length, features and long histories included), so a rank that skips the others' batches
    reads its own exactly as when it built them all."""
    vocab, sid, text, items, seqs = world
    feats = [np.arange(len(s)) % 2 for s in seqs] if with_features else None
    d = SFTDataset(seqs, sid, vocab, features=feats, max_items=3)
    assert [d.num_tokens(i) for i in range(len(d))] == [len(d[i].tokens) for i in range(len(d))]
    built, skipped = ExampleStream(d, max_tokens=40, seed=2), ExampleStream(d, max_tokens=40, seed=2)
    for step in range(12):  # odd steps: skip one batch, as a rank skips another rank's
        b = built.next_batch()
        if step % 2:
            assert skipped.skip_batch() == b.num_tokens
        else:
            assert skipped.next_batch().input_ids.tolist() == b.input_ids.tolist()
        assert skipped.position == built.position
    tiny = ExampleStream(d, max_tokens=5, seed=0)  # longer examples are cut to their tail: one per batch
    assert tiny.skip_batch() == 5 and tiny.position == 1
