"""Generative retrieval with trie-constrained beam search, and top-K metrics."""
from plum.retrieval.generative import GenerativeRetriever, Recommendations
from plum.retrieval.metrics import drop_history, topk_from_scores, topk_metrics

__all__ = ["GenerativeRetriever", "Recommendations", "drop_history", "topk_from_scores", "topk_metrics"]
