"""A seeded synthetic catalogue: the embedded default for the demo and the tests.

Generative story (all draws from ``numpy.random.default_rng(seed)``):

1. ``num_topics`` topics, each split into ``subtopics_per_topic`` subtopics.
   Every topic has its own vocabulary of pronounceable pseudo-words, every
   subtopic a few words of its own, and there is a small generic vocabulary
   shared by all ("classic", "set", ...).
2. Items get a topic (uniformly) and a subtopic within it. Titles and
   descriptions are drawn from the item's subtopic, topic and the generic
   words; popularity is Zipfian over a random ranking of all items
   (``popularity[i] ∝ 1 / rank_i ** zipf_exponent``).
3. Users get a sparse topic mixture ``theta_u ~ Dirichlet(user_concentration)``
   and a session length in ``[min_length, max_length]``. The first item's
   topic is drawn from ``theta_u``; each next item stays in the previous
   item's topic with probability ``p_stay`` (and then in its subtopic with
   probability ``p_same_subtopic``), otherwise its topic is redrawn from
   ``theta_u``. Within the chosen topic/subtopic the item is drawn by
   popularity; immediate repeats are excluded.

So the next item depends strongly on the previous item's topic and on the
user's topics, which a model can learn and which global popularity cannot
capture (``tests/plum/data/test_synthetic.py`` checks that a topic-aware predictor
beats popularity by a wide margin).

Two cheap content embeddings come with it, so the SID tokenizer and the demo
never need the text model:

- ``"text"``: bag of words of title + description (35% subtopic, 55% topic, 10% generic words;
  TF, square-rooted)
  through a fixed Gaussian random projection, L2-normalised;
- ``"meta"``: topic centre + subtopic offset + item noise (a stand-in for a
  second modality such as image or metadata embeddings).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from plumrec.data.interactions import InteractionData

__all__ = ["SyntheticConfig", "SyntheticCatalogue", "make_synthetic_catalogue"]

_GENERIC = (
    "classic new premium set pack mini original deluxe daily pro travel value "
    "gentle everyday limited edition"
).split()
_CONSONANTS = "bcdfghjklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class SyntheticConfig:
    num_items: int = 2000
    num_users: int = 1000
    num_topics: int = 16
    subtopics_per_topic: int = 4
    words_per_topic: int = 24
    words_per_subtopic: int = 6
    min_length: int = 5
    max_length: int = 20
    zipf_exponent: float = 1.0
    user_concentration: float = 0.15
    p_stay: float = 0.75
    p_same_subtopic: float = 0.6
    text_dim: int = 64
    meta_dim: int = 32
    seed: int = 0

    def __post_init__(self):
        for name in ("num_items", "num_users", "num_topics", "subtopics_per_topic",
                     "words_per_topic", "words_per_subtopic", "text_dim", "meta_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.min_length <= self.max_length:
            raise ValueError(
                f"need 2 <= min_length <= max_length, got {self.min_length}, {self.max_length}"
            )
        for name in ("p_stay", "p_same_subtopic"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.zipf_exponent < 0 or self.user_concentration <= 0:
            raise ValueError("zipf_exponent must be >= 0 and user_concentration > 0")
        if self.num_items < self.num_topics * self.subtopics_per_topic:
            raise ValueError(
                f"num_items ({self.num_items}) must be >= num_topics * subtopics_per_topic "
                f"({self.num_topics * self.subtopics_per_topic}) so that no subtopic is empty"
            )


@dataclass(frozen=True)
class SyntheticCatalogue:
    config: SyntheticConfig
    data: InteractionData
    topics: np.ndarray  # int64 [N] topic of each item
    subtopics: np.ndarray  # int64 [N] global subtopic id (topic * S + s)
    popularity: np.ndarray  # float64 [N] sampling weight, sums to 1
    user_topics: np.ndarray  # float64 [U, T] topic mixture of each user
    embeddings: dict[str, np.ndarray] = field(repr=False)  # "text" [N, text_dim], "meta" [N, meta_dim]


def _pseudo_words(rng: np.random.Generator, count: int, taken: set[str]) -> list[str]:
    words: list[str] = []
    while len(words) < count:
        syllables = rng.integers(2, 4)
        w = "".join(
            _CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
            for _ in range(syllables)
        )
        if w not in taken:
            taken.add(w)
            words.append(w)
    return words


def _weighted_pick(rng, candidates: np.ndarray, cum: np.ndarray, exclude: int) -> int:
    """Draw from ``candidates`` with cumulative weights ``cum``, never ``exclude``."""
    for _ in range(32):
        k = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
        item = int(candidates[min(k, len(candidates) - 1)])
        if item != exclude:
            return item
    others = candidates[candidates != exclude]
    return int(others[rng.integers(len(others))]) if len(others) else exclude


def make_synthetic_catalogue(config: SyntheticConfig | None = None, **overrides) -> SyntheticCatalogue:
    """Build the catalogue; ``make_synthetic_catalogue(num_items=500, seed=3)`` works too."""
    if config is None:
        config = SyntheticConfig(**overrides)
    elif overrides:
        raise TypeError("pass either a SyntheticConfig or keyword overrides, not both")
    c = config
    rng = np.random.default_rng(c.seed)
    T, S, N = c.num_topics, c.subtopics_per_topic, c.num_items

    taken = set(_GENERIC)
    topic_words = [_pseudo_words(rng, c.words_per_topic, taken) for _ in range(T)]
    sub_words = [[_pseudo_words(rng, c.words_per_subtopic, taken) for _ in range(S)] for _ in range(T)]

    # Items: every subtopic gets at least one item, the rest uniformly.
    sub = np.concatenate([np.arange(T * S), rng.integers(0, T * S, N - T * S)])
    sub = sub[rng.permutation(N)].astype(np.int64)
    topics = sub // S
    ranks = rng.permutation(N)
    pop = 1.0 / (ranks + 1.0) ** c.zipf_exponent
    pop /= pop.sum()

    items = _item_metadata(rng, topics, sub % S, topic_words, sub_words)
    theta, sequences = _sessions(rng, c, topics, sub, pop)
    text, meta_emb = _content_embeddings(rng, c, items, sorted(taken), topics, sub)
    data = InteractionData(
        sequences=tuple(sequences),
        user_ids=tuple(f"user_{u}" for u in range(c.num_users)),
        item_ids=tuple(f"item_{i}" for i in range(N)),
        items=tuple(items),
    )
    return SyntheticCatalogue(
        config=c,
        data=data,
        topics=topics,
        subtopics=sub,
        popularity=pop,
        user_topics=theta,
        embeddings={"text": text.astype(np.float32), "meta": meta_emb.astype(np.float32)},
    )


def _item_metadata(rng, topics: np.ndarray, subtopic: np.ndarray, topic_words, sub_words) -> list[dict]:
    """Every item's title (subtopic word, topic word, generic word, number), description and categories."""
    items = []
    for i in range(len(topics)):
        t, s = int(topics[i]), int(subtopic[i])
        tw, sw = topic_words[t], sub_words[t][s]
        title = " ".join([
            sw[rng.integers(len(sw))].capitalize(),
            tw[rng.integers(len(tw))].capitalize(),
            _GENERIC[rng.integers(len(_GENERIC))],
            f"no. {i}",
        ])
        desc_words = []
        for _ in range(int(rng.integers(10, 15))):
            r = rng.random()
            pool = sw if r < 0.35 else tw if r < 0.9 else _GENERIC
            desc_words.append(pool[rng.integers(len(pool))])
        items.append({
            "title": title,
            "description": " ".join(desc_words).capitalize() + ".",
            "categories": [[f"topic {t}", f"subtopic {t}.{s}"]],
        })
    return items


def _sessions(rng, c: SyntheticConfig, topics: np.ndarray, sub: np.ndarray,
              pop: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(theta [U, T], sequences)``: each user's topic mixture and item sequence (module docstring)."""
    T, S = c.num_topics, c.subtopics_per_topic
    by_topic = [np.flatnonzero(topics == t) for t in range(T)]
    by_sub = [np.flatnonzero(sub == g) for g in range(T * S)]
    cum_topic = [np.cumsum(pop[ix]) for ix in by_topic]
    cum_sub = [np.cumsum(pop[ix]) for ix in by_sub]
    theta = rng.dirichlet(np.full(T, c.user_concentration), size=c.num_users)
    theta_cum = np.cumsum(theta, axis=1)
    sequences = []
    for u in range(c.num_users):
        length = int(rng.integers(c.min_length, c.max_length + 1))
        seq = np.empty(length, np.int64)
        prev = -1
        for k in range(length):
            if prev >= 0 and rng.random() < c.p_stay:
                if rng.random() < c.p_same_subtopic and len(by_sub[sub[prev]]) > 1:
                    g = int(sub[prev])
                    item = _weighted_pick(rng, by_sub[g], cum_sub[g], prev)
                else:
                    t = int(topics[prev])
                    item = _weighted_pick(rng, by_topic[t], cum_topic[t], prev)
            else:
                t = int(min(np.searchsorted(theta_cum[u], rng.random() * theta_cum[u, -1]), T - 1))
                item = _weighted_pick(rng, by_topic[t], cum_topic[t], prev)
            seq[k] = prev = item
        sequences.append(seq)
    return theta, sequences


def _content_embeddings(rng, c: SyntheticConfig, items: list[dict], vocab: list[str], topics: np.ndarray,
                        sub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(text [N, text_dim], meta [N, meta_dim])``: a random projection of each item's bag of words,
    L2-normalised, and a noisy point near its topic's and subtopic's centres."""
    N, T, S = len(items), c.num_topics, c.subtopics_per_topic
    word_id = {w: j for j, w in enumerate(vocab)}
    bow = np.zeros((N, len(vocab)))
    for i, meta in enumerate(items):
        for w in (meta["title"] + " " + meta["description"]).lower().replace(".", "").split():
            if w in word_id:
                bow[i, word_id[w]] += 1.0
    proj = rng.standard_normal((len(vocab), c.text_dim)) / np.sqrt(c.text_dim)
    text = np.sqrt(bow) @ proj
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    centres = rng.standard_normal((T, c.meta_dim))
    offsets = 0.5 * rng.standard_normal((T * S, c.meta_dim))
    meta_emb = centres[topics] + offsets[sub] + 0.3 * rng.standard_normal((N, c.meta_dim))
    return text, meta_emb
