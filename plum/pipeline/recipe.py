"""The sizes of ``plum run``'s recipe from the catalogue and the log: ``"auto"`` SID codebook sizes and model preset.

A config (or ``--codebook-sizes auto`` / ``--preset auto``) that says ``"auto"`` gets them from the dataset:

- **codebook sizes** (:func:`codebook_sizes_for`): the first level has about :data:`ITEMS_PER_FIRST_CODE` items
  per code, a power of two between the bounds of :data:`FIRST_LEVEL`; the later levels are
  :data:`DEEPER_LEVELS`, doubled for every factor of 4 by which a first-level code holds more items than
  :data:`ITEMS_PER_FIRST_CODE` (the SIDs under one first-level code must stay apart). On Amazon Beauty,
  Toys and Sports (12k-18k items) this gives 1024/64/32/16, the sizes chosen on Beauty's validation; on 10M
  items 2048/1024/512/256, the sizes of the catalogue-scale benchmark.
- **model preset** (:func:`preset_for`): ``medium-deep`` (chosen on Beauty, where every larger model
  overfitted its 131k training targets) up to :data:`LARGE_LOG_TARGETS` training targets, ``plum-110m``
  from there (PLUM's claim that larger logs want larger models; not measured here yet).

Any explicit value replaces the rule: a list of sizes or a preset name.
"""
from __future__ import annotations

import math

from plumrec.data import load_dataset
from plumrec.data.splits import leave_one_out
from plumrec.pipeline.settings import model_config

__all__ = ["ITEMS_PER_FIRST_CODE", "FIRST_LEVEL", "DEEPER_LEVELS", "LARGE_LOG_TARGETS", "AUTO", "codebook_sizes_for",
           "preset_for", "training_targets", "resolve_auto"]

AUTO = "auto"
ITEMS_PER_FIRST_CODE = 16  # Beauty's 12,101 items over 1,024 first-level codes (docs/experiments/18), in log2 steps
FIRST_LEVEL = (64, 2048)  # the catalogue-scale benchmark's first level at 10M items is the upper bound
DEEPER_LEVELS = (64, 32, 16)  # Beauty's levels 2-4
MAX_LEVEL = 1024  # no deeper level wider than this
LARGE_LOG_TARGETS = 2_000_000  # training targets from which the larger preset is used
SMALL_LOG_PRESET, LARGE_LOG_PRESET = "medium-deep", "plum-110m"


def codebook_sizes_for(num_items: int) -> list[int]:
    """SID codebook sizes for a catalogue of ``num_items`` items (the module's rule)."""
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
        raise ValueError(f"num_items must be an integer >= 1, got {num_items!r}")
    first = 2 ** round(math.log2(max(num_items / ITEMS_PER_FIRST_CODE, 1)))
    first = min(max(first, FIRST_LEVEL[0]), FIRST_LEVEL[1])
    crowding = num_items / first / ITEMS_PER_FIRST_CODE  # items under one first-level code, over the target
    scale = 2 ** max(round(math.log2(crowding) / 2), 0) if crowding > 1 else 1
    return [first, *(min(n * scale, MAX_LEVEL) for n in DEEPER_LEVELS)]


def preset_for(num_targets: int) -> str:
    """The model preset for a log of ``num_targets`` SFT training targets (next items of the training split)."""
    if isinstance(num_targets, bool) or not isinstance(num_targets, int) or num_targets < 0:
        raise ValueError(f"num_targets must be an integer >= 0, got {num_targets!r}")
    return LARGE_LOG_PRESET if num_targets >= LARGE_LOG_TARGETS else SMALL_LOG_PRESET


def training_targets(sequences) -> int:
    """The next-item targets of the training sequences (``[L_u]`` arrays): one per item after the first of each."""
    return int(sum(max(len(s) - 1, 0) for s in sequences))


def resolve_auto(args, load=None) -> dict:
    """Replace ``"auto"`` in ``args.codebook_sizes`` / ``args.preset`` (parsed ``plum run`` options) by the rule's
    values for ``args.dataset``, and ``args.model_config`` by the preset's effective config; returns what was
    chosen (``{}`` when nothing was ``"auto"``), kept in the results' metadata. ``load() -> InteractionData``
    gives the dataset when one is needed (default: :func:`plumrec.data.load_dataset` of ``args.dataset``), so a
    caller that loads it anyway reads it once."""
    if args.codebook_sizes != AUTO and args.preset != AUTO:
        return {}
    data = load() if load is not None else load_dataset(args.dataset)
    chosen = {"items": int(data.num_items)}
    if args.codebook_sizes == AUTO:
        args.codebook_sizes = chosen["codebook_sizes"] = codebook_sizes_for(int(data.num_items))
    if args.preset == AUTO:
        chosen["training_targets"] = training_targets(leave_one_out(data).train)
        args.preset = chosen["preset"] = preset_for(chosen["training_targets"])
        args.model_config = model_config(args.preset, args.model_overrides)
    return chosen
