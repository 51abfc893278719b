"""Generative retrieval with trie-constrained beam search (the metrics are :mod:`plumrec.metrics`), and
maximum-entropy exploration served by it (:mod:`plumrec.retrieval.explore`)."""
from plumrec.retrieval.explore import ExplorationPolicy, ModelOracle, fit_exploration
from plumrec.retrieval.generative import GenerativeRetriever, Recommendations

__all__ = ["GenerativeRetriever", "Recommendations", "ExplorationPolicy", "ModelOracle", "fit_exploration"]
