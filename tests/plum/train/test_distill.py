"""Distillation in the codebook loss: a SASRec teacher's next-item distribution restricted to each target's
SID prefix, against a float64 loop that runs the teacher once per target."""
import numpy as np
import pytest
from sft_world import sft_world

from plumrec.sequences import Example, pack
from plumrec.train import SequenceSFTDataset, SFTDataset

DATASETS = {"SFTDataset": SFTDataset, "SequenceSFTDataset": SequenceSFTDataset}


@pytest.fixture(scope="module")
def world():
    return sft_world()


def _teacher(num_items, max_len=20, seed=4):
    """A small random float64 SASRec (seeded, eval mode): the distillation tests' teacher."""
    import torch

    from plumrec.baselines import SASRec, SASRecConfig

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

    from plumrec.model import PlumLM, preset
    from plumrec.train import CodebookLoss

    vocab, sid, text, items, seqs = world
    sid = sid.copy()
    sid[7] = sid[3]            # a collision: two items, one SID
    sid[11, :2] = sid[5, :2]   # a shared two-level prefix
    teacher = _teacher(len(sid))
    torch.manual_seed(2)
    model = PlumLM(preset("tiny", vocab_size=vocab.size, num_experts=4)).double()
    ds = DATASETS[cls](seqs, sid, vocab, max_items=20, weights=lambda u, c, t: 0.5 + (c % 4))
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

    from plumrec.model import PlumLM, preset
    from plumrec.train import CodebookLoss

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
