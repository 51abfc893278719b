"""The ``plum`` command line.

Subcommands (the stages take a run configuration, JSON or TOML, see
:mod:`plumrec.pipeline.config`; without ``--config`` the defaults, i.e. the
embedded synthetic catalogue and the ``tiny`` model)::

    plum sid       --config run.toml     # SID tokenizer + trie
    plum cpt       --config run.toml     # continued pre-training
    plum sft       --config run.toml [--init cpt|scratch]
    plum eval      --config run.toml     # constrained beam search, Recall/NDCG@K
    plum recommend --config run.toml --history item_1,item_7 [-k 10] [--explore maxent --lam 0.1]
    plum explore-fit --config run.toml --lam 0.1 [-k 10] [--iters 20] [--out DIR]   # exploration policy
    plum demo      --out DIR             # the whole pipeline on the synthetic catalogue
    plum run       --dataset DIR --out OUT [--config amazon]   # the whole pipeline on a dataset directory
    plum trie-demo --out DIR             # SID trie build/query timings
    plum export-hf --model DIR --out DIR [--max-shard-size 5GB]   # a saved model as a Hugging Face checkpoint

``plum demo`` and ``plum run`` compare ``plum`` (CPT then SFT) with the
baselines (``popularity``, ``sasrec``; ``sft_only``, the same SFT from a fresh
model: always in the demo, with ``--sft-only`` in ``plum run``), print a
table and write ``results.json`` (:mod:`plumrec.pipeline.demo`,
:mod:`plumrec.pipeline.run`).

Exploration (:mod:`plumrec.retrieval.explore`): ``plum explore-fit`` fits the maximum-entropy
mixture over the users of ``eval.split`` (``--split``, ``--max-users``; history excluded as
``eval.exclude_history`` says), showing the Frank-Wolfe duality gap per iteration, and saves the
policy (default ``WORKDIR/explore``); ``plum recommend --explore maxent`` serves with
``--explore-policy DIR`` or, without one, with a policy fitted at ``--lam`` on the histories it
serves (``--history`` may be repeated: one list per history). ``--seed`` draws each history's
component.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import numpy as np

from plumrec.model.hf_export import DEFAULT_MAX_SHARD_SIZE, export_hf
from plumrec.pipeline import stages
from plumrec.pipeline.config import load_run_config
from plumrec.pipeline.demo import BACKENDS, RESULT_KEYS, demo, trie_demo
from plumrec.pipeline.options import add_run_arguments, check_run_arguments
from plumrec.pipeline.run import run_dataset
from plumrec.pipeline.workspace import Workspace, load_model
from plumrec.retrieval.explore import ExplorationPolicy, fit_exploration
from plumrec.train.distributed import dist_env, init_distributed, shutdown_distributed

__all__ = ["main", "RESULT_KEYS"]


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``plum`` parser and the subparsers that check their own options (``run``, ``recommend``,
    ``explore-fit``)."""
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
    p_rec = stage("recommend", "top-k items for one history (or several: --history again)")
    p_rec.add_argument("--history", required=True, action="append",
                       help="comma-separated raw item ids, oldest first; repeat for several users")
    p_rec.add_argument("-k", type=int, default=10)
    p_rec.add_argument("--model", default=None)
    p_rec.add_argument("--explore", choices=EXPLORE, default="none",
                       help="maxent: serve a maximum-entropy exploration policy (plumrec.retrieval.explore)")
    p_rec.add_argument("--explore-policy", default=None, help="saved policy (plum explore-fit); default: fit one "
                       "on the histories served, at --lam")
    _explore_arguments(p_rec)
    p_fit = stage("explore-fit", "fit a maximum-entropy exploration policy over a set of users")
    p_fit.add_argument("--model", default=None, help="saved model dir (default WORKDIR/sft/model)")
    p_fit.add_argument("-k", type=int, default=10, help="list length the policy is fitted for")
    p_fit.add_argument("--split", choices=("test", "valid"), default=None, help="users (default eval.split)")
    p_fit.add_argument("--max-users", type=int, default=None, help="the first N users of the split")
    p_fit.add_argument("--out", default=None, help="policy directory (default WORKDIR/explore)")
    _explore_arguments(p_fit)

    p_demo = sub.add_parser("demo", help="run the main job on the embedded synthetic catalogue")
    p_demo.add_argument("--out", default="runs/demo", help="output directory")
    p_demo.add_argument("--config", default=None, help="optional run configuration to start from")
    p_demo.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p_demo.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="train and retrieve with torch (default) or the JAX twin (plumrec.jax: Pallas "
                             "kernels on a TPU, the jnp reference kernels elsewhere)")
    p_demo.add_argument("--no-progress", action="store_true")
    p_run = sub.add_parser("run", help="the whole pipeline on a dataset directory, with the baselines")
    add_run_arguments(p_run)
    p_trie = sub.add_parser("trie-demo", help="SID trie build/query timings on random SIDs")
    p_trie.add_argument("--out", default="runs/trie-demo", help="output directory")
    p_trie.add_argument("--items", type=int, default=1_000_000, help="number of generated SIDs")
    p_trie.add_argument("--seed", type=int, default=0)
    p_hf = sub.add_parser("export-hf", help="a saved model as a Hugging Face Qwen3 / Qwen3-MoE checkpoint")
    p_hf.add_argument("--model", required=True, help="saved model dir (e.g. WORKDIR/sft/model)")
    p_hf.add_argument("--out", required=True,
                      help="checkpoint directory to write: new, empty or an earlier export (replaced)")
    p_hf.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                      help=f"most bytes per safetensors file: 500MB, 2GiB, 100000 (default {DEFAULT_MAX_SHARD_SIZE})")
    return parser, {"run": p_run, "recommend": p_rec, "explore-fit": p_fit}


EXPLORE = ("none", "maxent")
DEFAULT_LAM, DEFAULT_ITERS = 0.1, 20


def _explore_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lam", type=float, default=None,
                   help=f"exploration weight lambda >= 0 of the fit (default {DEFAULT_LAM})")
    p.add_argument("--iters", type=int, default=None, help=f"Frank-Wolfe iterations (default {DEFAULT_ITERS})")
    p.add_argument("--seed", type=int, default=0, help="draws each user's component (default 0)")


def _check_explore_arguments(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """``p.error`` naming the flag for a bad or conflicting exploration option; fills in the defaults."""
    fitting = a.command == "explore-fit" or (a.explore == "maxent" and a.explore_policy is None)
    if a.command == "recommend" and a.explore == "none":
        used = [f for f, v in (("--lam", a.lam), ("--iters", a.iters), ("--explore-policy", a.explore_policy))
                if v is not None]
        if used:
            p.error(f"{', '.join(used)} need(s) --explore maxent")
    if a.command == "recommend" and a.explore_policy is not None:
        used = [f for f, v in (("--lam", a.lam), ("--iters", a.iters)) if v is not None]
        if used:
            p.error(f"{', '.join(used)}: --explore-policy serves a fitted policy; these set a fit")
    if a.lam is not None and not (math.isfinite(a.lam) and a.lam >= 0):
        p.error(f"--lam must be a finite number >= 0, got {a.lam}")
    if a.iters is not None and a.iters < 0:
        p.error(f"--iters must be >= 0, got {a.iters}")
    if a.seed < 0:
        p.error(f"--seed must be >= 0, got {a.seed}")
    if a.k < 1:
        p.error(f"-k must be >= 1, got {a.k}")
    if getattr(a, "max_users", None) is not None and a.max_users < 1:
        p.error(f"--max-users must be >= 1, got {a.max_users}")
    if fitting:
        a.lam = DEFAULT_LAM if a.lam is None else a.lam
        a.iters = DEFAULT_ITERS if a.iters is None else a.iters


def _histories(ws: Workspace, texts: list[str]) -> list[np.ndarray]:
    """Each comma-separated history of raw item ids as item indices (``ValueError`` naming unknown ids)."""
    index = ws.data.item_index()
    ids = [t.split(",") for t in texts]
    unknown = [h for row in ids for h in row if h not in index]
    if unknown:
        raise ValueError(f"unknown item ids in the history: {unknown[:5]}")
    return [np.asarray([index[h] for h in row], np.int64) for row in ids]


def _recommend(ws: Workspace, args) -> list:
    """``plum recommend``: one list of ``{"item", "title"}`` per ``--history`` (a single history: its list),
    with exploration if ``--explore maxent``."""
    hists = _histories(ws, args.history)
    r = stages.retriever(ws, args.model or ws.dir / "sft" / "model")
    if args.explore == "maxent":
        r.explore = (ExplorationPolicy.load(args.explore_policy, r.trie) if args.explore_policy else
                     fit_exploration(r, hists, lam=args.lam, k=args.k, iters=args.iters,
                                     progress=not args.no_progress))
    rec = r.recommend(hists, args.k, seed=args.seed)
    items = ws.data.items
    out = [[{"item": ws.data.item_ids[i], "title": (items[i].get("title") if items else None)} for i in lst]
           for lst in rec.items]
    return out[0] if len(out) == 1 else out


def _explore_fit(ws: Workspace, args) -> dict:
    """``plum explore-fit``: fit and save the policy; returns its summary."""
    split = args.split or ws.cfg["eval"]["split"]
    if split not in ("test", "valid"):
        raise ValueError(f"eval.split must be 'test' or 'valid', got {split!r}")
    hists = list(getattr(ws.split, split).histories)[:args.max_users]
    r = stages.retriever(ws, args.model or ws.dir / "sft" / "model")
    policy = fit_exploration(r, hists, lam=args.lam, k=args.k, iters=args.iters,
                             exclude_history=stages.exclude_history(ws), progress=not args.no_progress)
    out = policy.save(Path(args.out) if args.out else ws.dir / "explore")
    return {"policy": str(out), "users": len(hists), "split": split, "lam": policy.lam, "k": policy.k,
            "components": policy.num_components, "gaps": policy.gaps.tolist(),
            "objectives": policy.objectives.tolist()}


def _run_stage(args) -> object:
    """One stage over the run configuration of ``--config`` (``--workdir`` replacing its workdir); prints
    its result as JSON."""
    if args.command in ("cpt", "sft", "eval"):
        init_distributed()  # under torchrun: DDP (or FSDP2 with fsdp = true) / the users split over the ranks
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
    elif args.command == "explore-fit":
        out = _explore_fit(ws, args)
    else:
        out = _recommend(ws, args)
    if dist_env()[0] == 0:  # under torchrun rank 0 prints
        print(json.dumps(out, indent=1))
    shutdown_distributed()
    return out


def main(argv: list[str] | None = None) -> int:
    parser, subparsers = _parser()
    args = parser.parse_args(argv)
    if args.command in ("recommend", "explore-fit"):
        _check_explore_arguments(subparsers[args.command], args)
    if args.command == "demo":
        demo(args.out, config=args.config, threads=args.threads, progress=not args.no_progress, backend=args.backend)
    elif args.command == "run":
        command = shlex.join(["plum", *(sys.argv[1:] if argv is None else argv)])
        run_dataset(check_run_arguments(subparsers["run"], args), command=command)
    elif args.command == "trie-demo":
        trie_demo(args.out, num_items=args.items, seed=args.seed)
    elif args.command == "export-hf":
        model, vocab, text = load_model(args.model)
        print(json.dumps(export_hf(model, vocab, text, args.out, max_shard_size=args.max_shard_size), indent=1))
    else:
        _run_stage(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
