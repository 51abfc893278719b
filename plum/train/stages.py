"""The pipeline stages behind the ``plum`` CLI, over one work directory.

========  ==================================================  =============================================
stage     reads                                               writes (under ``workdir``)
========  ==================================================  =============================================
sid       data + content embeddings                           ``sid/`` tokenizer, ``codes.npy``, ``trie.safetensors``,
                                                              ``inputs.json`` (seed, ``sid`` section, embedding SHA-256)
cpt       sid artefacts, base model (preset or HF checkpoint)  ``cpt/`` checkpoint, metrics, ``cpt/model/``
sft       sid artefacts, ``cpt/model/`` (or a fresh model)    ``sft/`` checkpoint, metrics, ``sft/model/``
eval      sid artefacts, ``sft/model/``                       ``eval.json``
========  ==================================================  =============================================

A saved model directory holds ``config.json`` (:class:`ModelConfig`),
``model.safetensors``, ``vocab.json`` (:class:`SIDVocab`) and
``tokenizer.json`` (the text tokenizer). The run configuration is a dict
(from JSON or TOML, see :func:`load_run_config`) with sections ``data``,
``sid``, ``model``, ``cpt``, ``sft``, ``sasrec``, ``eval`` (:data:`DEFAULTS`);
every key has a default, the training sections also take any
:class:`TrainConfig` field (``grad_accum``, ``fsdp``, ``bf16``, ...) and
``sid`` any :class:`~plum.sid.SIDConfig` field but ``seed`` (the run's
``seed`` is the tokenizer's): ``cooccurrence_weight``, ``mask_prob``, ...
``model.sid_init_scale`` (default 0: off) adds the fitted tokenizer's
codewords, randomly projected, to the SID token embeddings of a fresh model
(:func:`~plum.model.vocab.init_sid_embeddings`).

SFT takes ``objective`` (``"sequence"``: every next item of a user's window
is a target of one example, :class:`~plum.train.corpus.SequenceSFTDataset`;
``"next_item"``: one target per example) and ``loss`` (``"codebook"``:
softmax over the target level's codebook, what beam search decodes,
:class:`~plum.train.loop.CodebookLoss`; ``"vocab"``: over the whole
vocabulary). The defaults are the first of each: on the demo they raise
Recall@10 from 0.385 to 0.404 (sft_only 0.275 to 0.400) for the same steps.
With the codebook loss, ``label_smoothing`` (default 0) smooths each target
over its level's codebook, ``level_weights`` (default none: all 1) weights
each SID level's cross-entropy, ``item_loss`` (default 0: off) adds the
codebook loss's training-only item-level softmax over the catalogue's SIDs, and
``distill`` (default 0: off; ``distill_temperature`` 1) mixes each target's
label with a trained item model's next-item distribution: the run's SASRec
baseline (section ``sasrec``, :func:`run_sasrec`), or a teacher passed to
:func:`run_sft`.

Several processes: ``torchrun --nproc_per_node N -m plum.cli cpt --config
run.toml`` (DDP; ``fsdp = true`` in the section for FSDP2).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch

from plum.model.config import ModelConfig, preset
from plum.model.model import PlumLM
from plum.model.vocab import SIDVocab, TextTokenizer, extend_vocabulary, init_sid_embeddings, train_word_tokenizer
from plum.sid.tokenizer import SIDConfig
from plum.train.corpus import CPTCorpus, SequenceSFTDataset, SFTDataset, grounding_text
from plum.train.loop import (CodebookLoss, TrainConfig, check_distill, check_distill_temperature, check_item_loss,
                             check_label_smoothing, check_level_weights, default_device, dist_env, full_model_state,
                             lm_loss, train)

__all__ = ["load_run_config", "DEFAULTS", "Workspace", "save_model", "load_model", "run_sid", "run_cpt",
           "run_sft", "cpt_corpus", "embeddings_digest", "sft_dataset", "sft_loss", "run_eval", "run_recommend",
           "exclude_history", "sasrec_baseline", "run_sasrec"]

# The defaults are `plum demo`'s budget: 3.5 min wall on this project's idle 2-core CPU, 5-7 min
# when the machine is shared (measured 2026-11-23, torch 2.13 CPU, 1 thread). CPT 40 -> 80 steps raised
# plum's Recall@10 from 0.358 to 0.385 (sft_only 0.275, popularity 0.141) for +25 s. SFT with the
# "sequence" objective and the "codebook" loss (same steps) then raised it to 0.404 (sft_only 0.400).
DEFAULTS: dict = {
    "workdir": "runs/plum",
    "seed": 0,
    "data": {"synthetic": {}, "path": None, "embeddings": None},
    "sid": {"codebook_sizes": [64, 32, 16], "epochs": 30, "warmup_epochs": 5, "hidden_dims": [128, 64],
            "latent_dim": 16, "batch_size": 256},
    "model": {"preset": "tiny", "hf_checkpoint": None, "overrides": {}, "sid_init_scale": 0.0},
    "cpt": {"steps": 80, "lr": 3e-3, "warmup_steps": 10, "max_tokens": 4096, "behaviour_fraction": 0.5,
            "max_items": 20},
    "sft": {"steps": 60, "lr": 3e-3, "warmup_steps": 5, "max_tokens": 4096, "max_items": 20, "init": "cpt",
            "objective": "sequence", "loss": "codebook", "label_smoothing": 0.0,
            "level_weights": None, "item_loss": 0.0, "distill": 0.0, "distill_temperature": 1.0},
    "sasrec": {"steps": 150, "lr": 1e-3, "max_tokens": 2048},
    "eval": {"beam_width": 10, "batch_size": 100, "ks": [5, 10], "split": "test", "exclude_history": False},
}
_LOADER_KEYS = {"behaviour_fraction", "max_items", "init", "objective", "loss", "label_smoothing", "level_weights",
                "item_loss", "distill", "distill_temperature"}
SFT_OBJECTIVES = ("next_item", "sequence")
SFT_LOSSES = ("vocab", "codebook")
_TRAIN_SECTIONS = ("cpt.", "sft.", "sasrec.")  # also take every TrainConfig field (grad_accum, fsdp, bf16, ...)


def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = dict(base)
    allowed = set(base)
    if where in _TRAIN_SECTIONS:
        allowed |= {f.name for f in dataclasses.fields(TrainConfig)}
    elif where == "sid.":
        allowed |= {f.name for f in dataclasses.fields(SIDConfig)} - {"seed"}
    for k, v in over.items():
        if k not in allowed:
            raise ValueError(f"unknown config key {where + k!r}; known: {sorted(allowed)}")
        if k not in base:
            out[k] = v
            continue
        out[k] = _merge(base[k], v, f"{where}{k}.") if isinstance(base[k], dict) and isinstance(v, dict) and \
            k not in ("synthetic", "overrides") else v
    return out


def load_run_config(path: str | os.PathLike | None = None, **overrides) -> dict:
    """Defaults updated by a JSON (``.json``) or TOML (``.toml``) file, then by ``overrides``."""
    cfg = DEFAULTS
    if path is not None:
        p = Path(path)
        if p.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ValueError("TOML configs need Python >= 3.11 (tomllib); use a .json config") from None
            with open(p, "rb") as f:
                user = tomllib.load(f)
        elif p.suffix == ".json":
            user = json.loads(p.read_text())
        else:
            raise ValueError(f"config file must end in .json or .toml, got {p.name}")
        cfg = _merge(cfg, user)
    return _merge(cfg, overrides)


def _train_config(section: dict, seed: int, progress: bool) -> TrainConfig:
    fields = {k: v for k, v in section.items() if k not in _LOADER_KEYS}
    fields.setdefault("seed", seed)
    fields.setdefault("progress", progress)
    return TrainConfig.from_dict(fields)


# ----------------------------------------------------------------------------- artefacts

def embeddings_digest(embeddings) -> list[str]:
    """SHA-256 of each embedding array (dtype, shape and bytes): what SIDs were fitted on."""
    import hashlib

    return [hashlib.sha256(f"{e.dtype}{e.shape}".encode() + np.ascontiguousarray(e).tobytes()).hexdigest()
            for e in embeddings]


def save_model(model: PlumLM, vocab: SIDVocab, text: TextTokenizer, path: str | os.PathLike) -> Path:
    """Write a model directory (every rank must call it when distributed; rank 0 writes)."""
    from safetensors.torch import save_file

    state = full_model_state(model)
    p = Path(path)
    if dist_env()[0] != 0:
        return p
    p.mkdir(parents=True, exist_ok=True)
    (p / "config.json").write_text(model.config.to_json())
    (p / "vocab.json").write_text(json.dumps(vocab.to_dict()))
    text.save(str(p / "tokenizer.json"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(p / "model.safetensors"))
    return p


def load_model(path: str | os.PathLike, device="cpu") -> tuple[PlumLM, SIDVocab, TextTokenizer]:
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p} is not a saved PLUM model (no config.json)")
    cfg_dict = json.loads((p / "config.json").read_text())
    if "model_type" in cfg_dict:
        raise ValueError(f"{p} is a Hugging Face checkpoint; load it with plum.model.hf.load_hf_model")
    model = PlumLM(ModelConfig.from_dict(cfg_dict))
    model.load_state_dict(load_file(str(p / "model.safetensors")))
    vocab = SIDVocab.from_dict(json.loads((p / "vocab.json").read_text()))
    vocab.check_model(model.config.vocab_size)
    return model.to(device), vocab, TextTokenizer.load(str(p / "tokenizer.json"))


class Workspace:
    """Data and SID artefacts of a run, loaded once."""

    def __init__(self, cfg: dict):
        from plum.data import leave_one_out

        self.cfg = cfg
        self.dir = Path(cfg["workdir"])
        self.dir.mkdir(parents=True, exist_ok=True)
        d = cfg["data"]
        if d["path"]:
            from plum.data import load_dataset

            self.data = load_dataset(d["path"])
            if not d["embeddings"]:
                raise ValueError("data.embeddings must list .npy files of item content embeddings for data.path")
            self.embeddings = [np.load(e) for e in d["embeddings"]]
        else:
            from plum.data import make_synthetic_catalogue

            syn = make_synthetic_catalogue(**{"seed": cfg["seed"], **d["synthetic"]})
            self.data, self.embeddings = syn.data, [syn.embeddings["text"], syn.embeddings["meta"]]
        self.split = leave_one_out(self.data)

    @property
    def num_items(self) -> int:
        return self.data.num_items

    def sid(self):
        """The SID artefacts of ``workdir/sid``: ``(codes [num_items, L] int, trie, codebook_sizes)``.

        Refuses (``ValueError`` naming the field) SIDs fitted with another ``sid`` config
        section or seed, or on other embeddings than ``data.embeddings`` (widths, and the
        SHA-256 recorded by :func:`run_sid` in ``sid/inputs.json``): re-run ``plum sid``.
        """
        from plum.sid import SemanticIdTokenizer, SIDTrie

        path = self.dir / "sid"
        if not (path / "codes.npy").exists():
            raise FileNotFoundError(f"{path}/codes.npy not found: run `plum sid` first")
        self._check_sid(path)
        codes = np.load(path / "codes.npy")
        trie = SIDTrie.load(str(path / "trie.safetensors"), mmap=False)
        if len(codes) != self.num_items:
            raise ValueError(f"{path} has SIDs for {len(codes)} items but the data has {self.num_items}")
        return codes, trie, SemanticIdTokenizer.load(path).codebook_sizes

    def sid_inputs(self) -> dict:
        """What the SIDs are fitted from: the seed, the ``sid`` section and the embeddings' digests."""
        return {"seed": self.cfg["seed"], "sid": json.loads(json.dumps(self.cfg["sid"])),
                "embeddings_sha256": embeddings_digest(self.embeddings)}

    def _check_sid(self, path: Path) -> None:
        saved = json.loads((path / "config.json").read_text())
        inputs = self.sid_inputs()
        # Both sides as complete, normalised SIDConfigs, so that a field the run config leaves at its
        # default is compared too (a field added since the fit takes its default on both sides).
        fitted = dataclasses.asdict(SIDConfig(**saved["config"]))
        wanted = dataclasses.asdict(SIDConfig(**{**inputs["sid"], "seed": inputs["seed"]}))
        hint = "re-run `plum sid` (or use another workdir)"
        for k, v in wanted.items():
            if fitted[k] != v:
                name = "seed" if k == "seed" else f"sid.{k}"
                raise ValueError(f"{path} was fitted with {name}={fitted[k]!r}, the run config says {v!r}: {hint}")
        dims = [int(e.shape[1]) for e in self.embeddings]
        if list(saved["input_dims"]) != dims:
            raise ValueError(f"{path} was fitted on embeddings of widths {saved['input_dims']}, data.embeddings "
                             f"have {dims}: {hint}")
        rec = path / "inputs.json"
        if rec.exists() and json.loads(rec.read_text())["embeddings_sha256"] != inputs["embeddings_sha256"]:
            raise ValueError(f"{path} was fitted on other embeddings than data.embeddings "
                             f"(their SHA-256 differ from {rec}): {hint}")

    def grounding_texts(self) -> list[str]:
        items = self.data.items or [{} for _ in range(self.num_items)]
        return [grounding_text(m) for m in items]


# ----------------------------------------------------------------------------- stages

def run_sid(ws: Workspace, *, progress: bool = True) -> dict:
    """Fit the SID tokenizer on the content embeddings (+ co-occurrence), build the trie."""
    from plum.data import cooccurrence_pairs
    from plum.sid import SemanticIdTokenizer, build_trie

    c = dict(ws.cfg["sid"])
    sizes = tuple(c.pop("codebook_sizes"))
    tok = SemanticIdTokenizer(sizes, seed=ws.cfg["seed"], **c)
    pairs = cooccurrence_pairs(ws.split.train, ws.num_items)
    codes = tok.fit(ws.embeddings, pairs, progress=progress)
    path = ws.dir / "sid"
    tok.save(path)
    np.save(path / "codes.npy", codes)
    trie = build_trie(codes, sizes)
    trie.save(str(path / "trie.safetensors"))
    (path / "inputs.json").write_text(json.dumps(ws.sid_inputs(), indent=1))
    unique = len(np.unique(codes, axis=0)) / len(codes)
    return {"items": len(codes), "codebook_sizes": list(sizes), "unique_sid_fraction": unique}


SID_INIT_SEED_OFFSET = 1000  # the codeword projections' seed is the run's seed + this (apart from the model's)


def base_model(ws: Workspace, codebook_sizes) -> tuple[PlumLM, SIDVocab, TextTokenizer]:
    """A fresh model: a preset trained from scratch with a word-level tokenizer, or an HF
    checkpoint with its tokenizer, its vocabulary extended with the SID tokens. With
    ``model.sid_init_scale`` > 0 the SID rows also get the tokenizer's codewords
    (:func:`~plum.model.vocab.init_sid_embeddings`, rows of that mean norm)."""
    m = ws.cfg["model"]
    scale = m.get("sid_init_scale", 0.0)
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and np.isfinite(scale) and scale >= 0):
        raise ValueError(f"model.sid_init_scale must be a finite number >= 0 (0: off), got {scale!r}")
    torch.manual_seed(ws.cfg["seed"])
    if m["hf_checkpoint"]:
        from plum.model.hf import load_hf_model, load_tokenizer

        model = load_hf_model(m["hf_checkpoint"], **m["overrides"])
        text = load_tokenizer(m["hf_checkpoint"])
        vocab = SIDVocab(model.config.vocab_size, tuple(codebook_sizes))
        model = extend_vocabulary(model, vocab, seed=ws.cfg["seed"])
    else:
        text = train_word_tokenizer(ws.grounding_texts())
        vocab = SIDVocab(text.vocab_size, tuple(codebook_sizes))
        model = PlumLM(preset(m["preset"], vocab_size=vocab.size, **m["overrides"]))
    if scale:
        from plum.sid import SemanticIdTokenizer

        codewords = SemanticIdTokenizer.load(ws.dir / "sid").codewords
        init_sid_embeddings(model, vocab, codewords, scale=float(scale), seed=ws.cfg["seed"] + SID_INIT_SEED_OFFSET)
    return model, vocab, text


def cpt_corpus(ws: Workspace, vocab: SIDVocab, text: TextTokenizer, codes: np.ndarray) -> CPTCorpus:
    """The CPT corpus of the ``cpt`` section: training histories in SIDs mixed with grounding text."""
    c = ws.cfg["cpt"]
    return CPTCorpus(ws.split.train, vocab.sid_to_tokens(codes), vocab, text_tokenizer=text, items=ws.data.items,
                     behaviour_fraction=c["behaviour_fraction"], max_items=c["max_items"], seed=ws.cfg["seed"])


def run_cpt(ws: Workspace, *, progress: bool = True) -> dict:
    codes, _, sizes = ws.sid()
    model, vocab, text = base_model(ws, sizes)
    c = ws.cfg["cpt"]
    corpus = cpt_corpus(ws, vocab, text, codes)
    model = model.to(default_device())
    metrics = train(model, corpus, _train_config(c, ws.cfg["seed"], progress), ws.dir / "cpt", desc="CPT")
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
    :class:`plum.baselines.SASRec` is, e.g. ``benchmarks/bench_retrieval.py``'s
    SASRec baseline) only for ``sft.distill`` > 0, which distils it into the
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
        raise ValueError(f"sft.distill={distill!r} needs a teacher: a trained item model (plum.baselines.SASRec) "
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
    """The SASRec baseline of the run: a fresh :class:`plum.baselines.SASRec` (``SASRecConfig`` fields
    ``overrides``; its window is ``sft.max_items``) seeded by ``seed``, its training sequences (the
    split's ``train``, never a target of valid or test), and its ``TrainConfig`` (warm-up 10 steps, no
    weight decay, then section ``sasrec``). Returns ``(model, dataset, train_config, loss_fn)``."""
    from plum.baselines import SASRec, SASRecConfig, SequenceDataset, sasrec_loss

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


def run_sft(ws: Workspace, *, init: str | None = None, out: str = "sft", progress: bool = True,
            teacher=None) -> dict:
    """SFT from ``init``: ``"cpt"`` (the CPT model) or ``"scratch"`` (PLUM's SFT-only ablation).
    With ``sft.distill`` > 0 it distils ``teacher`` (see :func:`sft_loss`), by default the run's
    SASRec baseline (:func:`run_sasrec`, trained first when ``WORKDIR/sasrec`` has not finished)."""
    codes, _, sizes = ws.sid()
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
    metrics = train(model, data, _train_config(c, ws.cfg["seed"], progress), ws.dir / out, desc=f"SFT ({init})",
                    loss_fn=sft_loss(ws, vocab, codes, teacher=teacher))
    save_model(model, vocab, text, ws.dir / out / "model")
    return metrics


def exclude_history(ws: Workspace) -> bool:
    """``eval.exclude_history``: drop each user's history items from its ranking (every model)."""
    x = ws.cfg["eval"].get("exclude_history", False)
    if not isinstance(x, bool):
        raise ValueError(f"eval.exclude_history must be true or false, got {x!r}")
    return x


def _eval_set(ws: Workspace):
    split = ws.cfg["eval"]["split"]
    if split not in ("test", "valid"):
        raise ValueError(f"eval.split must be 'test' or 'valid', got {split!r}")
    return getattr(ws.split, split)


def retriever(ws: Workspace, model_dir: str | os.PathLike):
    from plum.retrieval import GenerativeRetriever

    codes, trie, sizes = ws.sid()
    model, vocab, _ = load_model(model_dir, device=default_device())
    vocab.check_codebooks(sizes)
    e = ws.cfg["eval"]
    return GenerativeRetriever(model, vocab, trie, codes, beam_width=e["beam_width"], batch_size=e["batch_size"],
                               max_items=ws.cfg["sft"]["max_items"])


def run_eval(ws: Workspace, model_dir: str | os.PathLike | None = None) -> dict:
    es = _eval_set(ws)
    r = retriever(ws, model_dir or ws.dir / "sft" / "model")
    res = r.evaluate(list(es.histories), es.targets, ws.cfg["eval"]["ks"], exclude_history=exclude_history(ws))
    (ws.dir / "eval.json").write_text(json.dumps(res, indent=1))
    return res


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
