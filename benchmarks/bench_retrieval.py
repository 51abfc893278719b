"""Generative retrieval on a real catalogue (issue 8): Amazon Beauty against TIGER.

    python benchmarks/bench_retrieval.py --dataset /work/shared/data/amazon-beauty --out runs/beauty \\
        [--budget-minutes 30] [--seed 0] [--beam-width 20]

The pipeline is ``plum demo``'s (the stages of :mod:`plum.train.stages`,
composed, not re-implemented) on a dataset directory read by
:func:`plum.data.load_dataset`:

1. item text (title + categories) -> all-MiniLM-L6-v2 embeddings
   (:func:`plum.data.embed_texts`, cached on disk; ``--cache-dir``);
2. the SASRec-style baseline (step 6) is trained first, on the training
   sequences only (``s[:-2]``: neither split's target), when its item table
   feeds the SIDs (``--collaborative-sids``, the default: text and SASRec
   embeddings are two inputs of SIDv2's multi-encoder, saved as
   ``OUT/sasrec_item_embeddings.npy``; +5-9% validation Recall@10 / NDCG@10
   on both protocols, benchmarks/RESULTS.md, sixth run); its
   :class:`plum.baselines.SASRecConfig` (hidden 64, 2 layers) takes
   ``--sasrec-overrides``, which then change the SIDs' table too;
3. SIDs with the Beauty-validated tokenizer (codebooks 1024/64/32/16 since
   the eleventh run: with the SFT EMA, +2.7% validation Recall@10 on two
   seeds over 256/128/64/32; otherwise the
   :class:`plum.sid.SIDConfig` defaults of issue 6 but a co-occurrence weight
   of 3.0 instead of 0.1: items bought one after the other get closer latents
   and so share SID prefixes, which raised PLUM's validation Recall@10 /
   NDCG@10 by 8% at 16 SFT epochs; benchmarks/RESULTS.md; other
   :class:`~plum.sid.SIDConfig` fields through ``--sid-overrides``) and the
   trie (``run_sid``), fitted on one thread (multi-threaded fits were not
   bit-reproducible across processes). ``--item-attributes auto`` fuses the
   dataset's S3-Rec item attributes (Beauty: brand and sub-categories) as one
   more input, multi-hot; off by default, as it moved no Beauty metric
   (RESULTS.md, seventeenth run);
4. CPT then SFT of the PLUM model (``run_cpt``, ``run_sft``; the ``--preset``
   model, ``medium-deep`` by default: ``medium`` (``tiny`` three times as
   wide with dropout 0.2, which beat ``small``, twice as wide with dropout
   0.1, on the full validation split at 16 and at 32 SFT epochs, as
   ``small`` had beaten ``tiny``, a wider ``tiny`` without dropout and a
   deeper one) with a third layer, a second MoE layer, which beat
   ``medium`` on the validation split over three seeds;
   benchmarks/RESULTS.md). SFT uses the
   ``sequence`` objective (:class:`plum.train.SequenceSFTDataset`: every next
   item of a user's window is a target of one example, the same targets as
   one-target-per-example SFT for ~1/5 of the tokens on Beauty) and the
   ``codebook`` loss (:class:`plum.train.loop.CodebookLoss`: softmax over the
   target level's codebook, the distribution beam search decodes); the SFT
   model kept is the exponential moving average of its weights
   (:class:`plum.train.loop.ParameterEMA`; ``--train-overrides '{"sft":
   {"ema_decay": 0}}'`` turns it off). It does not change training. The
   decay is ``min(ema_decay, (1 + t) / (ema_warmup + t))``, with
   ``ema_warmup`` 4 and ``ema_decay`` 0.9995. In 3,200 steps that decay
   is never reached (the run warns so), so the average at step t spans
   roughly its last t/3 steps. RESULTS.md: against no average, the tenth
   run's ``ema_warmup`` 10 (the last ~t/9 steps) gave +1.8% validation
   Recall@10 and +1.5% NDCG@10 on two seeds, with paired errors; the
   thirteenth run's t/3 window adds +1.4% validation and +2.2% test
   Recall@10 on both seeds, paired, with NDCG@10 flat to +2%).
   ``--train-overrides '{"sft": {"item_loss": w}}'`` adds the codebook
   loss's training-only item-level softmax over every SID, weighted ``w``;
   off by default, as ``w`` 0.25 tied on validation (RESULTS.md,
   nineteenth run). SFT distils the SASRec baseline below, frozen, into its
   codebook softmaxes (``sft.distill`` ``d`` = 0.5 since the twenty-fifth
   run; ``--train-overrides '{"sft": {"distill": 0}}'`` turns it off, and
   ``distill_temperature`` softens the teacher): each target's label is
   ``(1 - d)`` one-hot plus ``d`` times SASRec's next-item distribution
   restricted to the target's SID prefix
   (:class:`plum.train.loop.CodebookLoss`). It raised validation and test
   Recall@10 / NDCG@10 on every seed run (RESULTS.md, twenty-fourth and
   twenty-fifth runs); each SFT step adds the teacher's forward pass (at
   most 29% more SFT time measured on the CPU). PLUM still decodes alone,
   with no item table, but a gain so won is learnt from the very model it
   is compared with. ``--sid-init-scale s`` starts the SID token embeddings
   (tied with the output head) from the tokenizer's codewords, randomly
   projected, rows of mean norm ``s`` on top of the random init
   (:func:`plum.model.init_sid_embeddings`): the model then fits faster
   (training CE 0.35 nats lower at step 400, 0.18 at the end) and its top
   10 covers a third more of the catalogue, but at ``s`` 0.8 validation
   Recall@10 tied (RESULTS.md, twenty-second run), so it is off by default;
5. trie-constrained beam search (width ``--beam-width`` >= 20), full ranking
   over every item, every test user of the leave-one-out split (``run_eval``);
6. baselines on the same split: popularity and the SASRec-style model
   (full-softmax CE over all items); with ``--sft-only``, PLUM's ablation
   too: the same SFT from a fresh model (no CPT), row ``sft_only``.

Budget. ``--budget-minutes M`` caps the *training* time: CPT gets 35%, SFT
35%, SASRec 30% (:data:`BUDGET_SHARES`; SASRec's full softmax over every item
makes its steps the most expensive on the CPU, and it needs a few epochs). Each share becomes a step count from a short timed
calibration run of that stage (``OUT/calibration/``); the step counts are
written to ``OUT/plan.json`` and reused on every later run with the same OUT,
so a run is deterministic for a seed given its plan (pass ``--steps
CPT,SFT,SASREC`` to pin the steps and skip calibration entirely). The SID fit
and the evaluations are outside the budget and are timed separately.

Resume. Re-running the same command with the same OUT continues: finished
stages (SID artefacts, ``cpt/model``, ``sft/model``, per-model evaluation
JSONs) are skipped, an interrupted training stage continues from its last
atomic checkpoint (``checkpoint_every`` steps; exact resume, see
:mod:`plum.train.loop`). A re-run whose SID settings, seed or SID input
embeddings differ from those OUT's SIDs were fitted with is refused, naming
the field (:meth:`plum.train.stages.Workspace.sid`); so is one whose model
(the effective config of ``--preset`` with ``--model-overrides``, compared
field by field, so ``--preset medium --model-overrides
'{"num_hidden_layers": 3}'`` and ``--preset medium-deep`` resume each
other's OUTs) or training settings (``--train-overrides``, e.g. ``'{"sft":
{"lr": 1e-3}}'``; SASRec's window is SFT's ``max_items``; ``--sid-init-scale``)
differ from those in ``OUT/plan.json``.

Output: a table beside TIGER's published numbers (Rajput et al. 2023, Table
2, Beauty) and ``OUT/results.json`` in ``plum demo``'s format (model ->
recall@5, recall@10, ndcg@5, ndcg@10, invalid_rate) plus ``metadata``
(budget, wall time, device, command, plan, timings).

``--split valid`` scores the validation users instead (target ``s[-2]``,
history ``s[:-2]``; training never reads either split's target), for choosing
a setup without touching the test split; re-run with the same OUT after a
test run to score its saved models (cached as ``eval_*_valid.json``,
table in ``OUT/results_valid.json``).
``--exclude-history`` drops each user's history items from every model's
ranking before the cut to K (RecBole's full-sort protocol; no Beauty test or
validation target is in its history, so this only frees slots): a re-run with
the same OUT scores the saved models that way, into ``eval_*_xh.json`` and
``OUT/results_xh.json`` (``results_valid_xh.json`` with ``--split valid``).
The default ranks every item, history included.
``--max-users N`` evaluates only the first N users (smoke runs); the table
then says so. Reported numbers use every test user.

Beside each cached evaluation ``eval_M*.json`` the bench keeps
``eval_M*.ranks.npz`` (each user's target rank and the targets), so that
``benchmarks/compare_retrieval.py OUT_A OUT_B`` can compare two runs on the
same users with a paired standard error.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py

RESULT_KEYS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "invalid_rate")
BUDGET_SHARES = {"cpt": 0.35, "sft": 0.35, "sasrec": 0.3}
CALIBRATION_STEPS = 3

# Published Beauty numbers (same S3-Rec leave-one-out split, full ranking).
PUBLISHED = {
    "TIGER (paper)": {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384},
    "SASRec (TIGER table)": {"recall@5": 0.0387, "ndcg@5": 0.0249, "recall@10": 0.0605, "ndcg@10": 0.0318},
    "SASRec CE (RecBole)": {"recall@10": 0.0821, "ndcg@10": 0.0405},
}

# Beauty run configuration: the issue-6 SID tokenizer (SIDConfig defaults, but co-occurrence weight
# 3.0: +8% validation R@10 / N@10 over 0.1 at 16 SFT epochs, and 1024/64/32/16 codes, see the
# docstring) and the LM/SASRec training hyper-parameters; steps are filled in from the budget.
SID_CONFIG = {"codebook_sizes": [1024, 64, 32, 16], "epochs": 50, "warmup_epochs": 5, "hidden_dims": [256, 128],
              "latent_dim": 32, "batch_size": 1024, "cooccurrence_weight": 3.0}
TRAIN_CONFIG = {
    "cpt": {"lr": 3e-3, "warmup_steps": 30, "max_tokens": 4096, "behaviour_fraction": 0.7, "max_items": 20,
            "checkpoint_every": 100},
    "sft": {"lr": 3e-3, "warmup_steps": 20, "max_tokens": 4096, "max_items": 20, "init": "cpt",
            "objective": "sequence", "loss": "codebook", "checkpoint_every": 100, "ema_decay": 0.9995,
            "ema_warmup": 4, "distill": 0.5},
    "sasrec": {"lr": 3e-3, "warmup_steps": 10, "weight_decay": 0.0, "max_tokens": 2048, "checkpoint_every": 100},
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="dataset directory (plum.data.load_dataset)")
    p.add_argument("--out", required=True, help="output / work directory (re-use it to resume)")
    p.add_argument("--budget-minutes", type=float, default=30.0, help="total training time: CPT+SFT+SASRec")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beam-width", type=int, default=20, help="beam width of the constrained search (>= 20)")
    p.add_argument("--steps", default=None, help="CPT,SFT,SASREC steps: pin them instead of calibrating")
    p.add_argument("--preset", default="medium-deep", help="model preset (plum.model.config.PRESETS)")
    p.add_argument("--model-overrides", default="{}",
                   help="JSON of ModelConfig fields replacing the preset's, e.g. '{\"num_hidden_layers\": 4}' "
                        "or '{\"hidden_dropout\": 0.2}'")
    p.add_argument("--sid-init-scale", type=float, default=0.0,
                   help="add the SID tokenizer's codewords, randomly projected, to the SID token embeddings "
                        "at initialisation, rows of this mean norm (plum.model.init_sid_embeddings; default "
                        "%(default)s: off)")
    p.add_argument("--codebook-sizes", default=",".join(map(str, SID_CONFIG["codebook_sizes"])),
                   help="SID codebook sizes, coarse to fine (default %(default)s; 256,128,64,32 until the "
                        "eleventh run)")
    p.add_argument("--sid-epochs", type=int, default=SID_CONFIG["epochs"], help="SID tokenizer epochs")
    p.add_argument("--sid-overrides", default="{}",
                   help="JSON of SIDConfig fields replacing the Beauty tokenizer's, e.g. "
                        "'{\"cooccurrence_weight\": 1.0}' (codebook sizes and epochs have their own flags)")
    p.add_argument("--train-overrides", default="{}",
                   help="JSON of training settings replacing the Beauty ones, per stage, e.g. "
                        "'{\"sft\": {\"lr\": 1e-3}}' (stages cpt, sft, sasrec; TrainConfig fields and the "
                        "stage's data settings; steps and seed have their own flags)")
    p.add_argument("--sasrec-overrides", default="{}",
                   help="JSON of SASRecConfig fields replacing the SASRec baseline's (hidden 64, 2 layers, 1 head, "
                        "dropout 0.1), e.g. '{\"hidden_size\": 128}'; with --collaborative-sids its item table "
                        "feeds the SIDs too (max_len is --train-overrides sft.max_items)")
    p.add_argument("--extra-embeddings", default="",
                   help="comma-separated .npy files of further [num_items, d] item embeddings (image, metadata, "
                        "collaborative, ...) fused with the text embedding by the SID tokenizer")
    p.add_argument("--item-attributes", default="none",
                   help="item attributes (S3-Rec's *_item2attributes.json: brand, sub-categories) fused into the "
                        "SIDs as one more input, multi-hot (plum.data.load_item_attributes): 'none' (default: "
                        "no gain on Beauty, RESULTS.md seventeenth run), 'auto' takes the dataset folder's file, "
                        "or give a path")
    p.add_argument("--collaborative-sids", action=argparse.BooleanOptionalAction, default=True,
                   help="fuse the SASRec baseline's item table (trained first, on the training sequences only) "
                        "into the SIDs as one more SIDv2 input (default: on)")
    p.add_argument("--eval-batch-size", type=int, default=256, help="users per beam search")
    p.add_argument("--split", choices=("test", "valid"), default="test",
                   help="users to score: test (target s[-1]) or valid (target s[-2], for model selection)")
    p.add_argument("--exclude-history", action="store_true",
                   help="drop each user's history items from every ranking (RecBole's full-sort protocol)")
    p.add_argument("--max-users", type=int, default=None, help="evaluate only the first N users (smoke)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default ~/.cache/plum/embeddings)")
    p.add_argument("--model-dir", default=None, help="sentence-transformers directory (default all-MiniLM-L6-v2)")
    p.add_argument("--sft-only", action="store_true",
                   help="also run PLUM's ablation: the same SFT from a fresh model (no CPT), row sft_only")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.beam_width < 20:
        p.error(f"--beam-width must be >= 20 (TIGER's setting), got {a.beam_width}")
    if not a.budget_minutes > 0:
        p.error(f"--budget-minutes must be > 0, got {a.budget_minutes}")
    if not (math.isfinite(a.sid_init_scale) and a.sid_init_scale >= 0):
        p.error(f"--sid-init-scale must be a finite number >= 0 (0: off), got {a.sid_init_scale}")
    if a.max_users is not None and a.max_users < 1:
        p.error(f"--max-users must be >= 1, got {a.max_users}")
    from common import embedding_files_arg, json_fields_arg

    from plum.baselines import SASRecConfig
    from plum.model.config import PRESETS, ModelConfig
    from plum.sid import SIDConfig

    if a.preset not in PRESETS:
        p.error(f"--preset must be one of {sorted(PRESETS)}, got {a.preset!r}")
    a.model_overrides = json_fields_arg(p, "--model-overrides", a.model_overrides, ModelConfig)
    if "vocab_size" in a.model_overrides:
        p.error("--model-overrides must not set 'vocab_size': the SIDs' vocabulary sets it")
    try:
        a.model_config = model_config(a.preset, a.model_overrides)  # the effective one, without vocab_size
    except (TypeError, ValueError) as e:
        p.error(f"--model-overrides must give a valid ModelConfig with --preset {a.preset}: {e}")
    a.sid_overrides = json_fields_arg(p, "--sid-overrides", a.sid_overrides, SIDConfig,
                                      {"codebook_sizes": "--codebook-sizes", "epochs": "--sid-epochs", "seed": "--seed"})
    a.train_overrides = train_overrides_arg(p, json_fields_arg(p, "--train-overrides", a.train_overrides))
    a.sasrec_overrides = json_fields_arg(p, "--sasrec-overrides", a.sasrec_overrides, SASRecConfig,
                                         {"num_items": "the dataset (its item count)",
                                          "max_len": "--train-overrides '{\"sft\": {\"max_items\": N}}'"})
    try:
        a.sasrec_config = sasrec_config(a.sasrec_overrides)  # the effective one, without num_items and max_len
    except (TypeError, ValueError) as e:
        p.error(f"--sasrec-overrides must give a valid SASRecConfig: {e}")
    a.extra_embeddings = embedding_files_arg(p, "--extra-embeddings", a.extra_embeddings)
    a.item_attributes = item_attributes_arg(p, a.dataset, a.item_attributes)
    try:
        a.codebook_sizes = [int(v) for v in a.codebook_sizes.split(",")]
    except ValueError:
        p.error(f"--codebook-sizes must be comma-separated integers, got {a.codebook_sizes!r}")
    if a.steps is not None:
        try:
            steps = [int(s) for s in a.steps.split(",")]
        except ValueError:
            steps = []
        if len(steps) != 3 or min(steps) < 1:
            p.error(f"--steps must be three positive integers CPT,SFT,SASREC, got {a.steps!r}")
        a.steps = dict(zip(BUDGET_SHARES, steps))
    return a


ATTRIBUTES_GLOB = "*_item2attributes.json"  # S3-Rec's item attributes beside the interactions


def item_attributes_arg(parser, dataset: str, value: str) -> str | None:
    """``--item-attributes``: the attribute JSON to use, resolved, or ``None`` (``none``). ``auto`` is
    the one ``*_item2attributes.json`` of the dataset folder (of the dataset file's folder), ``None``
    when it has none; two are ambiguous (``parser.error``), as is a path that does not exist."""
    if value == "none":
        return None
    if value != "auto":
        if not Path(value).is_file():
            parser.error(f"--item-attributes must be auto, none or an existing JSON file, got {value!r}")
        return str(Path(value).resolve())
    folder = Path(dataset) if Path(dataset).is_dir() else Path(dataset).parent
    found = sorted(folder.glob(ATTRIBUTES_GLOB))
    if len(found) > 1:
        parser.error(f"--item-attributes auto must find at most one {ATTRIBUTES_GLOB} in {folder}, found "
                     f"{[f.name for f in found]}: pass one, or none")
    return str(found[0].resolve()) if found else None


TRAIN_RESERVED = {"steps": "--steps or --budget-minutes", "seed": "--seed", "progress": "--no-progress"}


def train_overrides_arg(parser, obj: dict) -> dict:
    """Check ``--train-overrides``: ``{stage: {key: value}}`` with stages of ``TRAIN_CONFIG``, keys
    that are ``TrainConfig`` fields or the stage's own data settings (``max_items``, ...), and values
    that make a valid ``TrainConfig`` (``parser.error`` naming the stage and key otherwise)."""
    import dataclasses

    from plum.train.loop import (TrainConfig, check_distill, check_distill_temperature, check_item_loss,
                                 check_label_smoothing)
    from plum.train.stages import DEFAULTS

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for stage, over in obj.items():
        if stage not in TRAIN_CONFIG:
            parser.error(f"--train-overrides: the stage {stage!r} must be one of {sorted(TRAIN_CONFIG)}")
        if not isinstance(over, dict):
            parser.error(f"--train-overrides: {stage} must map to a JSON object, got {over!r}")
        allowed = (fields | set(DEFAULTS[stage]) | set(TRAIN_CONFIG[stage])) - set(TRAIN_RESERVED)
        for k in over:
            if k in TRAIN_RESERVED:
                parser.error(f"--train-overrides: {stage}.{k} must be set with {TRAIN_RESERVED[k]}")
            if k not in allowed:
                parser.error(f"--train-overrides: {stage}.{k} must be one of {sorted(allowed)}")
        try:  # the loss's own checks, before any training
            check_label_smoothing(over.get("label_smoothing", 0.0))
            check_item_loss(over.get("item_loss", 0.0))
            check_distill(over.get("distill", 0.0))
            check_distill_temperature(over.get("distill_temperature", 1.0))
        except ValueError as e:
            parser.error(f"--train-overrides: {stage}.{e}")
        merged = {k: v for k, v in {**TRAIN_CONFIG[stage], **over}.items() if k in fields}
        try:
            TrainConfig.from_dict(merged)
        except (TypeError, ValueError) as e:
            parser.error(f"--train-overrides: {stage} must give a valid TrainConfig: {e}")
    return {stage: over for stage, over in obj.items() if over}  # {"sft": {}} is no override


def run_settings(args, cfg: dict | None = None) -> dict:
    """The options that shape the trained models (beyond the SIDs, which ``Workspace.sid`` checks):
    kept in OUT/plan.json, so a resumed run with other ones is refused instead of mixing them. With the
    run config ``cfg`` it also keeps the effective training settings (``train_config``: the bench's
    defaults with ``--train-overrides`` applied), so that a bench default changed since OUT was
    trained is caught too."""
    settings = {"preset": args.preset, "model_overrides": args.model_overrides,
                "train_overrides": args.train_overrides, "sasrec_overrides": args.sasrec_overrides,
                "sasrec_config": args.sasrec_config, "sid_init_scale": args.sid_init_scale}
    if cfg is not None:
        settings["model_config"] = args.model_config
        settings["train_config"] = effective_train_config(cfg)
    return settings


def model_config(preset: str, overrides: dict) -> dict:
    """The effective model config of ``--preset`` with ``--model-overrides``, as JSON, without
    ``vocab_size`` (set by the SIDs' vocabulary): ``medium`` with ``{"num_hidden_layers": 3}`` and
    ``medium-deep`` give the same one."""
    from plum.model.config import preset as make

    d = json.loads(json.dumps(make(preset, **overrides).to_dict()))
    del d["vocab_size"]
    return d


def sasrec_config(overrides: dict) -> dict:
    """The effective config of the SASRec baseline with ``--sasrec-overrides``, as JSON, without
    ``num_items`` (the dataset's) and ``max_len`` (``sft.max_items``). ``TypeError`` / ``ValueError``
    (from :class:`plum.baselines.SASRecConfig`) for an invalid one."""
    import dataclasses

    from plum.baselines import SASRecConfig

    d = dataclasses.asdict(SASRecConfig(num_items=1, **overrides))
    del d["num_items"], d["max_len"]
    return json.loads(json.dumps(d))


def effective_train_config(cfg: dict) -> dict:
    """``{stage: {key: value}}`` of the run config's training sections, as JSON (steps and progress
    aside: the plan's steps are checked on their own)."""
    return json.loads(json.dumps({k: {kk: v for kk, v in cfg[k].items() if kk not in ("steps", "progress")}
                                  for k in TRAIN_CONFIG}))


SETTINGS_BEFORE_RECORDED = {"sid_init_scale": 0.0}  # what an OUT planned before the option was kept trained with
# training settings whose bench default changed after they were added: what an OUT with a train_config
# but no record of the key trained with (sft.distill was added at 0, the run config's default, in a27476b)
TRAIN_SETTINGS_BEFORE_RECORDED = {"sft": {"distill": 0.0, "distill_temperature": 1.0}}


def check_run_settings(out: Path, plan: dict, args, cfg: dict) -> None:
    """Refuse to resume OUT with model or training settings other than its own. The model is compared by
    its effective config, field by field, not by how the options spell it (``--preset medium-deep`` resumes
    an OUT of ``--preset medium --model-overrides '{"num_hidden_layers": 3}'``); an OUT planned before the
    effective config was kept has it rebuilt from its preset and overrides. OUTs planned since the
    effective training settings are kept compare those, key by key: a key OUT has no record of is a
    setting added since, not compared, unless its bench default has changed since it was added
    (:data:`TRAIN_SETTINGS_BEFORE_RECORDED`: ``sft.distill``, added at 0), which is compared at that
    first default. Older OUTs compare the ``--train-overrides`` given; an OUT from before any check has
    none on record: it takes this run's."""
    saved = plan.get("settings")
    if saved is None:
        return
    effective = "train_config" in saved  # else: the overrides given are what OUT has on record
    now = run_settings(args, cfg if effective else None)
    was_model = saved.get("model_config") or _recorded_model_config(saved)
    if was_model is None:  # a preset that no longer exists: compare the options as given
        names = ("preset", "model_overrides")
    else:
        names = ()
        _refuse_other_config(out, "the model", was_model, args.model_config, "--preset and --model-overrides",
                             f"--preset {saved['preset']} --model-overrides '{json.dumps(saved['model_overrides'])}'")
    # the SASRec baseline (and, with --collaborative-sids, the SIDs' item table), by its effective config;
    # an OUT planned before --sasrec-overrides existed trained the defaults
    _refuse_other_config(out, "the SASRec baseline", saved.get("sasrec_config") or sasrec_config({}),
                         args.sasrec_config, "--sasrec-overrides",
                         f"--sasrec-overrides '{json.dumps(saved.get('sasrec_overrides', {}))}'")
    for k in names + ("sid_init_scale",) + (() if effective else ("train_overrides",)):
        was = saved.get(k, SETTINGS_BEFORE_RECORDED.get(k))
        if was != now[k]:
            flag = "--" + k.replace("_", "-")
            raise ValueError(f"{out} was trained with {flag} {json.dumps(was)}, not {json.dumps(now[k])}; "
                             "use a new --out, or this OUT's own setting")
    for stage, section in saved.get("train_config", {}).items():
        section = {**TRAIN_SETTINGS_BEFORE_RECORDED.get(stage, {}), **section}
        for key, was in section.items():
            is_ = now["train_config"].get(stage, {}).get(key, was)
            if is_ != was:
                raise ValueError(
                    f"{out} was trained with {stage}.{key}={json.dumps(was)}, but this run's settings give "
                    f"{json.dumps(is_)} (from --train-overrides, or a bench default changed since): use a new "
                    f"--out, or --train-overrides '{{\"{stage}\": {{\"{key}\": {json.dumps(was)}}}}}'")


def _refuse_other_config(out: Path, what: str, was: dict, now: dict, flags: str, given: str) -> None:
    """``ValueError`` at the first field of OUT's effective config ``was`` (of ``what``) that this run's
    ``now`` (set by ``flags``) gives otherwise, naming the field and OUT's own options ``given``. A field
    ``now`` lacks is one since removed: not compared."""
    for key, v in was.items():
        if now.get(key, v) != v:
            raise ValueError(f"{out} was trained with {what}'s {key}={json.dumps(v)} ({given}), but this run's "
                             f"{flags} give {json.dumps(now[key])}: use a new --out, or {given}")


def _recorded_model_config(saved: dict) -> dict | None:
    """The effective model config of the preset and overrides an older OUT has on record (``None`` when
    that preset no longer exists or its overrides no longer make a valid config)."""
    try:
        return model_config(saved["preset"], saved.get("model_overrides") or {})
    except (KeyError, TypeError, ValueError):
        return None


def check_extra_embeddings(ws, paths: list[str]) -> None:
    """Every ``--extra-embeddings`` file must hold one finite row per item."""
    from common import check_item_embeddings

    for path, e in zip(paths, ws.embeddings[1:]):
        check_item_embeddings("--extra-embeddings", path, e, ws.num_items)


COLLAB_FILE = "sasrec_item_embeddings.npy"  # SASRec's item table under OUT, with --collaborative-sids
ATTR_FILE = "item_attributes.npy"  # the multi-hot --item-attributes under OUT


def _save_npy(path: Path, array) -> None:
    """``np.save`` to ``path`` atomically (:func:`plum.io.atomic_path`): a run stopped mid-write
    leaves no partial file for the resumed run to read."""
    from plum.io import atomic_path

    with atomic_path(path) as tmp:
        np.save(tmp, array)


def run_config(args, out: Path, emb_path: Path, steps: dict | None) -> dict:
    """The run config of OUT. Its ``data.embeddings`` are the text embeddings, ``--extra-embeddings``,
    the ``--item-attributes`` (``OUT/item_attributes.npy``) and, with ``--collaborative-sids``, SASRec's
    item table once ``main`` has written it."""
    from plum.train.stages import load_run_config

    collab = [str(out / COLLAB_FILE)] if args.collaborative_sids and (out / COLLAB_FILE).exists() else []
    attrs = [str(out / ATTR_FILE)] if args.item_attributes else []

    sections = {k: dict(v) for k, v in TRAIN_CONFIG.items()}
    for k in sections:
        sections[k]["steps"] = int(steps[k]) if steps else CALIBRATION_STEPS + 1
        sections[k]["progress"] = not args.no_progress
        sections[k]["warmup_steps"] = min(sections[k]["warmup_steps"], max(sections[k]["steps"] // 10, 1))
        sections[k].update(args.train_overrides.get(k, {}))  # an explicit warmup_steps is kept as given
    return load_run_config(
        None, workdir=str(out), seed=args.seed,
        data={"path": args.dataset, "embeddings": [str(emb_path), *args.extra_embeddings, *attrs, *collab]},
        sid={**SID_CONFIG, "codebook_sizes": args.codebook_sizes, "epochs": args.sid_epochs,
             "warmup_epochs": min(5, max(args.sid_epochs // 5, 1)), **args.sid_overrides},
        model={"preset": args.preset, "overrides": args.model_overrides, "sid_init_scale": args.sid_init_scale},
        cpt=sections["cpt"], sft=sections["sft"], sasrec=sections["sasrec"],
        eval={"beam_width": args.beam_width, "batch_size": args.eval_batch_size, "ks": [5, 10], "split": "test",
              "exclude_history": args.exclude_history})


def calibrate(ws, args, out: Path) -> dict:
    """Seconds per training step of each stage, from CALIBRATION_STEPS steps (startup included,
    so the estimate errs on the slow side) in OUT/calibration/. Runs before the SID fit (whose
    input may be SASRec's item table): CPT and SFT are timed on random codes of the configured
    codebook sizes, which give the same token counts as the fitted SIDs."""
    import shutil

    from plum.train import stages
    from plum.train.loop import train

    cal = out / "calibration"
    shutil.rmtree(cal, ignore_errors=True)
    cal.mkdir(parents=True)
    base = dict(ws.cfg)
    per_step = {}
    sizes = tuple(base["sid"]["codebook_sizes"])
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, n, ws.num_items) for n in sizes], axis=1)
    # sft.distill's teacher costs its forward, not its training: an untrained SASRec times it
    teacher = stages.sasrec_baseline(ws, args.sasrec_overrides)[0] if base["sft"].get("distill") else None
    for name in ("cpt", "sft"):
        ws.cfg = {**base, **{name: {**base[name], "progress": False}}}
        model, vocab, text = stages.base_model(ws, sizes)
        c = ws.cfg[name]
        data = stages.cpt_corpus(ws, vocab, text, codes) if name == "cpt" else stages.sft_dataset(ws, vocab, codes)
        t0 = time.perf_counter()
        loss = stages.lm_loss if name == "cpt" else stages.sft_loss(ws, vocab, codes, teacher=teacher)
        train(model, data, stages._train_config(c, ws.cfg["seed"], False), cal / name, loss_fn=loss,
              stop_after=CALIBRATION_STEPS)
        per_step[name] = (time.perf_counter() - t0) / CALIBRATION_STEPS
    ws.cfg = base
    model, data, tcfg, loss = stages.sasrec_baseline(ws, args.sasrec_overrides)
    t0 = time.perf_counter()
    from dataclasses import replace

    train(model, data, replace(tcfg, progress=False), cal / "sasrec", loss_fn=loss, stop_after=CALIBRATION_STEPS)
    per_step["sasrec"] = (time.perf_counter() - t0) / CALIBRATION_STEPS
    shutil.rmtree(cal, ignore_errors=True)
    return per_step


def split_tag(split: str, exclude_history: bool) -> str:
    """The protocol in the names of cached evaluations and results: ``""``, ``"_valid"``, ``"_xh"``, ..."""
    return ("" if split == "test" else f"_{split}") + ("_xh" if exclude_history else "")


def beam_tag(beam_width: int) -> str:
    """Beam search's results depend on the width (the baselines' do not): another width, another file."""
    return "" if beam_width == 20 else f"_beam{beam_width}"


def ranks_path(eval_json: Path) -> Path:
    """Where the per-user target ranks of an evaluation cached at ``eval_json`` are kept."""
    return eval_json.with_name(eval_json.stem + ".ranks.npz")


def _cached(path: Path, fn, targets: np.ndarray, k: int):
    """``fn() -> (metrics, ranks)`` run once: metrics cached at ``path`` (JSON), and the per-user
    target ranks (within the top ``k``) with the ``targets`` at :func:`ranks_path` (for
    ``compare_retrieval.py``)."""
    if path.exists():
        return json.loads(path.read_text()), 0.0
    t0 = time.perf_counter()
    res, ranks = fn()
    from plum.io import atomic_path

    with atomic_path(ranks_path(path)) as tmp:
        np.savez(tmp, ranks=ranks, targets=targets, k=k)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(res, indent=1))
    return res, time.perf_counter() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from plum.baselines import Popularity
    from plum.data import embed_texts, load_dataset, load_item_attributes
    from plum.train import stages
    from plum.train.loop import default_device, train

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    timings: dict[str, float] = {}
    state_path = out / "timings.json"  # stage times of earlier (resumed) runs
    prev = json.loads(state_path.read_text()) if state_path.exists() else {}

    def done(name: str, seconds: float) -> None:
        if seconds > 0 or name not in prev:
            prev[name] = seconds
        timings[name] = prev[name]
        state_path.write_text(json.dumps(prev, indent=1))

    # 1. text embeddings (cached by content hash)
    emb_path = out / "item_embeddings.npy"
    t0 = time.perf_counter()
    data = load_dataset(args.dataset) if not emb_path.exists() or args.item_attributes else None
    if not emb_path.exists():
        emb = embed_texts(data.item_texts(), model_dir=args.model_dir, cache_dir=args.cache_dir, progress=progress)
        _save_npy(emb_path, emb)
    done("embeddings", time.perf_counter() - t0 if not prev.get("embeddings") else 0.0)
    if args.item_attributes:  # multi-hot, one row per item (rewritten each run: cheap, and follows the file)
        attrs = load_item_attributes(args.item_attributes, data.item_ids)
        _save_npy(out / ATTR_FILE, attrs)
        _log(f"item attributes: {attrs.shape[1]} from {args.item_attributes}, "
             f"{int((attrs > 0).any(axis=1).sum())} of {len(attrs)} items have some")

    # 2. plan: steps per stage from the budget (or --steps, or an earlier run's plan)
    plan_path = out / "plan.json"
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
        if args.steps and args.steps != plan["steps"]:
            raise ValueError(f"{out} was planned with steps {plan['steps']}, not {args.steps}; use a new --out")
    else:
        plan = None
    cfg = run_config(args, out, emb_path, plan["steps"] if plan else args.steps)
    if plan is not None:
        check_run_settings(out, plan, args, cfg)
        if "settings" not in plan:
            plan["settings"] = run_settings(args)
            plan_path.write_text(json.dumps(plan, indent=1))
    ws = stages.Workspace(cfg)
    check_extra_embeddings(ws, args.extra_embeddings)
    es = getattr(ws.split, args.split)  # the users scored: test, or valid for model selection
    xh = args.exclude_history
    protocol = split_tag(args.split, xh)  # in the names of cached evaluations and results
    _log(f"data: {ws.num_items} items, {len(es.targets)} {args.split} users")

    if plan is None:
        budget_s = args.budget_minutes * 60
        if args.steps:
            per_step, steps = None, args.steps
        else:
            per_step = calibrate(ws, args, out)
            steps = {k: max(int(budget_s * BUDGET_SHARES[k] / per_step[k]), 10) for k in BUDGET_SHARES}
        plan = {"budget_minutes": None if args.steps else args.budget_minutes, "shares": BUDGET_SHARES,
                "seconds_per_step": per_step,
                "steps": steps}
        cfg = run_config(args, out, emb_path, steps)
        ws.cfg = cfg
        plan["settings"] = run_settings(args, cfg)
        plan_path.write_text(json.dumps(plan, indent=1))
    _log(f"plan: steps {plan['steps']} (s/step {plan['seconds_per_step']})")

    sasrec_model = None

    def sasrec():
        """The SASRec baseline, trained on the training sequences once (resumed / reloaded from OUT/sasrec)."""
        nonlocal sasrec_model
        if sasrec_model is None:
            t0 = time.perf_counter()
            model, data, tcfg, loss = stages.sasrec_baseline(ws, args.sasrec_overrides)
            if train(model, data, tcfg, out / "sasrec", loss_fn=loss, desc="SASRec"):  # {}: finished before
                done("sasrec_train", time.perf_counter() - t0)
            sasrec_model = model
        return sasrec_model

    # 3. SIDs: text (+ --extra-embeddings) (+ SASRec's item table with --collaborative-sids) -> SIDv2 tokenizer
    collab = out / COLLAB_FILE
    if args.collaborative_sids and str(collab) not in cfg["data"]["embeddings"]:  # first run: train SASRec now
        _save_npy(collab, sasrec().item_embeddings())
        ws.embeddings.append(np.load(collab))
        cfg["data"]["embeddings"].append(str(collab))
    sid_info_path = out / "sid_info.json"
    if not (out / "sid" / "codes.npy").exists() or not sid_info_path.exists():
        t0 = time.perf_counter()
        # One thread: with two, 50-epoch Beauty fits with one seed differed between processes
        # (4 of 4 runs; 1 thread: bit-identical), and the fit is small (~25 s here).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            sid_info = stages.run_sid(ws, progress=progress)
        finally:
            torch.set_num_threads(threads)
        sid_info_path.write_text(json.dumps(sid_info))
        done("sid", time.perf_counter() - t0)
    else:
        sid_info = json.loads(sid_info_path.read_text())
        try:  # refuses SIDs fitted with other settings or on other embeddings (names the field)
            ws.sid()
        except ValueError as e:
            raise ValueError(f"{e}. Here: use a new --out, or this OUT's own options (--sid-overrides, "
                             "--extra-embeddings; --item-attributes none or --no-collaborative-sids for an OUT made "
                             "without them)") from None
        done("sid", 0.0)
    _log(f"SIDs {sid_info['codebook_sizes']} from embeddings of widths {[e.shape[1] for e in ws.embeddings]}: "
         f"{sid_info['unique_sid_fraction']:.2%} unique")

    # 4. CPT -> SFT (skipped when their model directories exist; resumed from checkpoints otherwise)
    for name, fn in (("cpt", lambda: stages.run_cpt(ws, progress=progress)),
                     ("sft", lambda: stages.run_sft(ws, init="cpt", out="sft", progress=progress,
                                                    teacher=sasrec() if cfg["sft"].get("distill") else None))):
        if (out / name / "model" / "model.safetensors").exists():
            done(name, 0.0)
            continue
        t0 = time.perf_counter()
        fn()
        done(name, time.perf_counter() - t0)

    n_users = len(es.targets) if args.max_users is None else min(args.max_users, len(es.targets))
    hist, tgt, ks = list(es.histories)[:n_users], np.asarray(es.targets)[:n_users], cfg["eval"]["ks"]
    suffix = protocol + ("" if args.max_users is None else f"_first{n_users}")
    beam = beam_tag(args.beam_width)

    # 5. constrained beam search
    def eval_plum():
        r = stages.retriever(ws, out / "sft" / "model")
        return r.evaluate(hist, tgt, ks, exclude_history=xh, return_ranks=True)

    results: dict[str, dict] = {}
    results["plum"], t = _cached(out / f"eval_plum{suffix}{beam}.json", eval_plum, tgt, max(ks))
    done(f"eval_plum{suffix}{beam}", t)
    _log(f"plum: {results['plum']}")

    if args.sft_only:  # PLUM's ablation: SFT (same steps) from a fresh model instead of the CPT one
        if not (out / "sft_only" / "model" / "model.safetensors").exists():
            t0 = time.perf_counter()
            stages.run_sft(ws, init="scratch", out="sft_only", progress=progress,
                           teacher=sasrec() if cfg["sft"].get("distill") else None)
            done("sft_only", time.perf_counter() - t0)
        def eval_sft_only():
            r = stages.retriever(ws, out / "sft_only" / "model")
            return r.evaluate(hist, tgt, ks, exclude_history=xh, return_ranks=True)

        results["sft_only"], t = _cached(out / f"eval_sft_only{suffix}{beam}.json", eval_sft_only, tgt, max(ks))
        done(f"eval_sft_only{suffix}{beam}", t)
        _log(f"sft_only: {results['sft_only']}")

    # 6. baselines
    results["popularity"] = Popularity(ws.split.train, ws.num_items).evaluate(hist, tgt, ks, exclude_history=xh)
    results["popularity"].setdefault("invalid_rate", 0.0)

    def fit_sasrec():
        return sasrec().evaluate(hist, tgt, ks, exclude_history=xh, return_ranks=True)

    results["sasrec"], t = _cached(out / f"eval_sasrec{suffix}.json", fit_sasrec, tgt, max(ks))
    done(f"sasrec{suffix}", t)
    _log(f"sasrec: {results['sasrec']}")

    wall = time.perf_counter() - t_start
    table = {name: {k: float(r.get(k, 0.0)) for k in RESULT_KEYS} for name, r in results.items()}
    extra = {name: {k: v for k, v in r.items() if k not in RESULT_KEYS} for name, r in results.items()}
    training_s = sum(prev.get(k, 0.0) for k in ("cpt", "sft", "sft_only", "sasrec_train"))
    meta = {
        "dataset": str(args.dataset), "items": int(ws.num_items), "split": args.split, "exclude_history": xh,
        "test_users": int(n_users),
        "all_test_users": int(len(es.targets)), "subsampled_users": args.max_users is not None,
        "budget_minutes": plan["budget_minutes"], "training_seconds": training_s, "plan": plan,
        "train_config": {k: {kk: v for kk, v in cfg[k].items() if kk != "progress"} for k in TRAIN_CONFIG},
        "wall_seconds_this_run": wall, "stage_seconds": prev, "seed": args.seed, "beam_width": args.beam_width,
        "sft_only": args.sft_only, "model_preset": args.preset, "model_overrides": args.model_overrides,
        "model_config": args.model_config, "sid_init_scale": args.sid_init_scale,
        "sid_overrides": args.sid_overrides, "train_overrides": args.train_overrides,
        "sasrec_overrides": args.sasrec_overrides, "sasrec_config": args.sasrec_config,
        "extra_embeddings": args.extra_embeddings,
        "item_attributes": args.item_attributes,
        "collaborative_sids": args.collaborative_sids,
        "device": str(default_device()),
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]) if argv is None else
                   "bench_retrieval.py " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    res = {**table, "details": {"sid": sid_info, "metrics": extra, "published": PUBLISHED}, "metadata": meta}
    res_path = out / f"results{protocol}{beam}.json"
    with open(res_path, "w") as f:
        json.dump(res, f, indent=1)
    print_table(table, meta, sid_info)
    print(f"wrote {res_path}")
    return res


def print_table(table: dict, meta: dict, sid_info: dict) -> None:
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


if __name__ == "__main__":
    main()
