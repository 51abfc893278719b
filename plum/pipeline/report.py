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
The published rows beside ours are the dataset's own (:func:`published_rows`: Amazon Beauty, Toys or
Sports, recognised from the dataset's folder or file name, each row with its protocol); another dataset
gets none. The printed table has a second block with the exposure of our rows' top-10
lists: coverage, entropy and Gini of the aggregate exposure, the tail items'
share and novelty (:mod:`plumrec.metrics`; popularity from the training split).
An evaluation cached before these measures existed shows ``-`` there.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from plumrec.io import atomic_path, read_json, write_json
from plumrec.metrics import HEAD_FRACTION
from plumrec.pipeline.options import MIN_BEAM_WIDTH

__all__ = ["RESULT_KEYS", "EXPOSURE_KEYS", "PUBLISHED", "PUBLISHED_BY_DATASET", "published_dataset", "published_rows",
           "print_other_protocol", "sft_selection", "split_tag", "beam_tag", "ranks_path", "cached_evaluation",
           "print_table"]

RESULT_KEYS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "invalid_rate")
EXPOSURE_KEYS = ("coverage@10", "entropy@10", "entropy_norm@10", "gini@10", "tail_exposure@10", "novelty@10")

_SPLIT = "S3-Rec 5-core leave-one-out, full ranking, test split"
_NOT_STATED = "history excluded: not stated"


def _row(r10: float, n10: float, note: str, r5: float | None = None, n5: float | None = None) -> dict:
    at5 = {} if r5 is None else {"recall@5": r5, "ndcg@5": n5}
    return {**at5, "recall@10": r10, "ndcg@10": n10, "protocol": note}


# Published test numbers on the Amazon 2014 datasets (S3-Rec's leave-one-out split, full ranking), per dataset:
# row name -> metrics and "protocol" (what the number was measured under, as far as its source says).
PUBLISHED_BY_DATASET: dict[str, dict[str, dict]] = {
    "Beauty": {
        "TIGER (paper)": _row(0.0648, 0.0384, f"TIGER (NeurIPS 2023) table, beam 20; {_NOT_STATED}", 0.0454, 0.0321),
        "SASRec (TIGER table)": _row(0.0605, 0.0318, f"SASRec row of TIGER's table; {_NOT_STATED}", 0.0387, 0.0249),
        "SASRec CE (RecBole)": _row(0.0821, 0.0405, "RecBole SASRec, cross-entropy; RecBole's full sort: history "
                                    "excluded"),
        "RPG": _row(0.0809, 0.0464, f"RPG (KDD 2025); {_NOT_STATED}"),
        "ActionPiece": _row(0.0775, 0.0424, f"ActionPiece (ICML 2025), beam 50, 5-way inference ensemble; "
                            f"{_NOT_STATED}"),
        "SASRec well tuned": _row(0.0928, 0.0531, "'SASRec is Still Strong' (range R@10 .0921-.0928, N@10 "
                                  f".0523-.0531; the top shown); {_NOT_STATED}"),
        "LLM SFT on SIDs": _row(0.0925, 0.0501, f"OneRec-style SFT of a 1.7B Qwen3 on SIDs; {_NOT_STATED}"),
    },
    "Toys": {
        "TIGER (paper)": _row(0.0712, 0.0432, f"TIGER (NeurIPS 2023) table, beam 20; {_NOT_STATED}", 0.0521, 0.0371),
        "SASRec (TIGER table)": _row(0.0675, 0.0374, f"SASRec row of TIGER's table; {_NOT_STATED}", 0.0463, 0.0306),
        "RPG": _row(0.0869, 0.0490, f"RPG (KDD 2025); {_NOT_STATED}"),
        "SASRec well tuned": _row(0.0970, 0.0580, f"'SASRec is Still Strong'; {_NOT_STATED}"),
        "LLM SFT on SIDs": _row(0.0946, 0.0541, f"OneRec-style SFT of a 1.7B Qwen3 on SIDs; {_NOT_STATED}"),
    },
    "Sports": {
        "TIGER (paper)": _row(0.0400, 0.0225, f"TIGER (NeurIPS 2023) table, beam 20; {_NOT_STATED}", 0.0264, 0.0181),
        "SASRec (TIGER table)": _row(0.0350, 0.0192, f"SASRec row of TIGER's table; {_NOT_STATED}", 0.0233, 0.0154),
    },
}
# Amazon Beauty's rows (the dataset the defaults were chosen on)
PUBLISHED = PUBLISHED_BY_DATASET["Beauty"]
# lower-case words of a dataset's folder or file name -> the dataset of PUBLISHED_BY_DATASET
_DATASET_WORDS = {"beauty": "Beauty", "toys": "Toys", "sports": "Sports"}


def published_dataset(dataset: str | os.PathLike) -> str | None:
    """The dataset of :data:`PUBLISHED_BY_DATASET` that the path or name ``dataset`` is (its last component,
    case-insensitive: ``amazon-beauty``, ``Beauty``, ``beauty_2014``, ``Toys_and_Games``, ``sports``, ...; for a
    file, e.g. ``Beauty.txt``, its name or else its folder's), or None when no one dataset matches."""
    if not isinstance(dataset, (str, os.PathLike)):
        raise TypeError(f"dataset must be a path or a name, got {type(dataset).__name__}")
    path = Path(dataset)
    names = [path.name] + ([path.parent.name] if path.suffix else [])
    for name in names:
        found = {canon for word, canon in _DATASET_WORDS.items() if word in name.lower()}
        if len(found) == 1:
            return found.pop()
    return None


def published_rows(dataset: str | os.PathLike) -> dict:
    """The published rows of ``dataset`` (:func:`published_dataset`): row name -> metrics and ``"protocol"``;
    ``{}`` for a dataset without published rows."""
    name = published_dataset(dataset)
    return {} if name is None else {row: dict(r) for row, r in PUBLISHED_BY_DATASET[name].items()}


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


def sft_selection(metrics_jsonl: Path) -> dict | None:
    """SFT's validation selection as its ``metrics.jsonl`` logged it: ``{"best_step", "best_eval", "last_step",
    "evaluations"}`` (the first step of the highest score, as the training loop keeps it); None without
    evaluations (selection off, or no such file)."""
    if not metrics_jsonl.is_file():
        return None
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    evals = [(r["step"], r["eval"]) for r in rows if r.get("eval") is not None]
    if not evals:
        return None
    best_step, best = max(evals, key=lambda e: (e[1], -e[0]))
    return {"best_step": best_step, "best_eval": best, "last_step": rows[-1]["step"], "evaluations": len(evals)}


def print_table(table: dict, meta: dict, sid_info: dict, dataset: str | os.PathLike | None = None) -> None:
    """Our rows (``table``: model -> metrics) beside the published rows of the dataset (``dataset``, by
    default ``meta["dataset"]``; :func:`published_rows`), each with its protocol, and the run's setting."""
    dataset = meta.get("dataset") if dataset is None else dataset
    published = published_rows(dataset) if dataset is not None else {}
    users = f"{meta['test_users']} {meta['split']} users" + (
        f" (FIRST {meta['test_users']} OF {meta['all_test_users']}: subsampled)" if meta["subsampled_users"] else "")
    print(f"\nGenerative retrieval: {meta['items']} items, SIDs {tuple(sid_info['codebook_sizes'])} "
          f"({sid_info['unique_sid_fraction']:.1%} unique), {users}, full ranking, beam {meta['beam_width']}")
    if meta.get("exclude_history"):
        print("history items excluded from every ranking of our rows (RecBole's full-sort protocol)")
    budget = ("steps pinned by --steps (no budget)" if meta["plan"].get("seconds_per_step") is None
              else f"budget {meta['budget_minutes']} min training")
    if meta["plan"].get("sft_epochs"):
        budget += f", SFT {meta['plan']['sft_epochs']:g} epochs"
    if meta["plan"].get("sft_eval_epochs"):
        budget += (f", SFT model chosen on validation every {meta['plan']['sft_eval_epochs']:g} epochs "
                   f"({meta['plan']['sft_eval_every']} steps)")
    if meta.get("sft_selection"):
        sel = meta["sft_selection"]
        stopped = sel["last_step"] < meta["plan"]["steps"]["sft"]
        budget += f": best at step {sel['best_step']}" + (f", stopped at {sel['last_step']}" if stopped else "")
    print(f"{budget}, steps {meta['plan']['steps']}, training took {meta['training_seconds'] / 60:.1f} min, "
          f"this run {meta['wall_seconds_this_run'] / 60:.1f} min wall")
    cols = ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "invalid_rate")
    width = max(22, *(len(name) + 2 for name in {**table, **published}))
    head = f"  {'model':<{width}}" + "".join(f"{k:>13}" for k in cols)
    print(head)
    print("  " + "-" * (len(head) - 2))
    for name, row in {**table, **published}.items():
        print(f"  {name:<{width}}" + "".join(f"{row[k]:>13.4f}" if k in row else f"{'-':>13}" for k in cols))
    if not published:
        print(f"  (no published rows for this dataset: {dataset})")
    else:
        print(f"  published rows ({published_dataset(dataset)}, {_SPLIT}):")
        for name, row in published.items():
            print(f"    {name}: {row['protocol']}")
        if meta["split"] != "test":
            print(f"  (our rows: the {meta['split']} split; the published rows are test-split numbers)")
    _print_exposure(table)


def print_other_protocol(other: dict) -> None:
    """Our rows under the other protocol (``{"exclude_history": bool, "rows": {model: metrics}}``)."""
    what = "history items excluded" if other["exclude_history"] else "every item ranked (history items included)"
    cols = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
    print(f"\nOur rows under the other protocol: {what}")
    for name, row in other["rows"].items():
        print(f"  {name:<22}" + "".join(f"{row[k]:>13.4f}" for k in cols))


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
