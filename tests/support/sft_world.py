"""The small SFT world that the corpus and SFT-loss tests share: 30 items with three-level SIDs, a word
tokenizer over their grounding text, a vocabulary with two feature tokens and 12 histories."""
from __future__ import annotations

import numpy as np

from plumrec.model import SIDVocab
from plumrec.model.vocab import train_word_tokenizer
from plumrec.train import grounding_text

SIZES = (8, 4, 4)


def sft_world(num_items: int = 30, seed: int = 0):
    """``(vocab, sid_tokens, text_tokenizer, items, sequences)`` over ``num_items`` items (codebooks
    :data:`SIZES`), the same for a seed."""
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, v, num_items) for v in SIZES], 1)
    items = [{"title": f"Thing {i}", "categories": [["topic a", "sub b"]]} for i in range(num_items)]
    text = train_word_tokenizer([grounding_text(m) for m in items])
    vocab = SIDVocab(text.vocab_size, SIZES, feature_tokens=("<|f0|>", "<|f1|>"))
    seqs = [rng.integers(0, num_items, rng.integers(2, 9)).astype(np.int64) for _ in range(12)]
    return vocab, vocab.sid_to_tokens(codes), text, items, seqs
