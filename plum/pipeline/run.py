"""``plum run``: the whole pipeline on a dataset directory, with the baselines, resumable.

1. item text (title + categories) -> sentence embeddings
   (:func:`plumrec.data.embed_texts`, cached on disk; ``--cache-dir``);
2. the plan: the steps of each training stage (:mod:`plumrec.pipeline.plan`);
3. the SASRec baseline, trained on the training sequences only, first when
   its item table is an input of the SIDs (``--collaborative-sids``, saved
   as ``OUT/sasrec_item_embeddings.npy``);
4. SIDs (SIDv2 tokenizer over the text embeddings, ``--extra-embeddings``,
   ``--item-attributes`` and the SASRec table) and the trie, fitted on one
   thread (multi-threaded fits are not bit-reproducible across processes);
5. CPT then SFT of the PLUM model (distilled from the SASRec baseline when
   ``sft.distill`` > 0), and with ``--sft-only`` PLUM's ablation: the same
   SFT from a fresh model, row ``sft_only``; ``--sft-epochs`` sets SFT's
   length in epochs of its examples, ``--sft-eval-every`` / ``--sft-patience``
   score it on validation users during training, stop early and keep the best
   (:func:`plumrec.pipeline.stages.run_sft`);
6. trie-constrained beam search over every item for every user of
   ``--split`` (``--max-users``: the first N), and the baselines on the same
   users: popularity and SASRec;
7. the results table and ``OUT/results*.json`` (:mod:`plumrec.pipeline.report`).

The defaults come from ``--config`` (:mod:`plumrec.pipeline.defaults`;
``plumrec/configs/amazon.toml``, chosen on Amazon Beauty).

Resume: the same command with the same OUT continues. Finished stages (SID
artefacts, ``cpt/model``, ``sft/model``, per-model evaluations) are skipped;
an interrupted training stage continues from its last atomic checkpoint. A
re-run whose SID settings, seed or SID input embeddings differ from those
OUT's SIDs were fitted with is refused, naming the field
(:meth:`plumrec.pipeline.workspace.Workspace.sid`), and so is one whose model
or training settings differ from ``OUT/plan.json``'s
(:mod:`plumrec.pipeline.settings`). ``--split valid`` and
``--exclude-history`` on a finished OUT score its saved models under that
protocol, beside the other results; unless ``--one-protocol``, every run also
scores our rows under the other protocol (cached, so the finished OUT's
``--exclude-history`` run costs nothing more) and prints them.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from plumrec.baselines import Popularity
from plumrec.data import embed_texts, load_dataset, load_item_attributes
from plumrec.io import atomic_path, read_json, read_npy, resolve_dir, write_json
from plumrec.pipeline.options import check_item_embeddings
from plumrec.pipeline.plan import ATTR_FILE, COLLAB_FILE, make_plan, read_plan
from plumrec.pipeline.recipe import resolve_auto
from plumrec.pipeline.report import (
    EXPOSURE_KEYS,
    RESULT_KEYS,
    beam_tag,
    cached_evaluation,
    print_other_protocol,
    print_table,
    published_rows,
    sft_selection,
    split_tag,
)
from plumrec.pipeline.settings import TRAIN_STAGES
from plumrec.pipeline.stages import retriever, run_cpt, run_sft, run_sid, sasrec_baseline, training_popularity
from plumrec.pipeline.workspace import Workspace
from plumrec.train.distributed import default_device
from plumrec.train.loop import train

__all__ = ["run_dataset"]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _save_npy(path: Path, array) -> None:
    """``np.save`` to ``path`` atomically: a run stopped mid-write leaves no partial file to read."""
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def run_dataset(args, *, command: str) -> dict:
    """Run the pipeline of the checked options ``args`` (:func:`plumrec.pipeline.options.parse_run_args`);
    returns the results (also written to ``OUT/results*.json``). ``command``: the command line, kept in
    the results' metadata."""
    if args.threads:
        torch.set_num_threads(args.threads)
    run = _Run(args)
    args.auto = resolve_auto(args, run.dataset)  # "auto" codebook sizes and preset from the dataset's size
    run.embed_texts()
    run.plan()
    run.fit_sids()
    run.train_plum()
    results = run.evaluate(args.exclude_history)
    other = None if args.one_protocol else run.evaluate(not args.exclude_history)
    return run.write_results(results, command, other)


class _Run:
    """The state of one ``plum run``: its options, OUT, workspace, stage timings and SASRec baseline."""

    def __init__(self, args):
        self.args, self.out, self.progress = args, Path(args.out), not args.no_progress
        self.t_start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.state_path = self.out / "timings.json"  # stage times of earlier (resumed) runs
        self.prev = read_json(self.state_path) if self.state_path.exists() else {}
        if not isinstance(self.prev, dict):
            raise ValueError(f"{self.state_path}: expected a JSON object of stage seconds")
        self.emb_path = self.out / "item_embeddings.npy"
        self._sasrec = self._data = None

    def dataset(self):
        """The dataset of ``--dataset``, loaded on first use and kept for the stages before the workspace."""
        if self._data is None:
            self._data = load_dataset(self.args.dataset)
        return self._data

    def done(self, name: str, seconds: float) -> None:
        """Record a stage's seconds (0: skipped, keep the time of the run that did it)."""
        if seconds > 0 or name not in self.prev:
            self.prev[name] = seconds
        self.timings[name] = self.prev[name]
        write_json(self.state_path, self.prev, indent=1)

    def embed_texts(self) -> None:
        """Text embeddings of every item (cached by content hash), and the ``--item-attributes`` rows."""
        args, t0 = self.args, time.perf_counter()
        data = self.dataset() if not self.emb_path.exists() or args.item_attributes else None
        if not self.emb_path.exists():
            emb = embed_texts(data.item_texts(), model_dir=args.model_dir, cache_dir=args.cache_dir,
                              progress=self.progress)
            _save_npy(self.emb_path, emb)
        self.done("embeddings", time.perf_counter() - t0 if not self.prev.get("embeddings") else 0.0)
        if args.item_attributes:  # multi-hot, one row per item (rewritten each run: cheap, and follows the file)
            attrs = load_item_attributes(args.item_attributes, data.item_ids)
            _save_npy(self.out / ATTR_FILE, attrs)
            _log(f"item attributes: {attrs.shape[1]} from {args.item_attributes}, "
                 f"{int((attrs > 0).any(axis=1).sum())} of {len(attrs)} items have some")

    def plan(self) -> None:
        """OUT's plan (made now for a new OUT), the run config and the workspace."""
        args = self.args
        plan, cfg = read_plan(args, self.out, self.emb_path)
        self.ws = Workspace(cfg)
        for path, e in zip(args.extra_embeddings, self.ws.embeddings[1:]):
            check_item_embeddings("--extra-embeddings", path, e, self.ws.num_items)
        self.eval_set = getattr(self.ws.split, args.split)  # the users scored: test, or valid for model selection
        _log(f"data: {self.ws.num_items} items, {len(self.eval_set.targets)} {args.split} users")
        self.plan_ = plan if plan is not None else make_plan(self.ws, args, self.out, self.emb_path)
        self.cfg = self.ws.cfg
        _log(f"plan: steps {self.plan_['steps']} (s/step {self.plan_['seconds_per_step']})")

    def sasrec(self):
        """The SASRec baseline, trained on the training sequences once (resumed / reloaded from OUT/sasrec)."""
        if self._sasrec is None:
            t0 = time.perf_counter()
            model, data, tcfg, loss = sasrec_baseline(self.ws, self.args.sasrec_overrides)
            if train(model, data, tcfg, self.out / "sasrec", loss_fn=loss, desc="SASRec"):  # {}: finished before
                self.done("sasrec_train", time.perf_counter() - t0)
            self._sasrec = model
        return self._sasrec

    def fit_sids(self) -> None:
        """SIDs of the text (+ extra) embeddings and, with ``--collaborative-sids``, SASRec's item table."""
        collab, ws = self.out / COLLAB_FILE, self.ws
        if self.args.collaborative_sids and str(collab) not in self.cfg["data"]["embeddings"]:  # train SASRec now
            _save_npy(collab, self.sasrec().item_embeddings())
            ws.embeddings.append(read_npy(collab))
            self.cfg["data"]["embeddings"].append(str(collab))
        sid_info_path = self.out / "sid_info.json"
        if not (resolve_dir(self.out / "sid") / "codes.npy").exists() or not sid_info_path.exists():
            t0 = time.perf_counter()
            # One thread: with two, 50-epoch Beauty fits with one seed differ between processes
            # (one thread: bit-identical), and the fit is small (~25 s on a CPU).
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                self.sid_info = run_sid(ws, progress=self.progress)
            finally:
                torch.set_num_threads(threads)
            write_json(sid_info_path, self.sid_info, indent=None)
            self.done("sid", time.perf_counter() - t0)
        else:
            self.sid_info = read_json(sid_info_path)
            try:  # refuses SIDs fitted with other settings or on other embeddings (names the field)
                ws.sid()
            except ValueError as e:
                raise ValueError(f"{e}. Here: use a new --out, or this OUT's own options (--sid-overrides, "
                                 "--extra-embeddings; --item-attributes none or --no-collaborative-sids for an OUT "
                                 "made without them)") from None
            self.done("sid", 0.0)
        _log(f"SIDs {self.sid_info['codebook_sizes']} from embeddings of widths "
             f"{[e.shape[1] for e in ws.embeddings]}: {self.sid_info['unique_sid_fraction']:.2%} unique")

    def _teacher(self):
        return self.sasrec() if self.cfg["sft"].get("distill") else None

    def train_plum(self) -> None:
        """CPT then SFT (skipped when their model directories exist; resumed from checkpoints otherwise)."""
        ws, progress = self.ws, self.progress
        for name, fn in (("cpt", lambda: run_cpt(ws, progress=progress)),
                         ("sft", lambda: run_sft(ws, init="cpt", out="sft", progress=progress,
                                                 teacher=self._teacher()))):
            if (resolve_dir(self.out / name / "model") / "model.safetensors").exists():
                self.done(name, 0.0)
                continue
            t0 = time.perf_counter()
            fn()
            self.done(name, time.perf_counter() - t0)

    def evaluate(self, xh: bool) -> dict:
        """Every model's metrics on the scored users, history items excluded from the rankings when ``xh``
        (cached per model and protocol)."""
        args, ws, out, es = self.args, self.ws, self.out, self.eval_set
        self.n_users = len(es.targets) if args.max_users is None else min(args.max_users, len(es.targets))
        hist, tgt = list(es.histories)[:self.n_users], np.asarray(es.targets)[:self.n_users]
        ks = self.cfg["eval"]["ks"]
        suffix = split_tag(args.split, xh) + ("" if args.max_users is None else f"_first{self.n_users}")
        beam = beam_tag(args.beam_width)
        pop = training_popularity(ws)

        def generative(model_dir: Path):
            return lambda: retriever(ws, model_dir).evaluate(hist, tgt, ks, exclude_history=xh, return_ranks=True,
                                                             popularity=pop)

        results: dict[str, dict] = {}
        for model in ("plum", "sft_only") if args.sft_only else ("plum",):
            if model == "sft_only" and not (resolve_dir(out / "sft_only" / "model") / "model.safetensors").exists():
                t0 = time.perf_counter()  # PLUM's ablation: SFT (same steps) from a fresh model, not the CPT one
                run_sft(ws, init="scratch", out="sft_only", progress=self.progress, teacher=self._teacher())
                self.done("sft_only", time.perf_counter() - t0)
            model_dir = out / ("sft" if model == "plum" else model) / "model"
            results[model], t = cached_evaluation(out / f"eval_{model}{suffix}{beam}.json", generative(model_dir),
                                                  tgt, max(ks))
            self.done(f"eval_{model}{suffix}{beam}", t)
            _log(f"{model}: {results[model]}")
        results["popularity"] = Popularity(ws.split.train, ws.num_items).evaluate(hist, tgt, ks, exclude_history=xh,
                                                                                  popularity=pop)
        results["popularity"].setdefault("invalid_rate", 0.0)
        results["sasrec"], t = cached_evaluation(
            out / f"eval_sasrec{suffix}.json",
            lambda: self.sasrec().evaluate(hist, tgt, ks, exclude_history=xh, return_ranks=True, popularity=pop),
            tgt, max(ks))
        self.done(f"sasrec{suffix}", t)
        _log(f"sasrec: {results['sasrec']}")
        return results

    def metadata(self, command: str) -> dict:
        """What the results were measured with: data, protocol, plan, settings, machine, command, date."""
        args = self.args
        keys = ("sasrec_overrides", "sasrec_config", "extra_embeddings", "item_attributes", "collaborative_sids")
        return {
            "dataset": str(args.dataset), "items": int(self.ws.num_items), "split": args.split,
            "exclude_history": args.exclude_history, "test_users": int(self.n_users),
            "all_test_users": int(len(self.eval_set.targets)), "subsampled_users": args.max_users is not None,
            "budget_minutes": self.plan_["budget_minutes"],
            "training_seconds": sum(self.prev.get(k, 0.0) for k in ("cpt", "sft", "sft_only", "sasrec_train")),
            "plan": self.plan_, "sft_selection": sft_selection(self.out / "sft" / "metrics.jsonl"),
            "train_config": {k: {kk: v for kk, v in self.cfg[k].items() if kk != "progress"} for k in TRAIN_STAGES},
            "wall_seconds_this_run": time.perf_counter() - self.t_start, "stage_seconds": self.prev,
            "seed": args.seed, "beam_width": args.beam_width, "sft_only": args.sft_only,
            "model_preset": args.preset, "auto": getattr(args, "auto", {}), "model_overrides": args.model_overrides,
            "model_config": args.model_config,
            "sid_init_scale": args.sid_init_scale, "sid_overrides": args.sid_overrides,
            "train_overrides": args.train_overrides, **{k: getattr(args, k) for k in keys}, "config": args.config,
            "device": str(default_device()),
            "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch "
                    f"{torch.__version__}, {torch.get_num_threads()} threads",
            "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def write_results(self, results: dict, command: str, other: dict | None = None) -> dict:
        """Write ``OUT/results{protocol}{beam}.json``, print the table; returns what was written. ``other``:
        the metrics under the other protocol, kept as ``details["other_protocol"]`` and printed after it."""
        args = self.args
        table = _table(results)
        extra = {name: {k: v for k, v in r.items() if k not in RESULT_KEYS} for name, r in results.items()}
        meta = self.metadata(command)
        details = {"sid": self.sid_info, "metrics": extra, "published": published_rows(args.dataset)}
        if other is not None:
            details["other_protocol"] = {"exclude_history": not args.exclude_history, "rows": _table(other)}
        res = {**table, "details": details, "metadata": meta}
        res_path = self.out / f"results{split_tag(args.split, args.exclude_history)}{beam_tag(args.beam_width)}.json"
        write_json(res_path, res, indent=1)
        print_table(table, meta, self.sid_info)
        if other is not None:
            print_other_protocol(details["other_protocol"])
        print(f"wrote {res_path}")
        return res


def _table(results: dict) -> dict:
    """``{model: {metric: float}}``: the ranking metrics (0 where a model lacks one) and the exposure ones."""
    return {name: {**{k: float(r.get(k, 0.0)) for k in RESULT_KEYS},
                   **{k: float(r[k]) for k in EXPOSURE_KEYS if k in r}} for name, r in results.items()}
