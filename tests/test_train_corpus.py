"""CPT corpus, SFT examples and jagged packing."""
import numpy as np
import pytest

from plum.model import SIDVocab
from plum.model.vocab import train_word_tokenizer
from plum.train import CPTCorpus, Example, ExampleStream, SequenceSFTDataset, SFTDataset, grounding_text, pack

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

    from plum.model import PlumLM, preset
    from plum.train.loop import lm_loss

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


def test_codebook_loss_is_ce_over_the_target_level_codebook(world):
    """CodebookLoss == cross-entropy of the full logits sliced to each target's level,
    value and gradients, in float64; non-SID targets are refused."""
    import torch

    from plum.model import PlumLM, preset
    from plum.train.loop import CodebookLoss

    vocab, sid, text, items, seqs = world
    torch.manual_seed(1)
    model = PlumLM(preset("tiny", vocab_size=vocab.size, num_experts=4)).double()
    d = SequenceSFTDataset(seqs, sid, vocab, max_items=20, weights=lambda u, c, t: 1.0 + (c % 3))
    b = pack([d[i] for i in range(len(d))])
    loss_fn = CodebookLoss(vocab)
    loss, parts = loss_fn(model, b)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    out = model(b.input_ids, b.cu_seqlens, b.max_seqlen, logits_index=b.loss_index)
    num = 0.0
    for row in range(len(b.targets)):
        t = int(b.targets[row])
        sl = next(vocab.level_slice(l) for l in range(vocab.num_levels) if vocab.level_slice(l).start <= t
                  < vocab.level_slice(l).stop)
        num = num + b.weights[row].double() * torch.nn.functional.cross_entropy(
            out.logits[row, sl][None], torch.tensor([t - sl.start]))
    ref = num / b.weights.double().sum() + out.aux_loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    assert loss.dtype == torch.float64 and torch.allclose(loss, ref, rtol=1e-12, atol=0)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            assert torch.allclose(g, r, rtol=1e-9, atol=1e-12)
    # the codebook softmax is the full one renormalised: its CE is never larger
    full = float(torch.nn.functional.cross_entropy(out.logits.detach(), b.targets, reduction="none")
                 .mul(b.weights.double()).sum() / b.weights.double().sum())
    assert float(parts["ce"]) < full
    bad = pack([Example(np.array([vocab.token("<|bos|>"), vocab.token("<|hist|>"), 3]),
                        np.array([0, 1, 1], np.float32))])
    with pytest.raises(ValueError, match="needs every target to be a SID token"):
        loss_fn(model, bad)
    # label smoothing spreads eps over the target level's codebook only: -(1-eps) log p_t - eps/V_l sum log p
    eps = 0.15
    smooth, _ = CodebookLoss(vocab, label_smoothing=eps)(model, b)
    num = 0.0
    for row in range(len(b.targets)):
        t = int(b.targets[row])
        sl = next(vocab.level_slice(l) for l in range(vocab.num_levels) if vocab.level_slice(l).start <= t
                  < vocab.level_slice(l).stop)
        logp = torch.log_softmax(out.logits[row, sl].detach(), -1)
        num = num + b.weights[row].double() * (-(1 - eps) * logp[t - sl.start] - eps * logp.mean())
    ref = num / b.weights.double().sum() + out.aux_loss.detach()
    assert torch.allclose(smooth.detach(), ref, rtol=1e-12, atol=0) and not torch.allclose(smooth, loss)
    for v in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing must be in"):
            CodebookLoss(vocab, label_smoothing=v)
    # level weights multiply each level's CE: sum_l w_l * sum(token weight * ce) / sum(token weights)
    lw = [2.5, 1.0, 0.0, 0.5][:vocab.num_levels]
    weighted, _ = CodebookLoss(vocab, level_weights=lw)(model, b)
    num = 0.0
    for row in range(len(b.targets)):
        t = int(b.targets[row])
        lvl = next(l for l in range(vocab.num_levels) if vocab.level_slice(l).start <= t < vocab.level_slice(l).stop)
        sl = vocab.level_slice(lvl)
        num = num + lw[lvl] * b.weights[row].double() * torch.nn.functional.cross_entropy(
            out.logits[row, sl].detach()[None], torch.tensor([t - sl.start]))
    ref = num / b.weights.double().sum() + out.aux_loss.detach()
    assert torch.allclose(weighted.detach(), ref, rtol=1e-12, atol=0) and not torch.allclose(weighted, loss)
    ones, _ = CodebookLoss(vocab, level_weights=[1] * vocab.num_levels)(model, b)
    assert torch.equal(ones.detach(), loss.detach())
    for v in ([1.0] * (vocab.num_levels + 1), [0.0] * vocab.num_levels, [-1.0] + [1.0] * (vocab.num_levels - 1),
              [float("inf")] + [1.0] * (vocab.num_levels - 1), "1111", 2.0):
        with pytest.raises(ValueError, match="level_weights must"):
            CodebookLoss(vocab, level_weights=v)


@pytest.mark.parametrize("cls", ["SFTDataset", "SequenceSFTDataset"])
def test_codebook_item_loss_is_a_full_softmax_over_catalogue_sids(world, cls):
    """item_loss adds item_loss * (weighted mean over targets of the CE of a softmax over the
    catalogue's distinct SIDs, each scored by the sum of the first position's level logits):
    value and gradients against a float64 loop over targets; bad settings are refused."""
    import torch

    from plum.model import PlumLM, preset
    from plum.train.loop import CodebookLoss

    vocab, sid, text, items, seqs = world
    torch.manual_seed(2)
    model = PlumLM(preset("tiny", vocab_size=vocab.size, num_experts=4)).double()
    ds = globals()[cls](seqs, sid, vocab, max_items=20, weights=lambda u, c, t: 0.5 + (c % 4))
    b = pack([ds[i] for i in range(len(ds))])
    catalogue = np.concatenate([sid, sid[:5]])  # repeated SIDs are one class
    plain, plain_parts = CodebookLoss(vocab)(model, b)
    loss, parts = CodebookLoss(vocab, item_loss=0.3, catalogue=catalogue)(model, b)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    out = model(b.input_ids, b.cu_seqlens, b.max_seqlen, logits_index=b.loss_index)
    distinct = np.unique(sid, axis=0)
    L, first = vocab.num_levels, vocab.level_slice(0)
    num = den = cb = 0.0
    for row in range(len(b.targets)):
        t = int(b.targets[row])
        sl = next(vocab.level_slice(l) for l in range(L) if vocab.level_slice(l).start <= t < vocab.level_slice(l).stop)
        cb = cb + b.weights[row].double() * torch.nn.functional.cross_entropy(out.logits[row, sl][None],
                                                                              torch.tensor([t - sl.start]))
        if sl != first:
            continue
        target = b.targets[row:row + L].numpy()
        scores = torch.stack([sum(out.logits[row, int(t)] for t in d) for d in distinct])
        cls_idx = int(np.flatnonzero((distinct == target).all(1))[0])
        num = num + b.weights[row].double() * torch.nn.functional.cross_entropy(scores[None],
                                                                                torch.tensor([cls_idx]))
        den = den + float(b.weights[row])
    ref_item = num / den
    ref = cb / b.weights.double().sum() + out.aux_loss + 0.3 * ref_item  # one forward, as the loss's
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    assert torch.allclose(parts["item"], ref_item.detach(), rtol=1e-12, atol=0)
    assert torch.allclose(loss, ref, rtol=1e-12, atol=0) and torch.equal(parts["ce"], plain_parts["ce"])
    assert float(parts["item"]) > 0 and not torch.allclose(loss, plain)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            assert torch.allclose(g, r, rtol=1e-9, atol=1e-12)
    # a target SID missing from the catalogue, a target whose SID tokens are not all targets, bad settings
    target0 = int(np.flatnonzero((sid == b.targets[:L].numpy()).all(1))[0])
    with pytest.raises(ValueError, match="not in the catalogue"):
        CodebookLoss(vocab, item_loss=0.3, catalogue=np.delete(sid, target0, 0))(model, b)
    bos, hist = vocab.token("<|bos|>"), vocab.token("<|hist|>")
    half = pack([Example(np.array([bos, hist, *sid[0], *sid[1]]), np.array([0, 0] + [0] * L + [1, 1] + [0] * (L - 2),
                                                                          np.float32))])
    with pytest.raises(ValueError, match="consecutive targets"):
        CodebookLoss(vocab, item_loss=0.3, catalogue=sid)(model, half)
    for v in (-0.1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="item_loss must be a finite number >= 0"):
            CodebookLoss(vocab, item_loss=v, catalogue=sid)
    with pytest.raises(ValueError, match="needs catalogue"):
        CodebookLoss(vocab, item_loss=0.3)
    for bad in (sid[:, :-1], sid[:, ::-1], sid.astype(np.float32), sid[:0]):
        with pytest.raises(ValueError, match="catalogue"):
            CodebookLoss(vocab, item_loss=0.3, catalogue=bad)
    assert CodebookLoss(vocab, item_loss=0.0).item_codes is None  # off: no catalogue needed


@pytest.mark.parametrize("cls", ["SFTDataset", "SequenceSFTDataset"])
def test_sft_datasets_check_features(world, cls):
    vocab, sid, text, items, seqs = world
    make = {"SFTDataset": SFTDataset, "SequenceSFTDataset": SequenceSFTDataset}[cls]
    with pytest.raises(ValueError, match="features must align"):
        make(seqs, sid, vocab, features=[np.zeros(1, np.int64)] * len(seqs))
    with pytest.raises(ValueError, match=r"feature values must be in \[0, 2\)"):
        make(seqs, sid, vocab, features=[np.full(len(s), 2) for s in seqs])


def _teacher(num_items, max_len=20, seed=4):
    """A small random float64 SASRec (seeded, eval mode): the distillation tests' teacher."""
    import torch

    from plum.baselines import SASRec, SASRecConfig

    torch.manual_seed(seed)
    t = SASRec(SASRecConfig(num_items, hidden_size=16, num_layers=1, max_len=max_len)).double()
    with torch.no_grad():  # a sharper teacher than the 0.02-std init, so its labels are far from uniform
        t.item_embedding.weight.normal_(0, 0.5)
    return t.eval()


def _distill_reference(model, teacher, vocab, sid, b, d, temperature, level_weights=None):
    """(1 - d) CE(one-hot) + d CE(teacher label) of every target, weighted as CodebookLoss, by a loop:
    one teacher forward per target on its own history alone, the level-l label masked in numpy."""
    import torch

    L = vocab.num_levels
    out = model(b.input_ids, b.cu_seqlens, b.max_seqlen, logits_index=b.loss_index)
    codes = np.stack([sid[:, l] - vocab.level_slice(l).start for l in range(L)], 1)
    ids, items, cu = b.input_ids.numpy(), b.items.numpy(), b.cu_seqlens.numpy()
    num = kd = 0.0
    alone = 0
    for row in range(len(b.targets)):
        t = int(b.targets[row])
        lvl = next(l for l in range(L) if vocab.level_slice(l).start <= t < vocab.level_slice(l).stop)
        sl = vocab.level_slice(lvl)
        p = int(b.loss_index[row]) + 1
        e = int(np.searchsorted(cu[1:], p, side="right"))
        first = vocab.level_slice(0)
        starts = [q for q in range(cu[e], p - lvl) if items[q] >= 0 and first.start <= ids[q] < first.stop]
        hist = items[starts]
        logp = torch.log_softmax(out.logits[row, sl], -1)
        label = np.zeros(sl.stop - sl.start)
        if len(hist) == 0:
            label[t - sl.start] = 1.0
            alone += 1
        else:
            with torch.no_grad():
                s = teacher(torch.from_numpy(hist), torch.tensor([0, len(hist)], dtype=torch.int32), len(hist),
                            index=torch.tensor([len(hist) - 1]))[0]
            prob = torch.softmax(s / temperature, -1).numpy()
            item = int(items[p])
            same = (codes[:, :lvl] == codes[item, :lvl]).all(1)
            for i in np.flatnonzero(same):
                label[codes[i, lvl]] += prob[i]
            label /= label.sum()
        lw = 1.0 if level_weights is None else level_weights[lvl]
        w = b.weights[row].double() * lw
        num = num + w * -logp[t - sl.start]
        kd = kd + w * -(torch.from_numpy(label) * logp).sum()
    den = b.weights.double().sum()
    return ((1 - d) * num + d * kd) / den + out.aux_loss, num.detach() / den, kd.detach() / den, alone


@pytest.mark.parametrize("cls", ["SFTDataset", "SequenceSFTDataset"])
def test_codebook_distill_matches_a_per_target_loop(world, cls):
    """distill mixes every target's one-hot with the teacher's next-item distribution restricted to the
    target's SID prefix and summed by its level's code: value, logged parts and gradients against a
    float64 loop that runs the teacher once per target on that target's history alone; collided SIDs
    and shared prefixes in the catalogue; a max_tokens-cut example; distill 0 is the plain loss."""
    import torch

    from plum.model import PlumLM, preset
    from plum.train.loop import CodebookLoss

    vocab, sid, text, items, seqs = world
    sid = sid.copy()
    sid[7] = sid[3]            # a collision: two items, one SID
    sid[11, :2] = sid[5, :2]   # a shared two-level prefix
    teacher = _teacher(len(sid))
    torch.manual_seed(2)
    model = PlumLM(preset("tiny", vocab_size=vocab.size, num_experts=4)).double()
    ds = globals()[cls](seqs, sid, vocab, max_items=20, weights=lambda u, c, t: 0.5 + (c % 4))
    examples = [ds[i] for i in range(len(ds))]
    long = max(range(len(examples)), key=lambda i: len(examples[i].tokens))
    examples[long] = examples[long].tail(len(examples[long].tokens) - 6)  # cut mid-item, as max_tokens does
    b = pack(examples)
    lw = [2.0, 1.0, 0.5, 1.0][:vocab.num_levels]
    params = list(model.parameters())
    for d, temp in ((0.5, 1.0), (1.0, 2.5)):
        fn = CodebookLoss(vocab, level_weights=lw, distill=d, teacher=teacher, catalogue=sid,
                          distill_temperature=temp)
        loss, parts = fn(model, b)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        ref, ref_ce, ref_kd, alone = _distill_reference(model, teacher, vocab, sid, b, d, temp, lw)
        # no history in the cut window: its 2nd item's last L-2 tokens (its first token left opens the example,
        # never a target) and its 3rd item's L; a cut SFTDataset prompt keeps a history
        assert alone == (2 * vocab.num_levels - 2 if cls == "SequenceSFTDataset" else 0)
        ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
        assert torch.allclose(loss, ref, rtol=1e-11, atol=0), (float(loss), float(ref))
        assert torch.allclose(parts["ce"], ref_ce, rtol=1e-11) and torch.allclose(parts["distill"], ref_kd, rtol=1e-11)
        assert float(parts["distill"]) > float(parts["ce"]) * 0.2 and not torch.allclose(ref_kd, ref_ce)
        for g, r in zip(grads, ref_grads):
            assert (g is None) == (r is None)
            if g is not None:
                assert torch.allclose(g, r, rtol=1e-9, atol=1e-12)
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    plain, plain_parts = CodebookLoss(vocab, level_weights=lw)(model, b)
    zero, zero_parts = CodebookLoss(vocab, level_weights=lw, distill=0.0, teacher=teacher, catalogue=sid)(model, b)
    assert torch.equal(zero, plain) and "distill" not in zero_parts
    loss, parts = CodebookLoss(vocab, level_weights=lw, distill=0.5, teacher=teacher, catalogue=sid)(model, b)
    assert torch.allclose(parts["ce"], plain_parts["ce"], rtol=1e-12)


def test_codebook_distill_refuses_bad_input(world):
    import torch

    from plum.model import PlumLM, preset
    from plum.train.loop import CodebookLoss

    vocab, sid, text, items, seqs = world
    teacher = _teacher(len(sid))
    torch.manual_seed(2)
    model = PlumLM(preset("tiny", vocab_size=vocab.size, num_experts=4)).double()
    ds = SequenceSFTDataset(seqs, sid, vocab, max_items=20)
    b = pack([ds[i] for i in range(len(ds))])
    for v in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="distill must be a number in"):
            CodebookLoss(vocab, distill=v, teacher=teacher, catalogue=sid)
    for v in (0, -1.0, float("inf"), "1"):
        with pytest.raises(ValueError, match="distill_temperature must be"):
            CodebookLoss(vocab, distill=0.5, teacher=teacher, catalogue=sid, distill_temperature=v)
    with pytest.raises(ValueError, match="needs teacher"):
        CodebookLoss(vocab, distill=0.5, catalogue=sid)
    with pytest.raises(ValueError, match="needs teacher"):
        CodebookLoss(vocab, distill=0.5, teacher=teacher)
    with pytest.raises(TypeError, match="teacher must be a callable"):
        CodebookLoss(vocab, distill=0.5, teacher="sasrec", catalogue=sid)
    with pytest.raises(ValueError, match="teacher scores 30 items but catalogue has 29"):
        CodebookLoss(vocab, distill=0.5, teacher=teacher, catalogue=sid[:-1])
    fn = CodebookLoss(vocab, distill=0.5, teacher=teacher, catalogue=sid)
    no_items = pack([Example(e.tokens, e.weights) for e in (ds[0], ds[1])])
    with pytest.raises(ValueError, match="needs the batch's items"):
        fn(model, no_items)
    swapped = pack([Example(ds[0].tokens, ds[0].weights, np.where(ds[0].items >= 0, (ds[0].items + 1) % 30, -1))])
    with pytest.raises(ValueError, match="do not match catalogue"):
        fn(model, swapped)
    unowned = pack([Example(ds[0].tokens, ds[0].weights, np.full_like(ds[0].items, -1))])
    with pytest.raises(ValueError, match="must belong to an item"):
        fn(model, unowned)
    wrong = CodebookLoss(vocab, distill=0.5, teacher=lambda items, cu, m, index: torch.zeros(len(index), 7),
                         catalogue=sid)
    with pytest.raises(ValueError, match=r"teacher returned scores of shape \(\d+, 7\)"):
        wrong(model, b)
