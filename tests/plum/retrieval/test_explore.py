"""Maximum-entropy exploration served by the generative retriever: the model-backed Frank-Wolfe oracle against
plain and exhaustive beam search, the fitted policy's serving, its files, and bad input."""
import numpy as np
import pytest
import torch
from explore_oracle import edge_paths

from plumrec.explore import Regulariser, TriePaths, expand_beams, exploration_bias, rank_beam_items, sample_list
from plumrec.model import ModelConfig, PlumLM, SIDVocab
from plumrec.retrieval import ExplorationPolicy, GenerativeRetriever, ModelOracle, fit_exploration
from plumrec.retrieval.explore import edge_path_sums, trie_signature
from plumrec.sid import build_trie

SIZES = (4, 3, 3)


def _world(seed=0, n_items=20, collisions=3):
    """A random float32 LM over SIDs of a 4 x 3 x 3 grid; the last ``collisions`` items share SIDs."""
    rng = np.random.default_rng(seed)
    grid = np.array([(a, b, c) for a in range(4) for b in range(3) for c in range(3)])
    codes = grid[rng.choice(len(grid), n_items, replace=False)]
    codes = np.concatenate([codes, codes[rng.choice(n_items, collisions, replace=False)]])
    vocab = SIDVocab(5, SIZES)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab.size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=32, moe_intermediate_size=16,
                      num_experts=4, num_experts_per_tok=2, mlp_only_layers=(0,), initializer_range=0.3)
    return PlumLM(cfg).eval(), vocab, codes, build_trie(codes, SIZES)


def _histories(rng, n, num_items):
    return [rng.choice(num_items, int(rng.integers(1, 5)), replace=False) for _ in range(n)]


def _retriever(world, **kw):
    model, vocab, codes, trie = world
    return GenerativeRetriever(model, vocab, trie, codes, **{"beam_width": 6, "batch_size": 3, **kw})


def _uniform(m):
    return np.zeros(m), np.full(m, 1.0 / m)


@pytest.mark.parametrize("exclude_history", [False, True])
def test_oracle_at_a_constant_bias_is_plain_beam_search(exclude_history):
    world = _world(1)
    r = _retriever(world)
    hists = _histories(np.random.default_rng(1), 7, r.num_items)
    lists, scores = ModelOracle(r, hists, 4, lam=1.0, exclude_history=exclude_history)(*_uniform(r.num_items))
    rec = r.recommend(hists, 4, exclude_history=exclude_history)
    assert lists.tolist() == [x.tolist() for x in rec.items]
    for u, items in enumerate(rec.items):  # each item scores its SID's beam
        beam = [int(np.flatnonzero((rec.codes[u] == world[2][i]).all(1))[0]) for i in items]
        np.testing.assert_array_equal(scores[u], rec.scores[u, beam])


def _exhaustive_scores(world, hists) -> np.ndarray:
    """``[N, M]``: every item's plain beam score, from a plain search as wide as the trie."""
    trie = world[3]
    rec = _retriever(world, beam_width=trie.num_sids).recommend(hists, trie.num_items)
    out = np.full((len(hists), trie.num_items), np.nan)
    for u in range(len(hists)):
        for w in range(trie.num_sids):
            out[u, trie.items(rec.codes[u, w][None])[0]] = rec.scores[u, w]
    assert np.isfinite(out).all()
    return out


@pytest.mark.parametrize("seed", [2, 3])
def test_biased_search_reports_unbiased_scores_and_ranks_by_the_biased_ones(seed):
    """As wide as the trie, the biased search is exact: its lists are the top K of (plain score + bias) over
    every item, and the scores it reports are the plain beam scores of those items."""
    world = _world(seed)
    r = _retriever(world, beam_width=world[3].num_sids)
    rng = np.random.default_rng(seed)
    hists = _histories(rng, 5, r.num_items)
    plain = _exhaustive_scores(world, hists)
    reg, lam, k = Regulariser.entropy(1e-3), 2.0, 4
    d = rng.dirichlet(np.full(r.num_items, 0.3))
    bias = exploration_bias(d, lam, k, reg)
    lists, scores = ModelOracle(r, hists, k, lam=lam, regulariser=reg)(bias, d)
    np.testing.assert_allclose(scores, np.take_along_axis(plain, lists, 1), rtol=1e-5, atol=1e-5)
    total = plain + bias[None, :]
    got = np.take_along_axis(total, lists, 1)
    np.testing.assert_allclose(got, -np.sort(-total, 1)[:, :k], rtol=1e-5, atol=1e-5)
    assert not np.array_equal(lists, np.argsort(-plain, 1, kind="stable")[:, :k]), "the bias must change lists"


def test_a_strong_bias_toward_one_item_puts_it_in_every_list():
    world = _world(4)
    r = _retriever(world, beam_width=3)
    rng = np.random.default_rng(4)
    hists = _histories(rng, 9, r.num_items)
    target = next(i for i in range(r.num_items) if not any(i in h for h in hists))
    oracle = ModelOracle(r, hists, 3, lam=60.0, regulariser=Regulariser.entropy(1e-9))
    plain, _ = oracle(*_uniform(r.num_items))
    assert not all(target in row for row in plain)
    d = np.full(r.num_items, 1.0 / (r.num_items - 1))
    d[target] = 0.0
    lists, _ = oracle(exploration_bias(d, 60.0, 3, oracle.reg), d)
    assert all(target in row for row in lists)


def test_ranking_under_collision_residuals_matches_a_brute_force_ranking():
    world = _world(5, collisions=6)
    paths = TriePaths(world[3])
    rng = np.random.default_rng(5)
    sids = np.unique(world[2], axis=0)
    B, W = 4, 7
    codes = np.stack([sids[rng.choice(len(sids), W, replace=False)] for _ in range(B)])
    scores = -np.sort(rng.random((B, W)), 1)
    scores[1, 5:] = -np.inf
    codes[1, 5:] = -1
    residual = -rng.random(world[3].num_items) * (rng.random(world[3].num_items) < 0.5)
    ranked = rank_beam_items(paths, codes, scores, residual)
    for u in range(B):   # brute force: every (item, beam) of a live beam, by score + residual, beam, group place
        cands = [(-(scores[u, b] + residual[i]), b, j, i) for b in range(W) if np.isfinite(scores[u, b])
                 for j, i in enumerate(world[3].items(codes[u, b][None])[0])]
        assert ranked[u][0].tolist() == [i for *_, i in sorted(cands)]
    expect = expand_beams(paths, codes, scores, residual, 6)
    assert [items[:6].tolist() for items, _ in ranked] == [[i for i in row if i >= 0] for row in expect.tolist()]
    for u, (items, beams) in enumerate(ranked):  # every item comes from the beam it names
        assert all(i in world[3].items(codes[u, b][None])[0] for i, b in zip(items, beams))


def test_edge_path_sums_add_up_each_items_path():
    trie = _world(6)[3]
    v = np.random.default_rng(6).standard_normal(trie.num_edges)
    paths = TriePaths(trie)
    np.testing.assert_allclose(edge_path_sums(trie, v)[paths.item_edge], paths.sums(v), rtol=1e-12)


def test_fit_serves_its_mixture_reproducibly_per_seed_and_user():
    world = _world(7)
    r = _retriever(world)
    hists = _histories(np.random.default_rng(7), 8, r.num_items)
    policy = fit_exploration(r, hists, lam=1.5, k=4, iters=6, exclude_history=True, progress=False)
    assert policy.num_components > 1 and policy.edge_bias.shape == (policy.num_components, world[3].num_edges)
    assert policy.edge_bias.dtype == np.float32 and len(policy.gaps) == 7
    r.explore = policy
    for seed in (0, 5):
        rec = r.recommend(hists, 4, exclude_history=True, seed=seed)
        again = r.recommend(hists, 4, exclude_history=True, seed=seed)
        comps = policy.components(np.arange(len(hists)), seed)
        assert [x.tolist() for x in rec.items] == [x.tolist() for x in again.items]
        assert [x.tolist() for x in rec.items] == [policy.mixture.lists[t, u].tolist() for u, t in enumerate(comps)]
        assert [x.tolist() for x in rec.items] == [sample_list(policy.mixture, u, seed).tolist()
                                                   for u in range(len(hists))]
        assert np.isfinite(rec.scores).all() and (rec.scores <= 0).all(), "scores are log-probabilities again"
    served = {tuple(policy.components(np.arange(len(hists)), s)) for s in range(6)}
    assert len(served) > 1, "other seeds draw other components"


def test_one_search_per_batch_equals_each_user_searched_alone_with_its_component():
    """Serving reads each user's row of the [T, E] tables in one search per batch; each user's beams, unbiased
    scores and items equal a search of that user alone with its component's [E] table."""
    world = _world(9)
    r = _retriever(world, batch_size=4)
    trie = world[3]
    hists = _histories(np.random.default_rng(9), 9, r.num_items)
    policy = fit_exploration(r, hists, lam=2.0, k=4, iters=6, progress=False)
    assert policy.num_components > 1
    r.explore = policy
    rec = r.recommend(hists, 4, seed=1)
    comps = policy.components(np.arange(len(hists)), 1)
    assert len(set(comps.tolist())) > 1, "the batches must mix components"
    plain = _retriever(world, batch_size=4)
    for u, t in enumerate(comps):
        row = policy.edge_bias[t]
        c, s = plain._search([hists[u]], torch.from_numpy(row.copy()) if row.any() else None)
        c, s = c.numpy(), s.numpy()
        np.testing.assert_array_equal(rec.codes[u], c[0])
        live = np.isfinite(s[0])
        path = np.array([row[e].sum(dtype=np.float64) for e in edge_paths(trie, np.maximum(c[0], 0))])
        np.testing.assert_allclose(rec.scores[u][live], (s[0] - path)[live], rtol=1e-5, atol=1e-5)
        items, _ = rank_beam_items(TriePaths(trie), c, s, policy.item_bias[t])[0]
        assert rec.items[u].tolist() == items[:4].tolist()


def test_a_lam_zero_policy_serves_plain_beam_search():
    world = _world(8)
    r = _retriever(world)
    hists = _histories(np.random.default_rng(8), 7, r.num_items)
    plain = r.recommend(hists, 5)
    policy = fit_exploration(r, hists, lam=0.0, k=5, iters=3, progress=False)
    assert policy.num_components == 1 and not policy.edge_bias.any() and not policy.item_bias.any()
    served = _retriever(world, explore=policy).recommend(hists, 5, seed=3)
    assert [x.tolist() for x in served.items] == [x.tolist() for x in plain.items]
    np.testing.assert_array_equal(served.codes, plain.codes)
    np.testing.assert_array_equal(served.scores, plain.scores)


def test_policy_files_round_trip_and_refuse_another_trie_or_damage(tmp_path):
    world = _world(9)
    r = _retriever(world)
    hists = _histories(np.random.default_rng(9), 6, r.num_items)
    policy = fit_exploration(r, hists, lam=1.0, k=4, iters=4, progress=False)
    policy.save(tmp_path / "p")
    back = ExplorationPolicy.load(tmp_path / "p", world[3])
    for name in ("edge_bias", "item_bias", "weights", "gaps", "objectives"):
        np.testing.assert_array_equal(getattr(back, name), getattr(policy, name))
    assert (back.lam, back.k, back.trie, back.users) == (policy.lam, policy.k, trie_signature(world[3]), 6)
    a = _retriever(world, explore=policy).recommend(hists, 4, seed=1)
    b = _retriever(world, explore=back).recommend(hists, 4, seed=1)
    assert [x.tolist() for x in a.items] == [x.tolist() for x in b.items]
    other = _world(10)
    with pytest.raises(ValueError, match="fitted on another SID trie"):
        ExplorationPolicy.load(tmp_path / "p", other[3])
    with pytest.raises(ValueError, match="fitted on another SID trie"):
        _retriever(other, explore=back)
    moved = build_trie(world[2][::-1].copy(), SIZES)  # same SIDs, other item order: same sizes, other arrays
    with pytest.raises(ValueError, match="its sha256"):
        back.check_trie(moved)
    meta = (tmp_path / "p" / "policy.json").read_text()
    (tmp_path / "p" / "policy.json").write_text(meta.replace('"lam": 1.0', '"lam": 2.0'))
    with pytest.raises(ValueError, match="policy.json is not the file"):
        ExplorationPolicy.load(tmp_path / "p")
    with pytest.raises(ValueError, match="not an exploration policy"):
        (tmp_path / "q").mkdir()
        (tmp_path / "q" / "policy.json").write_text("{}")
        ExplorationPolicy.load(tmp_path / "q")


def test_the_prompt_prefill_is_reused_across_oracle_calls(monkeypatch):
    world = _world(11)
    r = _retriever(world, batch_size=2)
    hists = _histories(np.random.default_rng(11), 5, r.num_items)
    calls = []
    prefill = r._prefill
    monkeypatch.setattr(r, "_prefill", lambda batch: calls.append(len(batch)) or prefill(batch))
    rng = np.random.default_rng(11)
    d = rng.dirichlet(np.ones(r.num_items))
    bias = exploration_bias(d, 1.0, 3, Regulariser.entropy())
    kept, fresh = ModelOracle(r, hists, 3, lam=1.0), ModelOracle(r, hists, 3, lam=1.0, cache_bytes=0)
    out_kept = [kept(bias, d), kept(*_uniform(r.num_items)), kept(bias, d)]
    assert calls == [2, 2, 1] and kept.cached == 3 and kept.calls == 3
    calls.clear()
    out_fresh = [fresh(bias, d), fresh(*_uniform(r.num_items)), fresh(bias, d)]
    assert calls == [2, 2, 1] * 3 and fresh.cached == 0
    for (l1, s1), (l2, s2) in zip(out_kept, out_fresh):
        np.testing.assert_array_equal(l1, l2)
        np.testing.assert_allclose(s1, s2, rtol=1e-6)


def test_bad_input_is_refused():
    world = _world(12)
    r = _retriever(world, beam_width=4)
    hists = _histories(np.random.default_rng(12), 3, r.num_items)
    for k in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="k must be an int in"):
            ModelOracle(r, hists, k, lam=1.0)
    with pytest.raises(ValueError, match="histories must hold"):
        ModelOracle(r, [], 2, lam=1.0)
    with pytest.raises(ValueError, match="at least one item"):
        ModelOracle(r, [np.array([1]), np.zeros(0, np.int64)], 2, lam=1.0)
    with pytest.raises(ValueError, match="cache_bytes"):
        ModelOracle(r, hists, 2, lam=1.0, cache_bytes=-1)
    oracle = ModelOracle(r, hists, 2, lam=1.0)
    with pytest.raises(ValueError, match="bias must be"):
        oracle(np.zeros(3), np.ones(3) / 3)
    d = np.full(r.num_items, 1.0 / r.num_items)
    d[0] = 0.5
    with pytest.raises(ValueError, match="the split of d differs from bias"):
        oracle(exploration_bias(d / d.sum(), 2.0, 2, oracle.reg), d / d.sum())
    with pytest.raises(ValueError, match="fewer than k = 4"):
        ModelOracle(r, [np.arange(r.num_items)], 4, lam=0.0, exclude_history=True)(*_uniform(r.num_items))
    with pytest.raises(ValueError, match="iters must be"):
        fit_exploration(r, hists, lam=1.0, k=2, iters=-1, progress=False)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        r.recommend(hists, 2, seed=-1)
    policy = fit_exploration(r, hists, lam=1.0, k=2, iters=2, progress=False)
    with pytest.raises(ValueError, match="users must be"):
        policy.components(np.array([-1, 0]))
    with pytest.raises(ValueError, match="seed must be"):
        policy.components(np.arange(2), seed=1.5)
    with pytest.raises(ValueError, match="weights must be"):
        ExplorationPolicy(policy.edge_bias, policy.item_bias, policy.weights * 2, 1.0, 2, policy.trie, policy.gaps,
                          policy.objectives)
    with pytest.raises(ValueError, match="edge_bias must be"):
        ExplorationPolicy(policy.edge_bias[:, :-1], policy.item_bias, policy.weights, 1.0, 2, policy.trie,
                          policy.gaps, policy.objectives)
