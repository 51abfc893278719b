"""CPT corpus, SFT examples and jagged packing."""
import numpy as np
import pytest
from sft_world import sft_world

from plumrec.sequences import pack
from plumrec.train import CPTCorpus, SequenceSFTDataset, SFTDataset, grounding_text


@pytest.fixture(scope="module")
def world():
    return sft_world()


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


def _target_cuts(d):
    return sorted((int(u), j) for u, j0, j1 in d.blocks for j in range(j0, j1))


@pytest.mark.parametrize("max_items,stride", [(20, None), (3, None), (4, 1), (5, 5)])
def test_sequence_sft_covers_every_target_once_within_max_items(world, max_items, stride):
    vocab, sid, text, items, seqs = world
    long = seqs + [np.arange(23) % 30]
    d = SequenceSFTDataset(long, sid, vocab, max_items=max_items, stride=stride)
    # the same (user, cut) targets as SFTDataset, each exactly once
    assert _target_cuts(d) == sorted((int(u), int(c)) for u, c in SFTDataset(long, sid, vocab).examples)
    assert d.num_targets == sum(len(s) - 1 for s in long)
    st = d.stride
    for i in range(len(d)):
        u, j0, j1 = (int(x) for x in d.blocks[i])
        ex = d[i]
        start = max(0, j1 - 1 - max_items)
        body = ex.tokens[2:].reshape(-1, 3)
        assert (body == sid[long[u][start:j1]]).all()
        w = ex.weights[2:].reshape(-1, 3)
        assert (ex.weights[:2] == 0).all()
        assert (w[j0 - start:] == 1).all() and (w[:j0 - start] == 0).all()
        # every target sees at most max_items items of history, and at least min(j0, max_items + 1 - stride)
        assert j1 - 1 - start <= max_items and j0 - start >= min(j0, max_items + 1 - st)


def test_sequence_sft_features_weights_and_errors(world):
    vocab, sid, text, items, seqs = world
    feats = [np.arange(len(s)) % 2 for s in seqs]
    d = SequenceSFTDataset(seqs, sid, vocab, features=feats, weights=lambda u, c, t: 0.5 + c, min_history=2)
    u, j0, j1 = (int(x) for x in d.blocks[0])
    ex = d[0]
    w = ex.weights[2:].reshape(-1, 4)
    assert (w[:, 3] == 0).all()  # never a loss on a feature token
    assert [float(x) for x in w[:, 0]] == [0.0 if j < j0 else 0.5 + j for j in range(j1)]
    assert np.isin(ex.tokens[2:].reshape(-1, 4)[:, 3], [vocab.feature(0), vocab.feature(1)]).all()
    assert _target_cuts(d) == sorted((u, c) for u, s in enumerate(seqs) for c in range(2, len(s)))
    with pytest.raises(ValueError, match="stride"):
        SequenceSFTDataset(seqs, sid, vocab, max_items=4, stride=5)
    with pytest.raises(TypeError, match="weights must be a function"):
        SequenceSFTDataset(seqs, sid, vocab, weights=np.ones(3))
    with pytest.raises(ValueError, match="shorter than min_history"):
        SequenceSFTDataset(seqs, sid, vocab, min_history=50)
    with pytest.raises(ValueError, match=r"sequences\[1\] names unknown item 30"):
        SequenceSFTDataset([seqs[0], np.array([30, 1])], sid, vocab)


def test_sequence_sft_loss_equals_next_item_sft_loss(world):
    """Under causal attention each target's loss in a sequence example is the loss of
    SFTDataset's example for the same (user, cut), in float64 on a random model."""
    import torch

    from plumrec.model import PlumLM, preset
    from plumrec.train import lm_loss

    vocab, sid, text, items, seqs = world
    torch.manual_seed(0)
    model = PlumLM(preset("tiny", vocab_size=vocab.size, num_experts=0)).double().eval()
    seq_d = SequenceSFTDataset(seqs, sid, vocab, max_items=20)
    cut_d = SFTDataset(seqs, sid, vocab, max_items=20)
    with torch.no_grad():
        # per target token: loss from one packed batch of every sequence example ...
        b = pack([seq_d[i] for i in range(len(seq_d))])
        out = model(b.input_ids, b.cu_seqlens, b.max_seqlen, logits_index=b.loss_index)
        seq_ce = torch.nn.functional.cross_entropy(out.logits, b.targets, reduction="none")
        # ... and from the next-item examples, in the same (user, cut) order
        order = {uc: k for k, uc in enumerate(map(tuple, cut_d.examples.tolist()))}
        cuts = [order[uc] for uc in _target_cuts(seq_d)]
        c = pack([cut_d[k] for k in cuts])
        out = model(c.input_ids, c.cu_seqlens, c.max_seqlen, logits_index=c.loss_index)
        cut_ce = torch.nn.functional.cross_entropy(out.logits, c.targets, reduction="none")
    assert seq_ce.shape == cut_ce.shape and seq_ce.shape[0] == 3 * seq_d.num_targets
    assert torch.allclose(seq_ce.sort().values, cut_ce.sort().values, rtol=0, atol=1e-10)
    assert float(lm_loss(model, b)[1]["ce"]) == pytest.approx(float(lm_loss(model, c)[1]["ce"]), abs=1e-10)


@pytest.mark.parametrize("cls", ["SFTDataset", "SequenceSFTDataset"])
def test_sft_datasets_check_features(world, cls):
    vocab, sid, text, items, seqs = world
    make = {"SFTDataset": SFTDataset, "SequenceSFTDataset": SequenceSFTDataset}[cls]
    with pytest.raises(ValueError, match="features must align"):
        make(seqs, sid, vocab, features=[np.zeros(1, np.int64)] * len(seqs))
    with pytest.raises(ValueError, match=r"feature values must be in \[0, 2\)"):
        make(seqs, sid, vocab, features=[np.full(len(s), 2) for s in seqs])
