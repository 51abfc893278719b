"""The SFT loss over each target level's codebook: cross-entropy, label smoothing, level weights and the
item loss, against float64 loops (distillation: test_distill.py)."""
import numpy as np
import pytest
from sft_world import sft_world

from plumrec.sequences import Example, pack
from plumrec.train import SequenceSFTDataset, SFTDataset

DATASETS = {"SFTDataset": SFTDataset, "SequenceSFTDataset": SequenceSFTDataset}


@pytest.fixture(scope="module")
def world():
    return sft_world()


def test_codebook_loss_is_ce_over_the_target_level_codebook(world):
    """CodebookLoss == cross-entropy of the full logits sliced to each target's level,
    value and gradients, in float64; non-SID targets are refused."""
    import torch

    from plumrec.model import PlumLM, preset
    from plumrec.train import CodebookLoss

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

    from plumrec.model import PlumLM, preset
    from plumrec.train import CodebookLoss

    vocab, sid, text, items, seqs = world
    torch.manual_seed(2)
    model = PlumLM(preset("tiny", vocab_size=vocab.size, num_experts=4)).double()
    ds = DATASETS[cls](seqs, sid, vocab, max_items=20, weights=lambda u, c, t: 0.5 + (c % 4))
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
