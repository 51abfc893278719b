"""Maximum-entropy exploration over the SID trie (Hazan et al. 2019): Frank-Wolfe over mixtures of top-K
lists that trades the model's log-probabilities for the entropy (or a KL to a target) of the aggregate
exposure; the exploration bias splits along the trie's paths into per-edge biases for the beam step
(docs/design.md, 'Maximum-entropy exploration')."""
from plumrec.explore.fit import fit_maxent, sample_list
from plumrec.explore.frank_wolfe import Mixture, dense_oracle, frank_wolfe
from plumrec.explore.objective import Regulariser, exploration_bias, objective, target_exposure
from plumrec.explore.trie import (
    BiasTables,
    EdgeBias,
    TriePaths,
    bias_split,
    edge_log_softmax,
    expand_beams,
    exposure_edge_bias,
    mixture_bias_tables,
    path_log_ratios,
    rank_beam_items,
    subtree_mass,
    trie_oracle,
)

__all__ = ["fit_maxent", "sample_list", "Mixture", "dense_oracle", "frank_wolfe", "Regulariser",
           "exploration_bias", "objective", "target_exposure", "BiasTables", "EdgeBias", "TriePaths",
           "edge_log_softmax", "expand_beams", "rank_beam_items", "exposure_edge_bias", "bias_split",
           "mixture_bias_tables",
           "path_log_ratios", "subtree_mass", "trie_oracle"]
