"""Semantic IDs: the SID trie (C++) and the SID tokenizer (SIDv2 RQ-VAE) with its quality report."""
from plumrec.sid.quality import SIDQuality, first_level_purity, sid_quality
from plumrec.sid.tokenizer import TIGER_CODEBOOKS, SemanticIdTokenizer, SIDConfig, multi_resolution_codebooks
from plumrec.sid.trie import SIDTrie, TrieArrays, build_trie

__all__ = ["SIDTrie", "TrieArrays", "build_trie", "SemanticIdTokenizer", "SIDConfig", "TIGER_CODEBOOKS",
           "multi_resolution_codebooks", "SIDQuality", "first_level_purity",
           "sid_quality"]
