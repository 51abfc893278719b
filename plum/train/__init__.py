"""CPT and SFT for the PLUM LM (and the SASRec baseline's training): corpora, losses and the loop.

- ``corpus.py``: the CPT corpus and the SFT datasets (examples of :mod:`plumrec.sequences`);
- ``streaming.py``: the SFT dataset and the behaviour CPT corpus over an on-disk
  :class:`~plumrec.data.events.EventStore` (logs that do not fit in memory);
- ``config.py``: :class:`TrainConfig`, the settings of one run;
- ``losses.py``: :func:`lm_loss` (CPT) and the SFT loss settings' checks;
- ``codebook_loss.py``: :class:`CodebookLoss`, SFT's softmax over each target's SID codebook;
- ``distill.py``: the teacher labels of its distillation of an item model;
- ``optim.py``: AdamW, the learning-rate schedule and :class:`ParameterEMA`;
- ``distributed.py``: ``torchrun`` process groups, DDP / FSDP2;
- ``checkpoint.py``: atomic checkpoints and exact resume;
- ``loop.py``: :func:`train`.
"""
from plumrec.train.codebook_loss import CodebookLoss
from plumrec.train.config import TrainConfig
from plumrec.train.corpus import CPTCorpus, SequenceSFTDataset, SFTDataset, grounding_text
from plumrec.train.loop import train
from plumrec.train.losses import lm_loss
from plumrec.train.optim import ParameterEMA
from plumrec.train.streaming import StoreCPTCorpus, StoreSFTDataset

__all__ = ["CPTCorpus", "SequenceSFTDataset", "SFTDataset", "StoreCPTCorpus", "StoreSFTDataset", "grounding_text",
           "TrainConfig", "CodebookLoss", "ParameterEMA", "lm_loss", "train"]
