"""CPT and SFT losses of the JAX PLUM LM on a packed batch, and a jit-compiled optax training step.

- :class:`Batch`: a packed batch as a pytree (``max_seqlen`` static), built from
  :class:`plumrec.sequences.PackedBatch` by :func:`batch_from_packed`;
- :func:`lm_loss`: CPT's weighted next-token cross-entropy over the whole vocabulary plus the router
  aux losses (``plumrec.train.losses.lm_loss``);
- :func:`codebook_loss`: SFT's cross-entropy over each target's SID codebook, with label smoothing and
  per-level weights (``plumrec.train.CodebookLoss`` without its item-level and distillation terms);
- :func:`make_optimizer`: ``plumrec.train.optim.make_optimizer``'s AdamW (betas, eps 1e-8, weight decay
  on the matrices only) behind torch's ``clip_grad_norm_``, on the schedule of
  ``plumrec.train.optim.lr_lambda``;
- :func:`make_train_step`: one jit-compiled update ``(params, opt_state, batch) -> (params, opt_state,
  loss, parts)``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from plumrec.jax.model import forward, lm_logits
from plumrec.model.config import ModelConfig
from plumrec.sequences import PackedBatch
from plumrec.train.config import TrainConfig
from plumrec.train.optim import lr_lambda

__all__ = ["Batch", "batch_from_packed", "level_bounds", "lm_loss", "codebook_loss", "make_loss", "clip_grad_norm",
           "lr_schedule", "make_optimizer", "make_train_step", "global_norm"]


@dataclasses.dataclass(frozen=True)
class Batch:
    """A packed batch (:class:`plumrec.sequences.PackedBatch`) as a JAX pytree.

    ``input_ids`` int32 ``[T]``; ``cu_seqlens`` int32 ``[B+1]``; ``loss_index`` int32 ``[M]`` (packed
    positions whose next token carries a loss); ``targets`` int32 ``[M]`` (those next tokens);
    ``weights`` float32 ``[M]`` (their loss weights); ``max_seqlen``: Python int, static (a pytree
    meta field: a new value retraces a jitted function); ``token_mask``: optional bool ``[T]``, False on
    padding tokens (added to reach a fixed shape), which then count in no router aux loss (they carry no
    loss target either); None: every token is real.
    """

    input_ids: jax.Array
    cu_seqlens: jax.Array
    loss_index: jax.Array
    targets: jax.Array
    weights: jax.Array
    max_seqlen: int
    token_mask: jax.Array | None = None


jax.tree_util.register_dataclass(Batch, data_fields=["input_ids", "cu_seqlens", "loss_index", "targets", "weights",
                                                     "token_mask"], meta_fields=["max_seqlen"])


def batch_from_packed(batch: PackedBatch) -> Batch:
    """The JAX copy of a torch :class:`~plumrec.sequences.PackedBatch` (ids as int32, weights float32)."""
    if not isinstance(batch, PackedBatch):
        raise TypeError(f"batch must be a plumrec.sequences.PackedBatch, got {type(batch).__name__}")

    def host(t, dtype):
        return jnp.asarray(np.asarray(t.detach().cpu().numpy(), dtype))

    return Batch(host(batch.input_ids, np.int32), host(batch.cu_seqlens, np.int32), host(batch.loss_index, np.int32),
                 host(batch.targets, np.int32), host(batch.weights, np.float32), int(batch.max_seqlen))


def level_bounds(vocab) -> tuple[int, ...]:
    """The token-id bounds of the SID levels of a :class:`plumrec.model.SIDVocab`: level ``l`` is
    ``[bounds[l], bounds[l+1])``; the levels must be contiguous (as ``CodebookLoss`` requires)."""
    slices = [vocab.level_slice(l) for l in range(vocab.num_levels)]
    if any(a.stop != b.start for a, b in zip(slices, slices[1:])):
        raise ValueError("the SID levels must be contiguous in the vocabulary")
    return tuple(sl.start for sl in slices) + (slices[-1].stop,)


def _weighted(weighted_ce_sum, batch: Batch, aux) -> tuple[jax.Array, dict]:
    """``sum(w * ce) / sum(w)`` plus the router aux losses, and the logged parts (``plumrec.train.losses``)."""
    ce = weighted_ce_sum / jnp.maximum(jnp.sum(batch.weights), 1e-12)
    return ce + aux, {"ce": ce, "aux": aux}


def lm_loss(params: dict, cfg: ModelConfig, batch: Batch, *, impl: str | None = None, interpret: bool | None = None,
            dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """CPT's loss: weighted next-token cross-entropy over the whole vocabulary at ``batch.loss_index``
    (float32) plus the router aux losses. Returns ``(loss [], {"ce": [], "aux": []})``."""
    _, logits, aux = forward(params, cfg, batch.input_ids, batch.cu_seqlens, batch.max_seqlen,
                             logits_index=batch.loss_index, impl=impl, interpret=interpret, dropout_key=dropout_key,
                             token_mask=batch.token_mask)
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    ce = -jnp.take_along_axis(logp, batch.targets[:, None], axis=-1)[:, 0]
    return _weighted(jnp.sum(ce * batch.weights), batch, aux)


def codebook_loss(params: dict, cfg: ModelConfig, batch: Batch, bounds: tuple[int, ...], *,
                  label_smoothing: float = 0.0, level_weights: tuple[float, ...] | None = None,
                  impl: str | None = None, interpret: bool | None = None,
                  dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """SFT's loss: every target (a SID token of level ``l``, ``bounds[l] <= target < bounds[l+1]``, see
    :func:`level_bounds`) is scored by cross-entropy over level ``l``'s codebook only, the one-hot label
    mixed with ``label_smoothing`` (in [0, 1)) of the uniform distribution over that codebook; each
    target's CE is weighted by ``level_weights[l]`` (default 1) and its ``batch.weights`` entry, summed
    and divided by the sum of ``batch.weights``; the router aux losses are added. A target outside the
    SID levels has an infinite loss (torch's ``CodebookLoss`` raises; here values are not checked).
    Returns ``(loss [], {"ce": [], "aux": []})``."""
    L = len(bounds) - 1
    if L < 1 or any(b <= a for a, b in zip(bounds[:-1], bounds[1:])) or bounds[0] < 0 or bounds[-1] > cfg.vocab_size:
        raise ValueError(f"bounds must be increasing token ids within [0, vocab_size={cfg.vocab_size}], got {bounds}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if level_weights is not None and (len(level_weights) != L or min(level_weights) < 0):
        raise ValueError(f"level_weights must be {L} weights >= 0 (one per SID level), got {level_weights!r}")
    hidden, _, aux = forward(params, cfg, batch.input_ids, batch.cu_seqlens, batch.max_seqlen,
                             logits_index=batch.loss_index, logits=False, impl=impl, interpret=interpret,
                             dropout_key=dropout_key, token_mask=batch.token_mask)
    logits = lm_logits(params, hidden, slice(bounds[0], bounds[-1]))                      # [M, S] all levels
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    col_level = np.repeat(np.arange(L), np.diff(bounds))                                   # [S]
    level = jnp.clip(jnp.searchsorted(jnp.asarray(bounds), batch.targets, side="right") - 1, 0, L - 1)
    mine = jnp.asarray(col_level)[None, :] == level[:, None]                               # [M, S]
    logp = jax.nn.log_softmax(jnp.where(mine, logits, -jnp.inf), axis=-1)
    ce = -jnp.take_along_axis(logp, (batch.targets - bounds[0])[:, None], axis=-1)[:, 0]
    if label_smoothing:
        sizes = jnp.asarray(np.diff(bounds), logp.dtype)[level]
        uniform = -jnp.sum(jnp.where(mine, logp, 0.0), axis=-1) / sizes
        ce = (1.0 - label_smoothing) * ce + label_smoothing * uniform
    if level_weights is not None:
        ce = ce * jnp.asarray(level_weights, ce.dtype)[level]
    return _weighted(jnp.sum(ce * batch.weights.astype(ce.dtype)), batch, aux)


def make_loss(cfg: ModelConfig, *, bounds: tuple[int, ...] | None = None, label_smoothing: float = 0.0,
              level_weights: tuple[float, ...] | None = None, impl: str | None = None,
              interpret: bool | None = None) -> Callable:
    """``loss_fn(params, batch, dropout_key) -> (loss, parts)``: :func:`codebook_loss` (SFT) with the SID
    level ``bounds``, or :func:`lm_loss` (CPT) when ``bounds`` is None."""
    if bounds is None:
        if label_smoothing or level_weights is not None:
            raise ValueError("label_smoothing and level_weights belong to the SFT loss: pass bounds")
        return lambda params, batch, key=None: lm_loss(params, cfg, batch, impl=impl, interpret=interpret,
                                                       dropout_key=key)
    bounds = tuple(int(b) for b in bounds)
    lw = None if level_weights is None else tuple(float(w) for w in level_weights)
    return lambda params, batch, key=None: codebook_loss(params, cfg, batch, bounds, label_smoothing=label_smoothing,
                                                         level_weights=lw, impl=impl, interpret=interpret,
                                                         dropout_key=key)


def global_norm(tree) -> jax.Array:
    """The L2 norm of all the leaves of ``tree`` together (torch's ``clip_grad_norm_`` total norm)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
    """torch's ``clip_grad_norm_``: gradients times ``min(1, max_norm / (global_norm + 1e-6))``."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")

    def update(updates, state, params=None):
        scale = jnp.minimum(1.0, max_norm / (global_norm(updates) + 1e-6))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def lr_schedule(tcfg: TrainConfig) -> Callable:
    """``count -> lr``: ``tcfg.lr * lr_lambda(tcfg)(count)`` (warm-up, then cosine decay) as a table, so
    the schedule is torch's ``LambdaLR`` exactly (it stays at its last value past ``steps``)."""
    f = lr_lambda(tcfg)
    n = max(tcfg.steps, tcfg.warmup_steps) + 2
    table = jnp.asarray([tcfg.lr * f(s) for s in range(n)], jnp.float32)
    return lambda count: table[jnp.minimum(count, n - 1)]


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    """``plumrec.train.optim.make_optimizer`` in optax: ``clip_grad_norm(tcfg.grad_clip)`` (none when 0),
    then AdamW with ``tcfg.betas``, eps 1e-8 (torch's default), decoupled weight decay
    ``tcfg.weight_decay`` on the parameters with >= 2 dims only (no norm weights; the model has no
    biases), learning rate :func:`lr_schedule`."""
    adamw = optax.adamw(lr_schedule(tcfg), b1=tcfg.betas[0], b2=tcfg.betas[1], eps=1e-8,
                        weight_decay=tcfg.weight_decay, mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p))
    return optax.chain(clip_grad_norm(tcfg.grad_clip), adamw) if tcfg.grad_clip else adamw


def make_train_step(loss_fn: Callable, tcfg: TrainConfig) -> tuple[optax.GradientTransformation, Callable]:
    """``(optimizer, train_step)``: :func:`make_optimizer` ``(tcfg)`` and the jit-compiled
    ``train_step(params, opt_state, batch, dropout_key=None) -> (params, opt_state, loss, parts)`` of
    ``loss_fn`` (:func:`make_loss`); ``parts`` adds ``grad_norm`` (before clipping). Start with
    ``opt_state = optimizer.init(params)``."""
    opt = make_optimizer(tcfg)

    @jax.jit
    def train_step(params, opt_state, batch: Batch, dropout_key=None):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, dropout_key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, {**parts, "grad_norm": global_norm(grads)}

    return opt, train_step
