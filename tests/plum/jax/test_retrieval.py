"""The JAX generative retriever against the torch GenerativeRetriever with the same weights (fp32): the
beams' codes, scores and items, the metrics of evaluate, the Pallas beam step (interpret mode) against the
reference, the packing of a batch into padded static shapes, and argument checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from plumrec.jax import model as JM
from plumrec.jax.retrieval import JaxRetriever, token_bucket
from plumrec.model import PlumLM, SIDVocab, preset
from plumrec.retrieval import GenerativeRetriever
from plumrec.sid import build_trie

SIZES = (6, 5, 4)
VOCAB = SIDVocab(5, SIZES)
CONFIGS = {"dense": preset("tiny", vocab_size=VOCAB.size, num_experts=0),
           "moe": preset("tiny", vocab_size=VOCAB.size)}


def _world(seed=0, n_items=30, n_collide=3):
    """A random catalogue whose last ``n_collide`` items share the SIDs of the first ones, and its trie."""
    rng = np.random.default_rng(seed)
    all_codes = np.array([(a, b, c) for a in range(SIZES[0]) for b in range(SIZES[1]) for c in range(SIZES[2])])
    codes = all_codes[rng.choice(len(all_codes), n_items, replace=False)]
    codes = np.concatenate([codes, codes[:n_collide]])
    return codes, build_trie(codes, SIZES)


def _models(cfg, seed=0):
    torch.manual_seed(seed)
    m = PlumLM(cfg.replace(initializer_range=0.3)).eval()
    return m, JM.params_from_torch_state(m.state_dict(), cfg)


def _histories(n_users, n_items, seed=0, longest=9):
    rng = np.random.default_rng(seed + 100)
    return [rng.integers(0, n_items, int(n)) for n in rng.integers(1, longest + 1, n_users)]


def _same_beams(got, want):
    assert got.codes.shape == want.codes.shape and got.codes.dtype == np.int64
    np.testing.assert_array_equal(got.codes, want.codes)
    live = np.isfinite(want.scores)
    np.testing.assert_array_equal(np.isfinite(got.scores), live)
    assert np.abs(got.scores[live] - want.scores[live]).max() <= 1e-4
    assert len(got.items) == len(want.items)
    for a, b in zip(got.items, want.items):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_beams_match_torch(name):
    """Same weights: the beams' codes equal the torch retriever's, scores within 1e-4, items (colliding SIDs
    give all their items) equal with and without the history excluded; batches of 3 users with jagged
    histories, some longer than the window, the last batch padded with dummy users; no invalid SID."""
    cfg = CONFIGS[name]
    codes, trie = _world()
    model, params = _models(cfg)
    hists = _histories(7, len(codes))
    kw = dict(beam_width=8, batch_size=3, max_items=5)
    want = GenerativeRetriever(model, VOCAB, trie, codes, **kw)
    got = JaxRetriever(params, cfg, VOCAB, trie, codes, **kw)
    rec = got.recommend(hists, k=8)
    _same_beams(rec, want.recommend(hists, k=8))
    assert rec.invalid == 0 and rec.beams == 7 * 8
    assert (np.diff(trie.items_flat(rec.codes.reshape(-1, 3))[1]) > 1).any()  # a beam's SID holds 2 items
    _same_beams(got.recommend(hists, k=5, exclude_history=True), want.recommend(hists, k=5, exclude_history=True))


def test_evaluate_matches_torch():
    """evaluate's metrics dict (recall, NDCG, coverage, exposure, invalid rate) equals the torch one's;
    a different batch size (other padding) gives the same beams."""
    cfg = CONFIGS["dense"]
    codes, trie = _world(seed=1)
    model, params = _models(cfg, seed=1)
    hists = _histories(10, len(codes), seed=1, longest=12)
    targets = np.random.default_rng(2).integers(0, len(codes), len(hists))
    popularity = np.random.default_rng(3).integers(0, 20, len(codes))
    kw = dict(beam_width=10, batch_size=4, max_items=8)
    jr = JaxRetriever(params, cfg, VOCAB, trie, codes, **kw)
    for excl in (False, True):
        want = GenerativeRetriever(model, VOCAB, trie, codes, **kw).evaluate(
            hists, targets, (1, 5, 10), exclude_history=excl, popularity=popularity)
        got = jr.evaluate(hists, targets, (1, 5, 10), exclude_history=excl, popularity=popularity)
        assert set(got) == set(want)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
        assert got["invalid_rate"] == 0.0
    other = JaxRetriever(params, cfg, VOCAB, trie, codes, beam_width=10, batch_size=7, max_items=8)
    _same_beams(other.recommend(hists, k=10), jr.recommend(hists, k=10))


def test_pallas_beam_search_matches_reference():
    """impl="pallas" (attention, MoE and beam step in interpret mode) gives the reference's beams."""
    cfg = CONFIGS["moe"].replace(num_hidden_layers=1, mlp_only_layers=())
    codes, trie = _world(seed=2, n_items=20)
    _, params = _models(cfg, seed=2)
    hists = _histories(2, len(codes), seed=2, longest=4)
    kw = dict(beam_width=4, batch_size=2, max_items=4)
    ref = JaxRetriever(params, cfg, VOCAB, trie, codes, impl="reference", **kw).recommend(hists, k=4)
    pal = JaxRetriever(params, cfg, VOCAB, trie, codes, impl="pallas", interpret=True, **kw).recommend(hists, k=4)
    _same_beams(pal, ref)


def test_packing_pads_to_static_shapes():
    """A batch packs to batch_size sequences of at most the window's prompt length, its length a bucket;
    every prompt sits at its sequence's start."""
    cfg = CONFIGS["dense"]
    codes, trie = _world()
    jr = JaxRetriever({}, cfg, VOCAB, trie, codes, beam_width=4, batch_size=5, max_items=6)
    hists = _histories(3, len(codes), seed=4)
    ids, cu, lens = jr._pack(hists)
    assert cu.shape == (6,) and cu[-1] == len(ids) == min(token_bucket(int(lens.sum())), 5 * jr.prompt_len)
    assert (np.diff(cu) <= jr.prompt_len).all() and (np.diff(cu) >= lens).all()
    assert list(lens[3:]) == [1, 1]
    for u, h in enumerate(hists):
        prompt = ids[cu[u]:cu[u] + lens[u]]
        assert lens[u] == 2 + 3 * min(len(h), 6)
        np.testing.assert_array_equal(prompt[2:].reshape(-1, 3), jr.sid_tokens[h[-6:]])
    assert [token_bucket(n) for n in (1, 64, 65, 512, 513, 1000, 1025)] == [64, 64, 128, 512, 640, 1024, 1280]


def test_bad_arguments_raise():
    cfg = CONFIGS["dense"]
    codes, trie = _world()
    for kw, name in ((dict(beam_width=0), "beam_width"), (dict(batch_size=0), "batch_size"),
                     (dict(max_items=0), "max_items"), (dict(max_items=1000), "max_items"),
                     (dict(impl="triton"), "impl")):
        with pytest.raises(ValueError, match=name):
            JaxRetriever({}, cfg, VOCAB, trie, codes, **kw)
    with pytest.raises(ValueError):
        JaxRetriever({}, cfg.replace(vocab_size=VOCAB.size + 1), VOCAB, trie, codes)
    jr = JaxRetriever({}, cfg, VOCAB, trie, codes, beam_width=4, batch_size=2)
    hist = [np.array([1, 2])]
    for call, name in ((lambda: jr.recommend(hist, k=0), "k"),
                       (lambda: jr.recommend([np.zeros(0, np.int64)]), "histories"),
                       (lambda: jr.recommend([np.array([len(codes)])]), "histories"),
                       (lambda: jr.recommend(hist, on_nonfinite="drop"), "on_nonfinite"),
                       (lambda: jr.search(hist * 3), "histories"),
                       (lambda: jr.evaluate(hist, [0], (5,)), "ks")):
        with pytest.raises(ValueError, match=name):
            call()
