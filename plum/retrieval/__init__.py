"""Generative retrieval with trie-constrained beam search (the metrics are :mod:`plumrec.metrics`)."""
from plumrec.retrieval.generative import GenerativeRetriever, Recommendations

__all__ = ["GenerativeRetriever", "Recommendations"]
