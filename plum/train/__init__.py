"""CPT and SFT for the PLUM LM: corpora, jagged packing and the training loop."""
from plum.train.corpus import (CPTCorpus, Example, ExampleStream, PackedBatch, SequenceSFTDataset, SFTDataset,
                               check_histories, grounding_text, pack)
from plum.train.loop import TrainConfig, lm_loss, train

__all__ = ["CPTCorpus", "Example", "ExampleStream", "PackedBatch", "SequenceSFTDataset", "SFTDataset",
           "check_histories", "grounding_text", "pack", "TrainConfig", "lm_loss", "train"]
