"""The ``plum`` command line.

Subcommands (the stages take a run configuration, JSON or TOML, see
:mod:`plumrec.pipeline.config`; without ``--config`` the defaults, i.e. the
embedded synthetic catalogue and the ``tiny`` model)::

    plum sid       --config run.toml     # SID tokenizer + trie
    plum cpt       --config run.toml     # continued pre-training
    plum sft       --config run.toml [--init cpt|scratch]
    plum eval      --config run.toml     # constrained beam search, Recall/NDCG@K
    plum recommend --config run.toml --history item_1,item_7 [-k 10]
    plum demo      --out DIR             # the whole pipeline on the synthetic catalogue
    plum run       --dataset DIR --out OUT [--config amazon]   # the whole pipeline on a dataset directory
    plum trie-demo --out DIR             # SID trie build/query timings

``plum demo`` and ``plum run`` compare ``plum`` (CPT then SFT) with the
baselines (``popularity``, ``sasrec``; ``sft_only``, the same SFT from a fresh
model: always in the demo, with ``--sft-only`` in ``plum run``), print a
table and write ``results.json`` (:mod:`plumrec.pipeline.demo`,
:mod:`plumrec.pipeline.run`).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from plumrec.pipeline import stages
from plumrec.pipeline.config import load_run_config
from plumrec.pipeline.demo import RESULT_KEYS, demo, trie_demo
from plumrec.pipeline.options import add_run_arguments, check_run_arguments
from plumrec.pipeline.run import run_dataset
from plumrec.pipeline.workspace import Workspace
from plumrec.train.distributed import init_distributed, shutdown_distributed

__all__ = ["main", "RESULT_KEYS"]


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``plum`` parser and its ``run`` subparser (which checks its own options)."""
    parser = argparse.ArgumentParser(prog="plum", description="PLUM generative recommendation")
    sub = parser.add_subparsers(dest="command", required=True)

    def stage(name: str, help: str):
        p = sub.add_parser(name, help=help)
        p.add_argument("--config", default=None, help="run configuration (.json or .toml); default: built-in")
        p.add_argument("--workdir", default=None, help="override the config's workdir")
        p.add_argument("--no-progress", action="store_true")
        return p

    stage("sid", "fit the SID tokenizer and build the trie")
    stage("cpt", "continued pre-training on SID histories + grounding text")
    p_sft = stage("sft", "supervised fine-tuning: history -> next SID")
    p_sft.add_argument("--init", choices=("cpt", "scratch"), default=None)
    p_eval = stage("eval", "constrained beam search evaluation (Recall/NDCG@K)")
    p_eval.add_argument("--model", default=None, help="saved model dir (default WORKDIR/sft/model)")
    p_rec = stage("recommend", "top-k items for one history")
    p_rec.add_argument("--history", required=True, help="comma-separated raw item ids, oldest first")
    p_rec.add_argument("-k", type=int, default=10)
    p_rec.add_argument("--model", default=None)

    p_demo = sub.add_parser("demo", help="run the main job on the embedded synthetic catalogue")
    p_demo.add_argument("--out", default="runs/demo", help="output directory")
    p_demo.add_argument("--config", default=None, help="optional run configuration to start from")
    p_demo.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p_demo.add_argument("--no-progress", action="store_true")
    p_run = sub.add_parser("run", help="the whole pipeline on a dataset directory, with the baselines")
    add_run_arguments(p_run)
    p_trie = sub.add_parser("trie-demo", help="SID trie build/query timings on random SIDs")
    p_trie.add_argument("--out", default="runs/trie-demo", help="output directory")
    p_trie.add_argument("--items", type=int, default=1_000_000, help="number of generated SIDs")
    p_trie.add_argument("--seed", type=int, default=0)
    return parser, p_run


def _run_stage(args) -> object:
    """One stage over the run configuration of ``--config`` (``--workdir`` replacing its workdir)."""
    if args.command in ("cpt", "sft"):
        init_distributed()  # under torchrun: DDP (or FSDP2 with fsdp = true in the config)
    ws = Workspace(load_run_config(args.config, **({"workdir": args.workdir} if args.workdir else {})))
    progress = not args.no_progress
    if args.command == "sid":
        out = stages.run_sid(ws, progress=progress)
    elif args.command == "cpt":
        out = stages.run_cpt(ws, progress=progress)
    elif args.command == "sft":
        out = stages.run_sft(ws, init=args.init, progress=progress)
    elif args.command == "eval":
        out = stages.run_eval(ws, args.model)
    else:
        out = stages.run_recommend(ws, args.history.split(","), args.k, args.model)
    shutdown_distributed()
    return out


def main(argv: list[str] | None = None) -> int:
    parser, run_parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.out, config=args.config, threads=args.threads, progress=not args.no_progress)
    elif args.command == "run":
        command = shlex.join(["plum", *(sys.argv[1:] if argv is None else argv)])
        run_dataset(check_run_arguments(run_parser, args), command=command)
    elif args.command == "trie-demo":
        trie_demo(args.out, num_items=args.items, seed=args.seed)
    else:
        print(json.dumps(_run_stage(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
