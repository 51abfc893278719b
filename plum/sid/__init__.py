"""Semantic IDs: the SID trie (C++) and the SID tokenizer."""
from plum.sid.trie import SIDTrie, TrieArrays, build_trie

__all__ = ["SIDTrie", "TrieArrays", "build_trie"]
