"""The pipeline's model stages on the JAX twin (:mod:`plumrec.jax`): CPT, SFT and evaluation over the same
workspace, corpora, batches and model folders as the torch stages (:mod:`plumrec.pipeline.stages`).

The SIDs, the trie and the base model's initial weights come from the shared stages (the SID tokenizer
is not part of the model layer; the fresh model is the torch preset's, converted with
``params_from_torch_state``, so both backends start from the same weights). Models are saved in the
torch folder layout, so ``plum eval`` (torch) reads a JAX-trained model and the other way round.

Kernels: ``impl=None`` runs the Pallas kernels on a TPU and the jnp reference kernels elsewhere;
:func:`kernels_used` names which.
"""
from __future__ import annotations

import os

import jax

from plumrec.jax import JaxRetriever, level_bounds, make_loss, params_from_torch_state, save_model
from plumrec.jax.loop import train
from plumrec.pipeline.config import train_config
from plumrec.pipeline.stages import (
    base_model,
    cpt_corpus,
    eval_set,
    exclude_history,
    sft_dataset,
    training_popularity,
)
from plumrec.pipeline.workspace import Workspace, load_model

__all__ = ["kernels_used", "run_cpt_jax", "run_sft_jax", "run_eval_jax"]


def kernels_used(impl: str | None) -> str:
    """Which kernels ``impl`` runs on this machine's default JAX backend, in words."""
    backend = jax.default_backend()
    if impl == "pallas" or (impl is None and backend == "tpu"):
        return f"Pallas ({'TPU' if backend == 'tpu' else 'interpret mode on ' + backend})"
    return f"jnp reference ({backend})"


def run_cpt_jax(ws: Workspace, *, impl: str | None = None, progress: bool = True) -> dict:
    """CPT in JAX from :func:`~plumrec.pipeline.stages.base_model`'s weights on the torch stage's corpus;
    saves ``workdir/cpt/model``. Returns the last metrics row."""
    codes, _, sizes = ws.sid()
    model, vocab, text = base_model(ws, sizes)
    cfg = model.config
    corpus = cpt_corpus(ws, vocab, text, codes)
    res = train(params_from_torch_state(model.state_dict(), cfg), corpus, train_config(ws.cfg["cpt"], ws.cfg["seed"],
                progress), ws.dir / "cpt", cfg=cfg, loss_fn=make_loss(cfg, impl=impl), desc="CPT (JAX)")
    save_model(res.params, cfg, vocab, text, ws.dir / "cpt" / "model")
    return res.metrics


def run_sft_jax(ws: Workspace, *, impl: str | None = None, progress: bool = True) -> dict:
    """SFT in JAX from the CPT model (``sft.init = "cpt"`` only) on the torch stage's dataset, with the
    ``sft.loss`` of the config (``"codebook"``: label smoothing and level weights; ``"vocab"``); saves
    ``workdir/sft/model``. ``sft.item_loss`` and ``sft.distill`` are torch-only: a ValueError names them."""
    c = ws.cfg["sft"]
    for key in ("item_loss", "distill"):
        if c.get(key):
            raise ValueError(f"sft.{key}={c[key]!r}: the JAX backend trains without it (set it to 0, or use the "
                             "torch backend)")
    if c["init"] != "cpt":
        raise ValueError(f"sft.init={c['init']!r}: the JAX backend starts SFT from the CPT model ('cpt')")
    codes, _, sizes = ws.sid()
    model, vocab, text = load_model(ws.dir / "cpt" / "model")
    vocab.check_codebooks(sizes)
    cfg = model.config
    if c["loss"] == "codebook":
        loss = make_loss(cfg, bounds=level_bounds(vocab), label_smoothing=c["label_smoothing"],
                         level_weights=c["level_weights"], impl=impl)
    else:
        loss = make_loss(cfg, impl=impl)
    res = train(params_from_torch_state(model.state_dict(), cfg), sft_dataset(ws, vocab, codes),
                train_config(c, ws.cfg["seed"], progress), ws.dir / "sft", cfg=cfg, loss_fn=loss, desc="SFT (JAX)")
    save_model(res.params, cfg, vocab, text, ws.dir / "sft" / "model")
    return res.metrics


def run_eval_jax(ws: Workspace, model_dir: str | os.PathLike | None = None, *, impl: str | None = None) -> dict:
    """:func:`~plumrec.pipeline.stages.run_eval`'s metrics with the JAX retriever (:class:`JaxRetriever`)."""
    codes, trie, sizes = ws.sid()
    model, vocab, _ = load_model(model_dir or ws.dir / "sft" / "model")
    vocab.check_codebooks(sizes)
    e, es = ws.cfg["eval"], eval_set(ws)
    r = JaxRetriever(params_from_torch_state(model.state_dict(), model.config), model.config, vocab, trie, codes,
                     beam_width=e["beam_width"], batch_size=e["batch_size"], max_items=ws.cfg["sft"]["max_items"],
                     impl=impl)
    return r.evaluate(list(es.histories), es.targets, e["ks"], exclude_history=exclude_history(ws),
                      popularity=training_popularity(ws))
