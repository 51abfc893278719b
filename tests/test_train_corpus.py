"""CPT corpus, SFT examples and jagged packing."""
import numpy as np
import pytest

from plum.model import SIDVocab
from plum.model.vocab import train_word_tokenizer
from plum.train import CPTCorpus, Example, ExampleStream, SFTDataset, grounding_text, pack

SIZES = (8, 4, 4)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    n_items = 30
    codes = np.stack([rng.integers(0, v, n_items) for v in SIZES], 1)
    items = [{"title": f"Thing {i}", "categories": [["topic a", "sub b"]]} for i in range(n_items)]
    text = train_word_tokenizer([grounding_text(m) for m in items])
    vocab = SIDVocab(text.vocab_size, SIZES, feature_tokens=("<|f0|>", "<|f1|>"))
    seqs = [rng.integers(0, n_items, rng.integers(2, 9)).astype(np.int64) for _ in range(12)]
    return vocab, vocab.sid_to_tokens(codes), text, items, seqs


def test_grounding_text():
    assert grounding_text({"title": "Red Shoe", "categories": [["a", "b"], ["a", "c"]]}) == \
        "has title Red Shoe . categories : a , b , c"


def test_cpt_mix_formats_and_determinism(world):
    vocab, sid, text, items, seqs = world
    c = CPTCorpus(seqs, sid, vocab, text_tokenizer=text, items=items, size=400, seed=3)
    hist = vocab.token("<|hist|>")
    kinds = [c[i].tokens[1] == hist for i in range(400)]
    assert 0.4 < np.mean(kinds) < 0.6  # PLUM's 50/50 behaviour / grounding mix
    assert all((c[i].tokens == c[i].tokens).all() for i in range(5))
    b = next(c[i] for i in range(400) if c[i].tokens[1] == hist)
    body = b.tokens[2:-1].reshape(-1, 3)
    assert b.tokens[0] == vocab.token("<|bos|>") and b.tokens[-1] == vocab.token("<|eos|>")
    assert np.isin(body, sid).all() and b.weights[0] == 0 and (b.weights[1:] == 1).all()
    g = next(c[i] for i in range(400) if c[i].tokens[1] == vocab.token("<|item|>"))
    item = int(np.flatnonzero((sid == g.tokens[2:5]).all(1))[0])
    assert text.decode(g.tokens[5:-1].tolist()).startswith("has title thing")
    assert str(item) in text.decode(g.tokens[5:-1].tolist()).replace(" ", "")
    only = CPTCorpus(seqs, sid, vocab, behaviour_fraction=1.0, size=20)
    assert all(only[i].tokens[1] == hist for i in range(20))


def test_cpt_feature_tokens_between_items(world):
    vocab, sid, text, items, seqs = world
    feats = [np.arange(len(s)) % 2 for s in seqs]
    c = CPTCorpus(seqs, sid, vocab, features=feats, behaviour_fraction=1.0, size=10)
    body = c[0].tokens[2:-1].reshape(-1, 4)
    assert np.isin(body[:, 3], [vocab.feature(0), vocab.feature(1)]).all()
    with pytest.raises(ValueError, match="feature values"):
        CPTCorpus(seqs, sid, vocab, features=[f + 5 for f in feats], behaviour_fraction=1.0)


def test_sft_loss_only_on_target_and_weights(world):
    vocab, sid, text, items, seqs = world
    d = SFTDataset(seqs, sid, vocab, weights=lambda u, c, t: 2.0 if u == 0 else 1.0)
    assert len(d) == sum(len(s) - 1 for s in seqs)
    k = 2
    u, cut = d.examples[k]
    ex = d[k]
    assert (ex.tokens[-3:] == sid[seqs[u][cut]]).all()
    assert (ex.weights[:-3] == 0).all() and (ex.weights[-3:] == (2.0 if u == 0 else 1.0)).all()
    assert (ex.tokens[2:-3].reshape(-1, 3) == sid[seqs[u][:cut]]).all()
    with pytest.raises(ValueError, match="one value per example"):
        SFTDataset(seqs, sid, vocab, weights=np.ones(3))


def test_unknown_items_and_bad_sid_tokens_raise(world):
    vocab, sid, text, items, seqs = world
    bad = seqs[:3] + [np.array([1, 30])]
    with pytest.raises(ValueError, match=r"sequences\[3\] names unknown item 30"):
        SFTDataset(bad, sid, vocab)
    with pytest.raises(ValueError, match="unknown item"):
        CPTCorpus(bad, sid, vocab, behaviour_fraction=1.0)
    with pytest.raises(ValueError, match="not SID tokens"):
        SFTDataset(seqs, sid - 1, vocab)
    with pytest.raises(ValueError, match="need text_tokenizer"):
        CPTCorpus(seqs, sid, vocab)


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
