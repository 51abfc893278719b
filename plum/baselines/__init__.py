"""Baselines trained on the same data: most-popular items and a SASRec-style model."""
from plumrec.baselines.popularity import Popularity
from plumrec.baselines.sasrec import SASRec, SASRecConfig, SequenceDataset, sasrec_loss

__all__ = ["Popularity", "SASRec", "SASRecConfig", "SequenceDataset", "sasrec_loss"]
