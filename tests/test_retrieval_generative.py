"""Generative retrieval (prefill + constrained beam search over the KV cache) and top-K metrics."""
import math

import numpy as np
import pytest
import torch

from plum.baselines import Popularity
from plum.model import ModelConfig, PlumLM, SIDVocab, cu_seqlens_from_lengths
from plum.retrieval import GenerativeRetriever, topk_from_scores, topk_metrics
from plum.sid import build_trie
from plum.train.corpus import history_tokens

SIZES = (4, 3, 3)


def _world(n_items=12, seed=0):
    rng = np.random.default_rng(seed)
    all_codes = np.array([(a, b, c) for a in range(4) for b in range(3) for c in range(3)])
    codes = all_codes[rng.choice(len(all_codes), n_items, replace=False)]
    codes = np.concatenate([codes, codes[:1]])  # item n_items collides with item 0
    vocab = SIDVocab(5, SIZES)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab.size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=32, moe_intermediate_size=16,
                      num_experts=4, num_experts_per_tok=2, mlp_only_layers=(0,), initializer_range=0.3)
    model = PlumLM(cfg).double().eval()
    return model, vocab, codes, build_trie(codes, SIZES)


@torch.no_grad()
def _exact_scores(model, vocab, prompt, sids):
    """log p(sid | prompt) with per-level softmax over the level's codebook, by full forwards."""
    out = []
    for sid in sids:
        toks = torch.from_numpy(np.concatenate([prompt, vocab.sid_to_tokens(sid)]))
        h = model(toks, cu_seqlens_from_lengths([len(toks)])).hidden
        s = 0.0
        for l in range(len(sid)):
            logits = model.lm_logits(h[len(prompt) - 1 + l], vocab.level_slice(l))
            s += float(torch.log_softmax(logits, -1)[sid[l]])
        out.append(s)
    return np.array(out)


def test_exhaustive_beam_search_ranks_every_sid_by_its_exact_probability():
    model, vocab, codes, trie = _world()
    sids = np.unique(codes, axis=0)
    r = GenerativeRetriever(model, vocab, trie, codes, beam_width=len(sids), batch_size=2)
    hists = [np.array([3, 1, 4]), np.array([5]), np.array([2, 7, 1, 8, 0])]
    rec = r.recommend(hists, k=len(codes))
    assert rec.invalid == 0 and rec.beams == len(hists) * len(sids)
    for u, h in enumerate(hists):
        prompt = history_tokens(vocab, vocab.sid_to_tokens(codes), h)
        exact = _exact_scores(model, vocab, prompt, sids)
        order = np.argsort(-exact, kind="stable")
        assert (rec.codes[u] == sids[order]).all(), "beam search must return every SID, best first"
        np.testing.assert_allclose(rec.scores[u], exact[order], rtol=1e-5, atol=1e-6)
        # items: each beam's items in order; the collided SID yields both of its items
        expect = np.concatenate([trie.items(sids[order][i:i + 1])[0] for i in range(len(sids))])
        assert rec.items[u].tolist() == expect.tolist()
        assert sorted(rec.items[u].tolist()) == list(range(len(codes)))


def test_narrow_beams_return_valid_distinct_sids_and_metrics():
    model, vocab, codes, trie = _world()
    r = GenerativeRetriever(model, vocab, trie, codes, beam_width=5, batch_size=3)
    hists = [np.array([i % 12, (i * 5) % 12]) for i in range(7)]
    rec = r.recommend(hists, k=5)
    assert rec.invalid == 0 and rec.beams == 7 * 5
    for c, s in zip(rec.codes, rec.scores):
        assert trie.contains(c).all() and len(np.unique(c, axis=0)) == 5
        assert (np.diff(s) <= 1e-12).all()
    res = r.evaluate(hists, np.arange(7), ks=(1, 5))
    assert res["invalid_rate"] == 0.0 and 0 <= res["recall@1"] <= res["recall@5"] <= 1
    with pytest.raises(ValueError, match="beam_width"):
        r.evaluate(hists, np.arange(7), ks=(10,))


def test_bad_inputs_raise():
    model, vocab, codes, trie = _world()
    r = GenerativeRetriever(model, vocab, trie, codes)
    with pytest.raises(ValueError, match="unknown item 13"):
        r.recommend([np.array([1, 13])])
    with pytest.raises(ValueError, match="at least one item"):
        r.recommend([np.array([], np.int64)])
    with pytest.raises(ValueError, match="SID tokenizer has codebooks"):
        GenerativeRetriever(model, vocab, build_trie(codes, (4, 3, 4)), codes)
    with pytest.raises(ValueError, match="extend_vocabulary"):
        GenerativeRetriever(model, SIDVocab(6, SIZES), trie, codes)


def test_topk_metrics_by_hand():
    ranked = [np.array([3, 1, 2]), np.array([0, 4, 5]), np.array([9, 8, 7])]
    m = topk_metrics(ranked, [1, 5, 6], num_items=10, ks=(1, 3))
    assert m["recall@1"] == 0 and m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert m["coverage@1"] == pytest.approx(0.3) and m["coverage@3"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="targets"):
        topk_metrics(ranked, [1, 5, 10], num_items=10)
    with pytest.raises(ValueError, match="3 lists"):
        topk_metrics(ranked, [1, 5], num_items=10)


def test_topk_from_scores_and_popularity():
    assert topk_from_scores(np.array([[0.1, 0.5, 0.5, 0.2]]), 3).tolist() == [[1, 2, 3]]
    pop = Popularity([np.array([2, 2, 1]), np.array([1, 2, 0])], num_items=4)
    assert pop.recommend([np.array([0])], 3)[0].tolist() == [2, 1, 0]
    assert pop.evaluate([np.array([0]), np.array([3])], [2, 3], ks=(1,))["recall@1"] == 0.5
    with pytest.raises(ValueError, match="unknown item 4"):
        pop.recommend([np.array([4])], 2)
