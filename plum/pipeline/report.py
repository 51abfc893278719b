"""The evaluations of ``plum run`` and its results table.

Each model's evaluation is cached in ``OUT/eval_MODEL{protocol}{beam}.json``
(protocol: ``_valid`` for the validation users, ``_xh`` with the history
excluded; ``_beamW`` for a beam width other than 20), and beside it
``eval_MODEL*.ranks.npz``: each user's target rank and the targets, so that
``benchmarks/compare_retrieval.py OUT_A OUT_B`` can compare two runs on the
same users with a paired standard error. The results are written to
``OUT/results{protocol}{beam}.json`` in ``plum demo``'s format (model ->
recall@5, recall@10, ndcg@5, ndcg@10, invalid_rate, and the exposure measures
of :data:`EXPOSURE_KEYS` where the evaluation has them) plus ``metadata``.
The printed table has a second block with the exposure of our rows' top-10
lists: coverage, entropy and Gini of the aggregate exposure, the tail items'
share and novelty (:mod:`plumrec.metrics`; popularity from the training split).
An evaluation cached before these measures existed shows ``-`` there.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from plumrec.io import atomic_path, read_json, write_json
from plumrec.metrics import HEAD_FRACTION
from plumrec.pipeline.options import MIN_BEAM_WIDTH

__all__ = ["RESULT_KEYS", "EXPOSURE_KEYS", "PUBLISHED", "split_tag", "beam_tag", "ranks_path", "cached_evaluation",
           "print_table"]

RESULT_KEYS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "invalid_rate")
EXPOSURE_KEYS = ("coverage@10", "entropy@10", "entropy_norm@10", "gini@10", "tail_exposure@10", "novelty@10")

# Published Amazon Beauty test numbers (the same S3-Rec leave-one-out split, full ranking), printed beside ours.
PUBLISHED = {
    "TIGER (paper)": {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384},
    "SASRec (TIGER table)": {"recall@5": 0.0387, "ndcg@5": 0.0249, "recall@10": 0.0605, "ndcg@10": 0.0318},
    "SASRec CE (RecBole)": {"recall@10": 0.0821, "ndcg@10": 0.0405},
}


def split_tag(split: str, exclude_history: bool) -> str:
    """The protocol in the names of cached evaluations and results: ``""``, ``"_valid"``, ``"_xh"``, ..."""
    return ("" if split == "test" else f"_{split}") + ("_xh" if exclude_history else "")


def beam_tag(beam_width: int) -> str:
    """Beam search's results depend on the width (the baselines' do not): another width, another file."""
    return "" if beam_width == MIN_BEAM_WIDTH else f"_beam{beam_width}"


def ranks_path(eval_json: Path) -> Path:
    """Where the per-user target ranks of an evaluation cached at ``eval_json`` are kept."""
    return eval_json.with_name(eval_json.stem + ".ranks.npz")


def cached_evaluation(path: Path, fn, targets: np.ndarray, k: int) -> tuple[dict, float]:
    """``fn() -> (metrics, ranks)`` run once: metrics cached at ``path`` (JSON), and the per-user
    target ranks (within the top ``k``) with the ``targets`` at :func:`ranks_path` (for
    ``compare_retrieval.py``). Returns ``(metrics, seconds)``, 0 seconds when cached."""
    if path.exists():
        return read_json(path), 0.0
    t0 = time.perf_counter()
    res, ranks = fn()
    with atomic_path(ranks_path(path)) as tmp:
        np.savez(tmp, ranks=ranks, targets=targets, k=k)
    write_json(path, res, indent=1)
    return res, time.perf_counter() - t0


def print_table(table: dict, meta: dict, sid_info: dict) -> None:
    """Our rows (``table``: model -> metrics) beside :data:`PUBLISHED`, with the run's setting."""
    users = f"{meta['test_users']} {meta['split']} users" + (
        f" (FIRST {meta['test_users']} OF {meta['all_test_users']}: subsampled)" if meta["subsampled_users"] else "")
    print(f"\nGenerative retrieval: {meta['items']} items, SIDs {tuple(sid_info['codebook_sizes'])} "
          f"({sid_info['unique_sid_fraction']:.1%} unique), {users}, full ranking, beam {meta['beam_width']}")
    if meta.get("exclude_history"):
        print("history items excluded from every ranking of our rows (RecBole's full-sort protocol)")
    budget = ("steps pinned by --steps (no budget)" if meta["plan"].get("seconds_per_step") is None
              else f"budget {meta['budget_minutes']} min training")
    print(f"{budget}, steps {meta['plan']['steps']}, training took {meta['training_seconds'] / 60:.1f} min, "
          f"this run {meta['wall_seconds_this_run'] / 60:.1f} min wall")
    cols = ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "invalid_rate")
    head = f"  {'model':<22}" + "".join(f"{k:>13}" for k in cols)
    print(head)
    print("  " + "-" * (len(head) - 2))
    for name, row in {**table, **PUBLISHED}.items():
        print(f"  {name:<22}" + "".join(f"{row[k]:>13.4f}" if k in row else f"{'-':>13}" for k in cols))
    if meta["split"] != "test":
        print(f"  (our rows: the {meta['split']} split; the published rows are test-split numbers)")
    _print_exposure(table)


def _print_exposure(table: dict) -> None:
    """The exposure block of the rows of ``table`` that have any of :data:`EXPOSURE_KEYS`."""
    rows = {name: row for name, row in table.items() if any(k in row for k in EXPOSURE_KEYS)}
    if not rows:
        return
    print(f"\nExposure of the top-10 lists (entropy in nats; tail: outside the {HEAD_FRACTION:.0%} most popular "
          "items in training; novelty: mean -log2 p_train, bits)")
    head = f"  {'model':<22}" + "".join(f"{k:>17}" for k in EXPOSURE_KEYS)
    print(head)
    print("  " + "-" * (len(head) - 2))
    for name, row in rows.items():
        print(f"  {name:<22}" + "".join(f"{row[k]:>17.4f}" if k in row else f"{'-':>17}" for k in EXPOSURE_KEYS))
