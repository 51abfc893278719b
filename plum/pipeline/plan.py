"""The run configuration of an OUT of ``plum run`` and its plan: the steps of each training stage.

``--budget-minutes M`` caps the *training* time: each stage gets its share of
it (``[run.budget]`` of the defaults), turned into a step count from a short
timed calibration run of that stage (``OUT/calibration/``). The step counts
are written to ``OUT/plan.json`` and reused on every later run with the same
OUT, so a run is deterministic for a seed given its plan; ``--steps
CPT,SFT,SASREC`` pins the steps and skips calibration. ``--sft-epochs E``
(``sft.epochs``) sets SFT's steps instead, from ``E`` epochs of its examples
(:func:`sft_epoch_steps`), so that a smaller catalogue does not train more
epochs for the same steps; ``--sft-eval-epochs`` (``sft.eval_epochs``) sets the
period of SFT's validation evaluations the same way. The SID fit and the
evaluations are outside the budget and are timed separately.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np

from plumrec.io import read_json, write_json
from plumrec.model.vocab import SIDVocab
from plumrec.pipeline.config import load_run_config, train_config
from plumrec.pipeline.settings import TRAIN_STAGES, check_run_settings, run_settings
from plumrec.pipeline.stages import base_model, cpt_corpus, sasrec_baseline, sft_dataset, sft_loss
from plumrec.pipeline.workspace import Workspace
from plumrec.train.loop import steps_for_epochs, train
from plumrec.train.losses import lm_loss

__all__ = ["CALIBRATION_STEPS", "COLLAB_FILE", "ATTR_FILE", "run_config", "sft_epoch_steps", "calibrate", "read_plan",
           "make_plan"]

CALIBRATION_STEPS = 3
COLLAB_FILE = "sasrec_item_embeddings.npy"  # SASRec's item table under OUT, with --collaborative-sids
ATTR_FILE = "item_attributes.npy"  # the multi-hot --item-attributes under OUT


def run_config(args, out: Path, emb_path: Path, steps: dict | None, eval_every: int | None = None) -> dict:
    """The run config of OUT: the defaults of ``--config`` with the options applied. Its
    ``data.embeddings`` are the text embeddings, ``--extra-embeddings``, the ``--item-attributes``
    (``OUT/item_attributes.npy``) and, with ``--collaborative-sids``, SASRec's item table once the
    run has written it. Without ``steps`` every stage gets ``CALIBRATION_STEPS + 1``; ``eval_every`` (the plan's,
    from ``--sft-eval-epochs``) sets ``sft.eval_every``."""
    d = args.defaults
    collab = [str(out / COLLAB_FILE)] if args.collaborative_sids and (out / COLLAB_FILE).exists() else []
    attrs = [str(out / ATTR_FILE)] if args.item_attributes else []
    sections = {k: dict(d[k]) for k in TRAIN_STAGES}
    for k in sections:
        sections[k]["steps"] = int(steps[k]) if steps else CALIBRATION_STEPS + 1
        sections[k]["progress"] = not args.no_progress
        sections[k]["warmup_steps"] = min(sections[k]["warmup_steps"], max(sections[k]["steps"] // 10, 1))
        sections[k].update(args.train_overrides.get(k, {}))  # an explicit warmup_steps is kept as given
    sections["sft"]["epochs"] = getattr(args, "sft_epochs", sections["sft"].get("epochs", 0))
    sections["sft"]["eval_epochs"] = getattr(args, "sft_eval_epochs", sections["sft"].get("eval_epochs", 0))
    if eval_every is not None:
        sections["sft"]["eval_every"] = eval_every
    return load_run_config(
        None, workdir=str(out), seed=args.seed,
        data={"path": args.dataset, "embeddings": [str(emb_path), *args.extra_embeddings, *attrs, *collab]},
        sid={**d["sid"], "codebook_sizes": args.codebook_sizes, "epochs": args.sid_epochs,
             "warmup_epochs": min(5, max(args.sid_epochs // 5, 1)), **args.sid_overrides},
        model={"preset": args.preset, "overrides": args.model_overrides, "sid_init_scale": args.sid_init_scale},
        cpt=sections["cpt"], sft=sections["sft"], sasrec=sections["sasrec"],
        eval={"beam_width": args.beam_width, "batch_size": args.eval_batch_size, "ks": [5, 10], "split": "test",
              "exclude_history": args.exclude_history})


def read_plan(args, out: Path, emb_path: Path) -> tuple[dict | None, dict]:
    """``(OUT's plan or None, the run config)``. A plan on record fixes the steps (``--steps`` must
    agree), and the options must give the settings it was trained with (``ValueError`` naming one)."""
    plan_path = out / "plan.json"
    plan = read_json(plan_path) if plan_path.exists() else None
    if plan is not None and not (isinstance(plan, dict) and "steps" in plan):
        raise ValueError(f"{plan_path}: expected a plan (a JSON object with 'steps'); use a new --out")
    if plan is not None and args.steps and plan.get("sft_epochs"):  # SFT's steps came from its epochs
        args.steps = {**args.steps, "sft": plan["steps"]["sft"]}
    if plan is not None and args.steps and args.steps != plan["steps"]:
        raise ValueError(f"{out} was planned with steps {plan['steps']}, not {args.steps}; use a new --out")
    if plan is not None and getattr(args, "sft_eval_epochs", 0) != plan.get("sft_eval_epochs", 0):
        raise ValueError(f"{out} was planned with --sft-eval-epochs {plan.get('sft_eval_epochs', 0):g}, not "
                         f"{getattr(args, 'sft_eval_epochs', 0):g}; give that or use a new --out")
    cfg = run_config(args, out, emb_path, plan["steps"] if plan else args.steps,
                     plan.get("sft_eval_every") if plan else None)
    if plan is not None:
        check_run_settings(out, plan, args, cfg)
        if "settings" not in plan:
            plan["settings"] = run_settings(args)
            write_json(plan_path, plan, indent=1)
    return plan, cfg


def make_plan(ws: Workspace, args, out: Path, emb_path: Path) -> dict:
    """The plan of a new OUT (steps from ``--steps`` or the budget and a calibration), written to
    ``OUT/plan.json``; ``ws.cfg`` becomes the run config with those steps."""
    shares = {k: args.defaults["run"]["budget"][k] for k in TRAIN_STAGES}
    budget_s = args.budget_minutes * 60
    if args.steps:
        per_step, steps = None, args.steps
    else:
        per_step = calibrate(ws, args, out)
        steps = {k: max(int(budget_s * shares[k] / per_step[k]), 10) for k in shares}
    epochs, eval_epochs = getattr(args, "sft_epochs", 0), getattr(args, "sft_eval_epochs", 0)
    if epochs:
        steps = {**steps, "sft": sft_epoch_steps(ws, epochs)}
    eval_every = sft_epoch_steps(ws, eval_epochs) if eval_epochs else None
    plan = {"budget_minutes": None if args.steps else args.budget_minutes, "shares": shares,
            "seconds_per_step": per_step, "steps": steps, **({"sft_epochs": epochs} if epochs else {}),
            **({"sft_eval_epochs": eval_epochs, "sft_eval_every": eval_every} if eval_epochs else {})}
    ws.cfg = run_config(args, out, emb_path, steps, eval_every)
    plan["settings"] = run_settings(args, ws.cfg)
    write_json(out / "plan.json", plan, indent=1)
    return plan


def sft_epoch_steps(ws: Workspace, epochs: float) -> int:
    """SFT's steps for ``epochs`` passes over its examples (:func:`plumrec.train.loop.steps_for_epochs` with
    the ``sft`` section's ``max_tokens`` and ``grad_accum``). Runs before the SID fit: the examples are built
    on random codes of the configured codebook sizes, which give the fitted SIDs' token counts."""
    sizes = tuple(ws.cfg["sid"]["codebook_sizes"])
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, n, ws.num_items) for n in sizes], axis=1)
    c = ws.cfg["sft"]
    data = sft_dataset(ws, SIDVocab(0, sizes), codes)
    return steps_for_epochs(data, epochs, max_tokens=c["max_tokens"], grad_accum=c.get("grad_accum", 1),
                            seed=ws.cfg["seed"])


def calibrate(ws: Workspace, args, out: Path) -> dict:
    """Seconds per training step of each stage, from CALIBRATION_STEPS steps (startup included,
    so the estimate errs on the slow side) in OUT/calibration/. Runs before the SID fit (whose
    input may be SASRec's item table): CPT and SFT are timed on random codes of the configured
    codebook sizes, which give the same token counts as the fitted SIDs."""
    cal = out / "calibration"
    shutil.rmtree(cal, ignore_errors=True)
    cal.mkdir(parents=True)
    base = dict(ws.cfg)
    per_step = {}
    sizes = tuple(base["sid"]["codebook_sizes"])
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, n, ws.num_items) for n in sizes], axis=1)
    # sft.distill's teacher costs its forward, not its training: an untrained SASRec times it
    teacher = sasrec_baseline(ws, args.sasrec_overrides)[0] if base["sft"].get("distill") else None
    for name in ("cpt", "sft"):
        ws.cfg = {**base, **{name: {**base[name], "progress": False}}}
        model, vocab, text = base_model(ws, sizes)
        c = ws.cfg[name]
        data = cpt_corpus(ws, vocab, text, codes) if name == "cpt" else sft_dataset(ws, vocab, codes)
        t0 = time.perf_counter()
        loss = lm_loss if name == "cpt" else sft_loss(ws, vocab, codes, teacher=teacher)
        tcfg = train_config({**c, "eval_every": 0, "patience": 0}, ws.cfg["seed"], False)  # timed without them
        train(model, data, tcfg, cal / name, loss_fn=loss, stop_after=CALIBRATION_STEPS)
        per_step[name] = (time.perf_counter() - t0) / CALIBRATION_STEPS
    ws.cfg = base
    model, data, tcfg, loss = sasrec_baseline(ws, args.sasrec_overrides)
    t0 = time.perf_counter()
    train(model, data, dataclasses.replace(tcfg, progress=False), cal / "sasrec", loss_fn=loss,
          stop_after=CALIBRATION_STEPS)
    per_step["sasrec"] = (time.perf_counter() - t0) / CALIBRATION_STEPS
    shutil.rmtree(cal, ignore_errors=True)
    return per_step
