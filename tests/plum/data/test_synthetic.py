"""The synthetic catalogue: determinism, shapes, and structure that a model
can learn but popularity alone cannot."""
from __future__ import annotations

import numpy as np
import pytest

from plumrec.data import SyntheticConfig, leave_one_out, make_synthetic_catalogue

SMALL = dict(num_items=600, num_users=400, num_topics=8, subtopics_per_topic=3)


def _same(a, b):
    assert a.data.item_ids == b.data.item_ids and a.data.items == b.data.items
    assert all(np.array_equal(x, y) for x, y in zip(a.data.sequences, b.data.sequences))
    for k in a.embeddings:
        np.testing.assert_array_equal(a.embeddings[k], b.embeddings[k])


def test_deterministic_for_a_seed():
    a, b = make_synthetic_catalogue(**SMALL, seed=7), make_synthetic_catalogue(**SMALL, seed=7)
    _same(a, b)
    c = make_synthetic_catalogue(**SMALL, seed=8)
    assert not all(np.array_equal(x, y) for x, y in zip(a.data.sequences, c.data.sequences))
    _same(a, make_synthetic_catalogue(SyntheticConfig(**SMALL, seed=7)))


def test_shapes_and_contents():
    cat = make_synthetic_catalogue(**SMALL, seed=1, text_dim=48, meta_dim=20)
    d = cat.data
    assert d.num_items == 600 and d.num_users == 400
    assert all(5 <= len(s) <= 20 for s in d.sequences)
    assert all(s[k] != s[k + 1] for s in d.sequences for k in range(len(s) - 1))  # no immediate repeats
    assert cat.embeddings["text"].shape == (600, 48) and cat.embeddings["meta"].shape == (600, 20)
    assert all(np.isfinite(e).all() for e in cat.embeddings.values())
    np.testing.assert_allclose(np.linalg.norm(cat.embeddings["text"], axis=1), 1.0, rtol=1e-5)
    assert len(set(cat.data.item_texts())) == 600  # titles carry the item number
    assert np.bincount(cat.subtopics, minlength=24).min() >= 1
    np.testing.assert_allclose(cat.popularity.sum(), 1.0)
    # Zipfian: the 10% most popular items get far more than 10% of interactions
    counts = np.sort(d.item_counts())[::-1]
    assert counts[:60].sum() > 0.3 * counts.sum()


def test_titles_come_from_the_topic_vocabulary():
    cat = make_synthetic_catalogue(**SMALL, seed=2)
    words = [set(t.lower().split()) for t in cat.data.item_texts(("title", "description"))]
    same, diff = [], []
    rng = np.random.default_rng(0)
    for _ in range(2000):
        i, j = rng.integers(600, size=2)
        if i == j:
            continue
        jac = len(words[i] & words[j]) / len(words[i] | words[j])
        (same if cat.topics[i] == cat.topics[j] else diff).append(jac)
    assert np.mean(same) > 3 * np.mean(diff)


def test_structure_beats_popularity():
    """Next-item Hit@10 on the leave-one-out test: the most popular training
    items of the previous item's topic beat the globally most popular items
    by a wide margin, and so does a predictor that uses only the content
    embeddings (nearest items to the previous one)."""
    cat = make_synthetic_catalogue(num_items=1000, num_users=800, seed=3)
    split = leave_one_out(cat.data)
    counts = np.bincount(np.concatenate(split.train), minlength=1000)
    prev = np.array([h[-1] for h in split.test.histories])
    targets = split.test.targets

    top_global = np.argsort(-counts, kind="stable")[:10]
    hit_pop = np.isin(targets, top_global).mean()

    hits_topic = []
    for p, t in zip(prev, targets):
        cand = np.flatnonzero(cat.topics == cat.topics[p])
        cand = cand[cand != p]
        hits_topic.append(t in cand[np.argsort(-counts[cand], kind="stable")][:10])
    hit_topic = np.mean(hits_topic)

    emb = cat.embeddings["meta"]
    sim = emb[prev] @ emb.T - 1e9 * (np.arange(1000)[None] == prev[:, None])
    score = sim + 0.5 * np.log1p(counts)[None]
    hit_content = np.mean([t in np.argsort(-s)[:10] for s, t in zip(score, targets)])

    assert hit_topic > 2 * hit_pop, (hit_topic, hit_pop)
    assert hit_content > 1.5 * hit_pop, (hit_content, hit_pop)


def test_user_topics_drive_sessions():
    cat = make_synthetic_catalogue(**SMALL, seed=4)
    # share of each user's items in their top topic vs. that topic's global share
    share, base = [], []
    global_topic = np.bincount(cat.topics[np.concatenate(cat.data.sequences)], minlength=8) / cat.data.num_interactions
    for u, s in enumerate(cat.data.sequences):
        top = int(np.argmax(cat.user_topics[u]))
        share.append(np.mean(cat.topics[s] == top))
        base.append(global_topic[top])
    assert np.mean(share) > 3 * np.mean(base)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_items=0), "num_items"),
        (dict(min_length=1), "min_length"),
        (dict(min_length=9, max_length=5), "min_length"),
        (dict(p_stay=1.5), "p_stay"),
        (dict(num_items=10, num_topics=4, subtopics_per_topic=4), "no subtopic is empty"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticConfig(**kwargs)


def test_config_and_overrides_are_exclusive():
    with pytest.raises(TypeError, match="not both"):
        make_synthetic_catalogue(SyntheticConfig(), seed=3)
