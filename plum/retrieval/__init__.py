"""Generative retrieval with trie-constrained beam search, and top-K metrics."""
from plum.retrieval.generative import GenerativeRetriever, Recommendations
from plum.retrieval.metrics import (drop_history, evaluate_lists, paired_difference, per_user_metric, target_ranks,
                                    topk_from_scores, topk_metrics)

__all__ = ["GenerativeRetriever", "Recommendations", "drop_history", "evaluate_lists", "paired_difference",
           "per_user_metric", "target_ranks", "topk_from_scores", "topk_metrics"]
