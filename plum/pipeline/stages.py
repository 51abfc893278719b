"""The pipeline stages behind the ``plum`` CLI, over one work directory (:class:`Workspace`).

========  ==================================================  =============================================
stage     reads                                               writes (under ``workdir``)
========  ==================================================  =============================================
sid       data + content embeddings                           ``sid/`` tokenizer, ``codes.npy``, ``trie.safetensors``,
                                                              ``inputs.json`` (seed, ``sid`` section, embedding SHA-256)
cpt       sid artefacts, base model (preset or HF checkpoint)  ``cpt/`` checkpoint, metrics, ``cpt/model/``
sft       sid artefacts, ``cpt/model/`` (or a fresh model)    ``sft/`` checkpoint, metrics, ``sft/model/``
sasrec    data                                                ``sasrec/`` checkpoint, metrics
eval      sid artefacts, ``sft/model/``                       ``eval.json``
========  ==================================================  =============================================

Each stage reads the run configuration of :mod:`plumrec.pipeline.config`.
``model.sid_init_scale`` (default 0: off) adds the fitted tokenizer's
codewords, randomly projected, to the SID token embeddings of a fresh model
(:func:`~plumrec.model.vocab.init_sid_embeddings`).

SFT takes ``objective`` (``"sequence"``: every next item of a user's window
is a target of one example, :class:`~plumrec.train.corpus.SequenceSFTDataset`;
``"next_item"``: one target per example) and ``loss`` (``"codebook"``:
softmax over the target level's codebook, what beam search decodes,
:class:`~plumrec.train.codebook_loss.CodebookLoss`; ``"vocab"``: over the whole
vocabulary). The defaults are the first of each: on the demo they give
Recall@10 0.404 against 0.385 (sft_only 0.400 against 0.275) for the same steps.
With the codebook loss, ``label_smoothing`` (default 0) smooths each target
over its level's codebook, ``level_weights`` (default none: all 1) weights
each SID level's cross-entropy, ``item_loss`` (default 0: off) adds the
codebook loss's training-only item-level softmax over the catalogue's SIDs, and
``distill`` (default 0: off; ``distill_temperature`` 1) mixes each target's
label with a trained item model's next-item distribution: the run's SASRec
baseline (section ``sasrec``, :func:`run_sasrec`), or a teacher passed to
:func:`run_sft`.

Several processes: ``torchrun --nproc_per_node N -m plumrec.cli cpt --config
run.toml`` (DDP; ``fsdp = true`` in the section for FSDP2).
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from plumrec.baselines import SASRec, SASRecConfig, SequenceDataset, sasrec_loss
from plumrec.data import cooccurrence_pairs
from plumrec.io import atomic_dir, write_json
from plumrec.metrics import evaluate_lists, item_popularity
from plumrec.model.config import preset
from plumrec.model.hf import load_hf_model, load_tokenizer
from plumrec.model.model import PlumLM
from plumrec.model.vocab import SIDVocab, TextTokenizer, extend_vocabulary, init_sid_embeddings, train_word_tokenizer
from plumrec.pipeline.config import SFT_LOSSES, SFT_OBJECTIVES, train_config
from plumrec.pipeline.workspace import Workspace, load_model, save_model
from plumrec.retrieval import GenerativeRetriever
from plumrec.sid.tokenizer import SemanticIdTokenizer
from plumrec.sid.trie import build_trie
from plumrec.train.codebook_loss import CodebookLoss
from plumrec.train.config import TrainConfig
from plumrec.train.corpus import CPTCorpus, SequenceSFTDataset, SFTDataset
from plumrec.train.distributed import default_device, dist_env, gather_objects
from plumrec.train.loop import train
from plumrec.train.losses import (
    check_distill,
    check_distill_temperature,
    check_item_loss,
    check_label_smoothing,
    check_level_weights,
    lm_loss,
)

__all__ = ["run_sid", "base_model", "cpt_corpus", "run_cpt", "sft_dataset", "sft_loss", "sasrec_baseline",
           "run_sasrec", "validation_scorer", "run_sft", "exclude_history", "eval_set", "retriever",
           "training_popularity", "run_eval", "run_recommend", "SID_INIT_SEED_OFFSET"]


def run_sid(ws: Workspace, *, progress: bool = True) -> dict:
    """Fit the SID tokenizer on the content embeddings (+ co-occurrence), build the trie."""
    c = dict(ws.cfg["sid"])
    sizes = tuple(c.pop("codebook_sizes"))
    tok = SemanticIdTokenizer(sizes, seed=ws.cfg["seed"], **c)
    pairs = cooccurrence_pairs(ws.split.train, ws.num_items)
    codes = tok.fit(ws.embeddings, pairs, progress=progress)
    trie = build_trie(codes, sizes)
    with atomic_dir(ws.dir / "sid") as path:  # the SID artefacts are swapped in together
        tok.save(path)
        np.save(path / "codes.npy", codes)
        trie.save(str(path / "trie.safetensors"))
        write_json(path / "inputs.json", ws.sid_inputs(), indent=1)
    unique = len(np.unique(codes, axis=0)) / len(codes)
    return {"items": len(codes), "codebook_sizes": list(sizes), "unique_sid_fraction": unique}


SID_INIT_SEED_OFFSET = 1000  # the codeword projections' seed is the run's seed + this (apart from the model's)


def base_model(ws: Workspace, codebook_sizes) -> tuple[PlumLM, SIDVocab, TextTokenizer]:
    """A fresh model: a preset trained from scratch with a word-level tokenizer, or an HF
    checkpoint with its tokenizer, its vocabulary extended with the SID tokens. With
    ``model.sid_init_scale`` > 0 the SID rows also get the tokenizer's codewords
    (:func:`~plumrec.model.vocab.init_sid_embeddings`, rows of that mean norm)."""
    m = ws.cfg["model"]
    scale = m.get("sid_init_scale", 0.0)
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and np.isfinite(scale) and scale >= 0):
        raise ValueError(f"model.sid_init_scale must be a finite number >= 0 (0: off), got {scale!r}")
    torch.manual_seed(ws.cfg["seed"])
    if m["hf_checkpoint"]:
        model = load_hf_model(m["hf_checkpoint"], **m["overrides"])
        text = load_tokenizer(m["hf_checkpoint"])
        vocab = SIDVocab(model.config.vocab_size, tuple(codebook_sizes))
        model = extend_vocabulary(model, vocab, seed=ws.cfg["seed"])
    else:
        text = train_word_tokenizer(ws.grounding_texts())
        vocab = SIDVocab(text.vocab_size, tuple(codebook_sizes))
        model = PlumLM(preset(m["preset"], vocab_size=vocab.size, **m["overrides"]))
    if scale:
        codewords = SemanticIdTokenizer.load(ws.dir / "sid").codewords
        init_sid_embeddings(model, vocab, codewords, scale=float(scale), seed=ws.cfg["seed"] + SID_INIT_SEED_OFFSET)
    return model, vocab, text


def cpt_corpus(ws: Workspace, vocab: SIDVocab, text: TextTokenizer, codes: np.ndarray) -> CPTCorpus:
    """The CPT corpus of the ``cpt`` section: training histories in SIDs mixed with grounding text."""
    c = ws.cfg["cpt"]
    return CPTCorpus(ws.split.train, vocab.sid_to_tokens(codes), vocab, text_tokenizer=text, items=ws.data.items,
                     behaviour_fraction=c["behaviour_fraction"], max_items=c["max_items"], seed=ws.cfg["seed"])


def run_cpt(ws: Workspace, *, progress: bool = True) -> dict:
    """CPT of the base model (:func:`base_model`) on :func:`cpt_corpus`; saves ``workdir/cpt/model``."""
    codes, _, sizes = ws.sid()
    model, vocab, text = base_model(ws, sizes)
    c = ws.cfg["cpt"]
    corpus = cpt_corpus(ws, vocab, text, codes)
    model = model.to(default_device())
    metrics = train(model, corpus, train_config(c, ws.cfg["seed"], progress), ws.dir / "cpt", desc="CPT")
    save_model(model, vocab, text, ws.dir / "cpt" / "model")
    return metrics


def sft_dataset(ws: Workspace, vocab: SIDVocab, codes: np.ndarray):
    """The SFT examples of ``sft.objective``: ``"next_item"`` (:class:`SFTDataset`, one
    target per example) or ``"sequence"`` (:class:`SequenceSFTDataset`, every next item
    of a window per example: the same targets for far fewer tokens)."""
    c = ws.cfg["sft"]
    objective = c["objective"]
    if objective not in SFT_OBJECTIVES:
        raise ValueError(f"sft.objective must be one of {SFT_OBJECTIVES}, got {objective!r}")
    cls = SFTDataset if objective == "next_item" else SequenceSFTDataset
    return cls(ws.split.train, vocab.sid_to_tokens(codes), vocab, max_items=c["max_items"])


def sft_loss(ws: Workspace, vocab: SIDVocab, codes: np.ndarray | None = None, teacher=None):
    """The SFT loss of ``sft.loss``: ``"vocab"`` (:func:`lm_loss`, softmax over the whole
    vocabulary) or ``"codebook"`` (:class:`CodebookLoss`, softmax over the target
    level's codebook: what constrained beam search decodes). ``codes`` (the
    catalogue's ``[N, L]`` SID codes) is needed only for ``sft.item_loss`` > 0 or
    ``sft.distill`` > 0; ``teacher`` (a trained item model called as
    :class:`plumrec.baselines.SASRec` is, e.g. the run's SASRec baseline,
    :func:`run_sasrec`) only for ``sft.distill`` > 0, which distils it into the
    codebook softmaxes at temperature ``sft.distill_temperature``."""
    c = ws.cfg["sft"]
    loss, smoothing, level_weights = c["loss"], c["label_smoothing"], c.get("level_weights")
    item_loss, distill = c.get("item_loss", 0.0), c.get("distill", 0.0)
    if loss not in SFT_LOSSES:
        raise ValueError(f"sft.loss must be one of {SFT_LOSSES}, got {loss!r}")
    if loss == "vocab":
        if smoothing:
            raise ValueError(f"sft.label_smoothing={smoothing!r} needs sft.loss 'codebook', got 'vocab'")
        if level_weights is not None:
            raise ValueError(f"sft.level_weights={level_weights!r} needs sft.loss 'codebook', got 'vocab'")
        if item_loss:
            raise ValueError(f"sft.item_loss={item_loss!r} needs sft.loss 'codebook', got 'vocab'")
        if distill:
            raise ValueError(f"sft.distill={distill!r} needs sft.loss 'codebook', got 'vocab'")
        return lm_loss
    temperature = c.get("distill_temperature", 1.0)
    for key, check in (("label_smoothing", lambda: check_label_smoothing(smoothing)),
                       ("level_weights", lambda: check_level_weights(level_weights, vocab.num_levels)),
                       ("item_loss", lambda: check_item_loss(item_loss)),
                       ("distill", lambda: check_distill(distill)),
                       ("distill_temperature", lambda: check_distill_temperature(temperature))):
        try:
            check()
        except ValueError as e:
            raise ValueError(f"sft.{key}: {e}") from None
    if distill and teacher is None:
        raise ValueError(f"sft.distill={distill!r} needs a teacher: a trained item model (plumrec.baselines.SASRec) "
                         "passed as sft_loss(..., teacher=); run_sft trains the run's SASRec baseline for it")
    for key, on in (("item_loss", item_loss), ("distill", distill)):
        if on and codes is None:
            raise ValueError(f"sft.{key}: {key} > 0 needs catalogue: pass codes, the [N, L] SID codes of every item")
    catalogue = vocab.sid_to_tokens(codes) if item_loss or distill else None
    try:
        return CodebookLoss(vocab, label_smoothing=smoothing, level_weights=level_weights, item_loss=item_loss,
                            catalogue=catalogue, distill=distill, teacher=teacher if distill else None,
                            distill_temperature=temperature)
    except ValueError as e:
        raise ValueError(f"sft: {e}") from None


def sasrec_baseline(ws: Workspace, overrides: dict | None = None, progress: bool | None = None):
    """The SASRec baseline of the run: a fresh :class:`plumrec.baselines.SASRec` (``SASRecConfig`` fields
    ``overrides``; its window is ``sft.max_items``) seeded by ``seed``, its training sequences (the
    split's ``train``, never a target of valid or test), and its ``TrainConfig`` (warm-up 10 steps, no
    weight decay, then section ``sasrec``). Returns ``(model, dataset, train_config, loss_fn)``."""
    cfg = ws.cfg
    torch.manual_seed(cfg["seed"])
    model = SASRec(SASRecConfig(ws.num_items, max_len=cfg["sft"]["max_items"], **(overrides or {})))
    model = model.to(default_device())
    data = SequenceDataset(ws.split.train, ws.num_items, cfg["sft"]["max_items"])
    tcfg = TrainConfig.from_dict({"warmup_steps": 10, "weight_decay": 0.0, "seed": cfg["seed"],
                                  **({} if progress is None else {"progress": progress}), **cfg["sasrec"]})
    return model, data, tcfg, sasrec_loss


def run_sasrec(ws: Workspace, *, progress: bool = True):
    """Train (or resume, or reload once finished) the SASRec baseline of :func:`sasrec_baseline` in
    ``WORKDIR/sasrec``; returns the trained model: the demo's baseline and ``sft.distill``'s teacher."""
    model, data, tcfg, loss = sasrec_baseline(ws, progress=progress)
    train(model, data, tcfg, ws.dir / "sasrec", loss_fn=loss, desc="SASRec")
    return model


def validation_scorer(ws: Workspace, model, vocab: SIDVocab, codes: np.ndarray, trie) -> Callable[[int], float]:
    """``score(step) -> recall@10`` of ``model`` (as it is when called) on the validation split: trie-constrained
    beam search (section ``eval``: beam width, batch size, ``exclude_history``) for at most ``sft.eval_users``
    validation users, a subsample drawn once with the run's seed (all of them when there are fewer)."""
    users = ws.cfg["sft"].get("eval_users", 1000)
    if isinstance(users, bool) or not isinstance(users, int) or users < 1:
        raise ValueError(f"sft.eval_users must be an integer >= 1, got {users!r}")
    valid, e = ws.split.valid, ws.cfg["eval"]
    n = len(valid.targets)
    if n == 0:
        raise ValueError("sft.eval_every needs validation users; the split has none")
    rng = np.random.default_rng(ws.cfg["seed"])
    idx = np.sort(rng.choice(n, users, replace=False)) if n > users else np.arange(n)
    hist, targets, xh = [valid.histories[i] for i in idx], np.asarray(valid.targets)[idx], exclude_history(ws)

    # one retriever for every call: it reads the model as the call finds it
    r = GenerativeRetriever(model, vocab, trie, codes, beam_width=max(e["beam_width"], 10),
                            batch_size=e["batch_size"], max_items=ws.cfg["sft"]["max_items"])

    def score(step: int) -> float:
        return float(r.evaluate(hist, targets, (10,), exclude_history=xh)["recall@10"])

    return score


def run_sft(ws: Workspace, *, init: str | None = None, out: str = "sft", progress: bool = True,
            teacher=None) -> dict:
    """SFT from ``init``: ``"cpt"`` (the CPT model) or ``"scratch"`` (PLUM's SFT-only ablation).
    With ``sft.distill`` > 0 it distils ``teacher`` (see :func:`sft_loss`), by default the run's
    SASRec baseline (:func:`run_sasrec`, trained first when ``WORKDIR/sasrec`` has not finished).
    With ``sft.eval_every`` > 0 the model is scored on the validation users every that many steps
    (:func:`validation_scorer`, recall@10), training stops after ``sft.patience`` evaluations without a
    new best (0: never early) and the model saved is the best one (:func:`plumrec.train.train`)."""
    codes, trie, sizes = ws.sid()
    c = ws.cfg["sft"]
    init = init or c["init"]
    if init == "cpt":
        model, vocab, text = load_model(ws.dir / "cpt" / "model")
        vocab.check_codebooks(sizes)
    elif init == "scratch":
        model, vocab, text = base_model(ws, sizes)
    else:
        raise ValueError(f"sft.init must be 'cpt' or 'scratch', got {init!r}")
    data = sft_dataset(ws, vocab, codes)
    if c.get("distill") and teacher is None:
        teacher = run_sasrec(ws, progress=progress)
    model = model.to(default_device())
    tcfg = train_config(c, ws.cfg["seed"], progress)
    scorer = validation_scorer(ws, model, vocab, codes, trie) if tcfg.eval_every else None
    metrics = train(model, data, tcfg, ws.dir / out, desc=f"SFT ({init})",
                    loss_fn=sft_loss(ws, vocab, codes, teacher=teacher), evaluate=scorer)
    save_model(model, vocab, text, ws.dir / out / "model")
    return metrics


def exclude_history(ws: Workspace) -> bool:
    """``eval.exclude_history``: drop each user's history items from its ranking (every model)."""
    x = ws.cfg["eval"].get("exclude_history", False)
    if not isinstance(x, bool):
        raise ValueError(f"eval.exclude_history must be true or false, got {x!r}")
    return x


def eval_set(ws: Workspace):
    """The split that ``eval.split`` names (``"test"`` or ``"valid"``): histories and targets."""
    split = ws.cfg["eval"]["split"]
    if split not in ("test", "valid"):
        raise ValueError(f"eval.split must be 'test' or 'valid', got {split!r}")
    return getattr(ws.split, split)


def retriever(ws: Workspace, model_dir: str | os.PathLike) -> GenerativeRetriever:
    """The generative retriever of a saved model over the run's SIDs (section ``eval``)."""
    codes, trie, sizes = ws.sid()
    model, vocab, _ = load_model(model_dir, device=default_device())
    vocab.check_codebooks(sizes)
    e = ws.cfg["eval"]
    return GenerativeRetriever(model, vocab, trie, codes, beam_width=e["beam_width"], batch_size=e["batch_size"],
                               max_items=ws.cfg["sft"]["max_items"])


def training_popularity(ws: Workspace) -> np.ndarray:
    """``[M]`` int64: each item's count in the training split (for tail exposure and novelty)."""
    return item_popularity(ws.split.train, ws.num_items)


def run_eval(ws: Workspace, model_dir: str | os.PathLike | None = None) -> dict:
    """Recall/NDCG@K and the exposure measures (:func:`plumrec.metrics.exposure_metrics`, popularity
    from the training split) of a saved model (default ``workdir/sft/model``) on ``eval.split``;
    writes ``eval.json``."""
    es = eval_set(ws)
    r = retriever(ws, model_dir or ws.dir / "sft" / "model")
    hist, ks, xh, pop = list(es.histories), ws.cfg["eval"]["ks"], exclude_history(ws), training_popularity(ws)
    rank, world = dist_env()
    if world == 1:
        res = r.evaluate(hist, es.targets, ks, exclude_history=xh, popularity=pop)
    else:
        res = _evaluate_sharded(r, hist, es.targets, ks, xh, pop, rank, world)
    if rank == 0:
        write_json(ws.dir / "eval.json", res, indent=1)
    return res


def _evaluate_sharded(r: GenerativeRetriever, hist, targets, ks, xh: bool, pop, rank: int, world: int) -> dict:
    """``r.evaluate`` with the users split into ``world`` contiguous shards: each rank recommends for its
    own, the lists and beam counts are gathered (:func:`gather_objects`) and every rank computes the
    metrics of all users, the same as one process does."""
    if max(ks) > r.beam_width:
        raise ValueError(f"beam_width ({r.beam_width}) must be >= the largest K ({max(ks)})")
    lo, hi = rank * len(hist) // world, (rank + 1) * len(hist) // world
    rec = r.recommend(hist[lo:hi], max(ks), exclude_history=xh) if hi > lo else None
    parts = gather_objects(None if rec is None else (rec.items, rec.invalid, rec.beams))
    items = [i for p in parts if p is not None for i in p[0]]
    invalid, beams = sum(p[1] for p in parts if p is not None), sum(p[2] for p in parts if p is not None)
    return evaluate_lists(items, targets, r.num_items, ks, invalid_rate=invalid / beams if beams else 0.0,
                          popularity=pop)


def run_recommend(ws: Workspace, history_ids: list[str], k: int = 10, model_dir=None) -> list[dict]:
    """Top-k items for one history given as raw item ids."""
    index = ws.data.item_index()
    unknown = [h for h in history_ids if h not in index]
    if unknown:
        raise ValueError(f"unknown item ids in the history: {unknown[:5]}")
    r = retriever(ws, model_dir or ws.dir / "sft" / "model")
    rec = r.recommend([np.asarray([index[h] for h in history_ids], np.int64)], k)
    items = ws.data.items
    return [{"item": ws.data.item_ids[i], "title": (items[i].get("title") if items else None)} for i in rec.items[0]]
