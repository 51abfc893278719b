"""Generative retrieval (prefill + constrained beam search over the KV cache) and top-K metrics."""
import math

import numpy as np
import pytest
import torch

from plumrec.baselines import Popularity, SASRec, SASRecConfig
from plumrec.metrics import (
    drop_history,
    paired_difference,
    per_user_metric,
    target_ranks,
    topk_from_scores,
    topk_metrics,
)
from plumrec.model import ModelConfig, PlumLM, SIDVocab, cu_seqlens_from_lengths
from plumrec.retrieval import GenerativeRetriever
from plumrec.sequences import history_tokens
from plumrec.sid import build_trie

SIZES = (4, 3, 3)


def _world(n_items=12, seed=0, kernel_impl=None):
    rng = np.random.default_rng(seed)
    all_codes = np.array([(a, b, c) for a in range(4) for b in range(3) for c in range(3)])
    codes = all_codes[rng.choice(len(all_codes), n_items, replace=False)]
    codes = np.concatenate([codes, codes[:1]])  # item n_items collides with item 0
    vocab = SIDVocab(5, SIZES)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab.size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=32, moe_intermediate_size=16,
                      num_experts=4, num_experts_per_tok=2, mlp_only_layers=(0,), initializer_range=0.3,
                      kernel_impl=kernel_impl)
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


@pytest.mark.parametrize("model_impl, impl, expect", [(None, None, None), ("reference", None, "reference"),
                                                      ("reference", "triton", "triton")])
def test_beam_search_impl_follows_the_model_unless_given(monkeypatch, model_impl, impl, expect):
    """A model set to the reference ops (``kernel_impl``) also decodes with the reference beam search;
    an explicit ``impl`` wins. Both impls return the same beams."""
    import plumrec.retrieval.generative as G

    model, vocab, codes, trie = _world(kernel_impl=model_impl)
    seen, search = [], G.K.constrained_beam_search
    monkeypatch.setattr(G.K, "constrained_beam_search", lambda *a, **kw: seen.append(kw["impl"]) or search(*a, **kw))
    hists = [np.array([3, 1, 4]), np.array([5])]
    rec = GenerativeRetriever(model, vocab, trie, codes, beam_width=6, batch_size=2, impl=impl).recommend(hists, k=5)
    assert seen == [expect]
    ref = GenerativeRetriever(_world()[0], vocab, trie, codes, beam_width=6, batch_size=2).recommend(hists, k=5)
    assert (rec.codes == ref.codes).all() and [x.tolist() for x in rec.items] == [x.tolist() for x in ref.items]


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


def _without(ranked, history):
    seen = set(np.asarray(history).tolist())
    return [int(i) for i in ranked if int(i) not in seen]


@pytest.mark.parametrize("beam_width", [6, 40])
def test_exclude_history_drops_history_items_and_keeps_the_order(beam_width):
    model, vocab, codes, trie = _world()
    r = GenerativeRetriever(model, vocab, trie, codes, beam_width=beam_width, batch_size=2)
    rng = np.random.default_rng(1)
    hists = [rng.choice(len(codes), n, replace=False) for n in (1, 3, 5, 2, 7)]
    k = 4
    full = r.recommend(hists, k=len(codes))  # every item the beams hold, best first
    rec = r.recommend(hists, k=k, exclude_history=True)
    assert (rec.codes == full.codes).all() and np.array_equal(rec.scores, full.scores)
    for u, h in enumerate(hists):
        assert rec.items[u].dtype == np.int64
        assert rec.items[u].tolist() == _without(full.items[u], h)[:k]
        assert not np.isin(rec.items[u], h).any()
    # evaluate scores the filtered lists; a target ranked behind history items moves up
    targets = np.array([_without(full.items[u], h)[min(1, len(_without(full.items[u], h)) - 1)]
                        for u, h in enumerate(hists)])
    got = r.evaluate(hists, targets, ks=(2, 4), exclude_history=True)
    expect = topk_metrics(rec.items, targets, len(codes), ks=(2, 4))
    assert {k_: got[k_] for k_ in expect} == expect
    assert got["recall@2"] == 1.0
    assert r.evaluate(hists, targets, ks=(2, 4))["ndcg@4"] <= got["ndcg@4"]


def test_drop_history_and_popularity_exclusion_by_hand():
    assert drop_history(np.array([5, 3, 9, 3, 1]), [3, 7]).tolist() == [5, 9, 1]
    assert drop_history(np.array([], np.int64), [1]).tolist() == []
    pop = Popularity([np.array([2, 2, 1, 2]), np.array([1, 3, 0])], num_items=5)  # ranking 2, 1, 0, 3, 4
    assert pop.recommend([np.array([2, 2, 0])], 3, exclude_history=True)[0].tolist() == [1, 3, 4]
    assert pop.recommend([np.array([4])], 2, exclude_history=True)[0].tolist() == [2, 1]
    m = pop.evaluate([np.array([2]), np.array([0])], [1, 1], ks=(1,), exclude_history=True)
    assert m["recall@1"] == 0.5  # user 0: item 2 dropped, item 1 first; user 1: item 2 first


@pytest.mark.parametrize("field, value, error", [
    ("num_items", 0, ValueError), ("hidden_size", 0, ValueError), ("num_layers", -1, ValueError),
    ("max_len", 0, ValueError), ("hidden_size", 12.0, TypeError), ("num_heads", True, TypeError),
    ("num_layers", "2", TypeError), ("dropout", 1.0, ValueError), ("dropout", -0.1, ValueError),
    ("dropout", "0.1", ValueError), ("dropout", False, ValueError)])
def test_sasrec_config_rejects_bad_fields(field, value, error):
    """Every SASRecConfig field is checked, by type and by range, with an error naming it (a float width or
    a boolean head count would otherwise fail later, inside torch, or build a one-head model silently)."""
    kwargs = {"num_items": 10, "hidden_size": 8, "num_heads": 2, field: value}
    with pytest.raises(error, match=field):
        SASRecConfig(**kwargs)
    assert SASRecConfig(np.int64(10), hidden_size=np.int64(8), dropout=0).hidden_size == 8  # numpy ints, int 0
    with pytest.raises(ValueError, match="multiple of num_heads"):
        SASRecConfig(10, hidden_size=6, num_heads=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sasrec_exclude_history_matches_masked_scores(dtype):
    torch.manual_seed(0)
    n = 37
    sas = SASRec(SASRecConfig(n, max_len=4, hidden_size=16, num_layers=1, num_heads=2)).to(dtype).eval()
    rng = np.random.default_rng(2)
    hists = [rng.integers(0, n, size=m) for m in (1, 3, 6, 9, 2)]  # repeats, and histories past max_len
    k = 10
    got = sas.recommend(hists, k, batch_size=2, exclude_history=True)
    plain = sas.recommend(hists, n, batch_size=2)
    with torch.no_grad():
        for u, h in enumerate(hists):
            hh = torch.from_numpy(h[-4:])
            scores = sas(hh, torch.tensor([0, len(hh)], dtype=torch.int32), len(hh), index=torch.tensor([len(hh) - 1]))
            s = scores[0].float().double().numpy().copy()  # recommend ranks float32 scores
            s[h] = -np.inf  # the whole history, not only the model's window
            expect = np.argsort(-s, kind="stable")[:k]
            assert got[u].tolist() == expect.tolist()
            assert got[u].tolist() == _without(plain[u], h)[:k]
            assert not np.isin(got[u], h).any()
    targets = np.array([g[3] for g in got])
    m = sas.evaluate(hists, targets, ks=(5, 10), exclude_history=True)
    assert m["recall@5"] == 1.0 and m["ndcg@5"] == pytest.approx(1 / math.log2(5))


def test_target_ranks_and_paired_difference_against_a_float64_reference():
    """Per-user ranks give back topk_metrics' means; the paired difference of two models is the mean
    of per-user differences with its sample standard error (float64 reference by loops)."""
    rng = np.random.default_rng(7)
    n_items, n_users = 30, 57
    targets = rng.integers(0, n_items, n_users)
    lists = [[rng.permutation(n_items)[:rng.integers(0, 15)] for _ in range(n_users)] for _ in range(2)]
    ranks = [target_ranks(l, targets, 12) for l in lists]
    for l, r in zip(lists, ranks):
        for u in range(n_users):
            hit = [i for i, x in enumerate(l[u][:12]) if x == targets[u]]
            assert r[u] == (hit[0] if hit else -1)
        m = topk_metrics(l, targets, n_items, ks=(3, 12))
        for k in (3, 12):
            assert per_user_metric(r, k, "recall").mean() == m[f"recall@{k}"]
            assert per_user_metric(r, k, "ndcg").mean() == m[f"ndcg@{k}"]
    for k, metric in ((3, "recall"), (12, "ndcg"), (5, "ndcg")):
        def value(rank):
            if rank < 0 or rank >= k:
                return 0.0
            return 1.0 if metric == "recall" else 1.0 / math.log2(rank + 2)
        d = [value(int(b)) - value(int(a)) for a, b in zip(*ranks)]
        mean = math.fsum(d) / n_users
        se = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n_users - 1) / n_users)
        got = paired_difference(ranks[0], ranks[1], k, metric)
        assert got[0] == pytest.approx(mean, rel=1e-12, abs=1e-15) and got[1] == pytest.approx(se, rel=1e-12)
        assert got[1] > 0
    assert paired_difference(ranks[0], ranks[0], 12) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same users"):
        paired_difference(ranks[0], ranks[1][:-1], 10)
    with pytest.raises(ValueError, match="metric must be"):
        paired_difference(ranks[0], ranks[1], 10, "mrr")
    with pytest.raises(ValueError, match="k must be >= 1"):
        target_ranks(lists[0], targets, 0)
    with pytest.raises(ValueError, match="at least 2 users"):
        paired_difference(ranks[0][:1], ranks[1][:1], 10)


def test_evaluate_returns_ranks_on_request():
    pop = Popularity([np.array([2, 2, 1, 0])], 4)
    hists, targets = [np.array([0]), np.array([3])], [0, 1]  # ranking 2, 0, 1, 3
    m, r = pop.evaluate(hists, targets, ks=(1, 2), return_ranks=True)
    assert m == pop.evaluate(hists, targets, ks=(1, 2)) and r.tolist() == [1, -1]  # 1 is third: not in the top 2


def _nan_first_row(monkeypatch, model, vocab, user):
    """The model's level-0 logits get one NaN in ``user``'s row (every other logit unchanged)."""
    real = model.lm_logits

    def lm_logits(h, sl):
        out = real(h, sl)
        if sl == vocab.level_slice(0) and out.dim() == 2 and out.shape[0] > user:
            out = out.clone()
            out[user, 0] = float("nan")
        return out
    monkeypatch.setattr(model, "lm_logits", lm_logits)


def test_a_nan_in_one_users_first_row_raises_or_is_reported_for_that_user(monkeypatch):
    model, vocab, codes, trie = _world()
    r = GenerativeRetriever(model, vocab, trie, codes, beam_width=5, batch_size=2)
    hists = [np.array([i % 12, (i * 5) % 12]) for i in range(5)]
    clean = r.recommend(hists, k=5)
    _nan_first_row(monkeypatch, model, vocab, user=1)   # user 1 of each batch: histories 1 and 3
    with pytest.raises(ValueError, match=r"not finite .* histories \[1\]"):
        r.recommend(hists, k=5)
    rec = r.recommend(hists, k=5, on_nonfinite="skip")
    assert rec.nonfinite.tolist() == [1, 3]
    assert np.isnan(rec.scores[[1, 3]]).all() and trie.contains(rec.codes[[1, 3]].reshape(-1, 3)).all()
    for u in (0, 2, 4):
        assert rec.items[u].tolist() == clean.items[u].tolist()
    assert len(rec.items[1]) == 0 and rec.beams == 3 * 5 and rec.invalid == 0
    res = r.evaluate(hists, np.arange(5), ks=(5,), on_nonfinite="skip")
    assert res["nonfinite"] == 2 and res["invalid_rate"] == 0.0
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        r.recommend(hists, on_nonfinite="ignore")


def test_a_model_with_one_nan_weight_never_evaluates_silently():
    """One NaN weight makes every score NaN: evaluate raises by default; asked to go on, it reports every
    user as non-finite and an undefined (NaN) invalid rate, never recall 0 / invalid_rate 0 alone."""
    model, vocab, codes, trie = _world()
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    r = GenerativeRetriever(model, vocab, trie, codes, beam_width=5, batch_size=3)
    hists, targets = [np.array([1, 2]), np.array([3]), np.array([4, 0])], np.arange(3)
    with pytest.raises(ValueError, match=r"not finite .* 3 user\(s\)"):
        r.evaluate(hists, targets, ks=(5,))
    res = r.evaluate(hists, targets, ks=(5,), on_nonfinite="skip")
    assert res["nonfinite"] == 3 and math.isnan(res["invalid_rate"]) and res["recall@5"] == 0.0
