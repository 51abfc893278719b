"""Datasets, splits and item content for PLUM.

- :class:`InteractionData`: users' item sequences over a dense item index,
  with raw IDs and optional item metadata (``interactions.py``).
- Loaders for the LC-Rec/LETTER JSON pair, the S3-Rec/SASRec text format (and
  its item attributes) and CSV/TSV/Parquet tables, and :func:`load_dataset` to pick one (``formats.py``).
- :func:`leave_one_out`: the S3-Rec/TIGER split (``splits.py``).
- :func:`write_event_store` / :class:`EventStore`: users' item sequences on disk (CSR, memory-mapped),
  built from sorted Parquet shards in bounded memory, for logs that do not fit in RAM (``events.py``).
- :func:`make_synthetic_catalogue`: the seeded synthetic catalogue used by the
  demo and the tests (``synthetic.py``).
- :func:`embed_texts`: cached sentence embeddings from a local BERT
  sentence-transformers directory (``text.py``).
"""
from plumrec.data.events import EventStore, write_event_store
from plumrec.data.formats import (
    load_dataset,
    load_inter_json,
    load_interaction_table,
    load_item_attributes,
    load_items_json,
    load_sequences_txt,
)
from plumrec.data.interactions import InteractionData, cooccurrence_pairs, item_text
from plumrec.data.splits import EvalSet, LeaveOneOutSplit, leave_one_out
from plumrec.data.synthetic import SyntheticCatalogue, SyntheticConfig, make_synthetic_catalogue
from plumrec.data.text import TextEmbedder, embed_texts

__all__ = [
    "EventStore",
    "write_event_store",
    "InteractionData",
    "cooccurrence_pairs",
    "item_text",
    "load_dataset",
    "load_inter_json",
    "load_interaction_table",
    "load_item_attributes",
    "load_items_json",
    "load_sequences_txt",
    "EvalSet",
    "LeaveOneOutSplit",
    "leave_one_out",
    "SyntheticCatalogue",
    "SyntheticConfig",
    "make_synthetic_catalogue",
    "embed_texts",
    "TextEmbedder",
]

