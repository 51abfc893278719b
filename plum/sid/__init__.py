"""Semantic IDs: the SID trie (C++) and the SID tokenizer (SIDv2 RQ-VAE).

The trie needs only numpy; the tokenizer and its quality report (torch) are
imported on first use, so ``from plum.sid import build_trie`` stays light.
"""
from plum.sid.trie import SIDTrie, TrieArrays, build_trie

_LAZY = {
    "SemanticIdTokenizer": "plum.sid.tokenizer",
    "SIDConfig": "plum.sid.tokenizer",
    "TIGER_CODEBOOKS": "plum.sid.tokenizer",
    "multi_resolution_codebooks": "plum.sid.tokenizer",
    "SIDQuality": "plum.sid.quality",
    "sid_quality": "plum.sid.quality",
}

__all__ = ["SIDTrie", "TrieArrays", "build_trie", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'plum.sid' has no attribute {name!r}")
