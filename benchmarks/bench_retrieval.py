"""Generative retrieval on a dataset directory against the published numbers of Amazon Beauty, Toys or Sports.

    python benchmarks/bench_retrieval.py --dataset /work/shared/data/amazon-beauty --out runs/beauty \\
        [--budget-minutes 30] [--seed 0] [--beam-width 20] [--split valid] [--exclude-history] [--sft-only]

The same pipeline and options as ``plum run`` (:mod:`plumrec.pipeline.run`):
text embeddings, the SASRec baseline, SIDs, CPT, SFT distilled from SASRec,
trie-constrained beam search over every item, the popularity and SASRec
baselines on the same users, a table beside the dataset's published numbers and
``OUT/results*.json``; resumable with the same OUT. Its defaults are
``plumrec/configs/amazon.toml``, each with the comparison that chose it.
``benchmarks/compare_retrieval.py OUT_A OUT_B`` compares two runs on the same
users with paired standard errors.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from plumrec.pipeline.options import parse_run_args
from plumrec.pipeline.run import run_dataset


def parse_args(argv=None) -> argparse.Namespace:
    return parse_run_args(argv, prog="bench_retrieval.py", description=__doc__.split("\n\n")[0])


def main(argv=None) -> dict:
    command = shlex.join([Path(sys.executable).name, *sys.argv] if argv is None else ["bench_retrieval.py", *argv])
    return run_dataset(parse_args(argv), command=command)


if __name__ == "__main__":
    main()
