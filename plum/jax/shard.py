"""The JAX training step on a ``jax.sharding.Mesh``: data parallelism over packed batches and expert
parallelism over the MoE weights, by sharding annotations (``jax.jit`` + GSPMD).

The mesh has two axes, ``"data"`` (:data:`DATA`) and ``"expert"`` (:data:`EXPERT`), made by
:func:`make_mesh`:

- parameters (:func:`param_shardings`, :func:`shard_params`): the routed experts' weights
  ``layers.i.mlp.w_gate_up [E, d, 2f]`` and ``layers.i.mlp.w_down [E, f, d]`` are split over
  ``"expert"`` on their expert axis (``E / n_expert`` experts per device); every other parameter is
  replicated. The optimizer moments follow the sharding of their parameter.
- batches (:func:`stack_batches`, :func:`shard_batch`): one packed :class:`~plumrec.jax.train.Batch`
  per data shard, padded to common sizes and stacked on a leading ``[D]`` axis that is split over
  ``"data"`` (and replicated over ``"expert"``). Each shard keeps its own ``cu_seqlens`` starting at 0.
- the step (:func:`make_sharded_train_step`) concatenates the shards into one packed batch
  (:func:`concat_batch`) and runs the unsharded loss on it: the loss is ``sum(w * ce) / sum(w)``
  over the targets of all shards plus the router aux losses of all tokens, and the gradients and the
  update are those of :func:`plumrec.jax.train.make_train_step` on that concatenated batch. XLA's
  SPMD partitioner places the work from the shardings of the inputs and of the constrained outputs
  (parameters, optimizer state); it inserts the collectives (gathers of expert weights or tokens,
  the reduction of the gradients over ``"data"``) itself.

Which ops run where is XLA's choice (it may gather the tokens of all shards for the attention, or the
expert weights for the MoE layers): this is the sharding-annotation form, for the jnp reference
kernels (``impl="reference"``, or ``impl=None`` off a TPU), which XLA can partition. Its results equal
the unsharded step's up to the rounding of sums that XLA orders differently once partitioned (the MoE
reference computes in float32). A Pallas kernel is an opaque custom call to the partitioner, so the
Pallas kernels on a real TPU mesh need the ``shard_map`` form instead (per-device attention on whole
sequences, and an all-to-all of the routed tokens to the devices that hold their experts, with the
router losses reduced over all shards), which this module does not provide.

Padding: a shard shorter than the longest one gets pad tokens (id ``pad_id``) that form one extra
sequence at its end, marked False in the batch's ``token_mask``: they carry no loss target and the MoE
router's load-balance and z losses leave them out, so the step equals the unsharded step on the plain
concatenation of the shards' sequences. Pad loss entries repeat the shard's first target with weight 0
(they add exactly 0).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from plumrec.jax.model import param_shapes
from plumrec.jax.train import Batch, batch_from_packed, global_norm, make_optimizer
from plumrec.model.config import ModelConfig
from plumrec.sequences import PackedBatch
from plumrec.train.config import TrainConfig

__all__ = ["DATA", "EXPERT", "make_mesh", "is_expert_param", "param_shardings", "shard_params", "stack_batches",
           "shard_batch", "concat_batch", "make_sharded_train_step"]

DATA = "data"
EXPERT = "expert"
_EXPERT_SUFFIXES = ("mlp.w_gate_up", "mlp.w_down")


def make_mesh(data: int, expert: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ``(data, expert)`` mesh with axes ``("data", "expert")`` over the first ``data * expert`` of
    ``devices`` (default ``jax.devices()``), row-major (devices of one data shard are adjacent)."""
    if not (isinstance(data, int) and isinstance(expert, int) and data >= 1 and expert >= 1):
        raise ValueError(f"data and expert must be ints >= 1, got data={data!r}, expert={expert!r}")
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < data * expert:
        raise ValueError(f"a {data}x{expert} mesh needs {data * expert} devices, got {len(devices)}")
    return Mesh(np.array(devices[:data * expert]).reshape(data, expert), (DATA, EXPERT))


def _check_mesh(mesh) -> None:
    if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != (DATA, EXPERT):
        raise ValueError(f"mesh must be a jax.sharding.Mesh with axes ({DATA!r}, {EXPERT!r}) (see make_mesh), "
                         f"got {getattr(mesh, 'axis_names', type(mesh).__name__)}")


def is_expert_param(name: str) -> bool:
    """Whether the parameter ``name`` is a routed expert weight (split over ``"expert"`` on axis 0)."""
    return name.endswith(_EXPERT_SUFFIXES)


def _sharding(name: str, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    if not is_expert_param(name):
        return NamedSharding(mesh, P())
    n = mesh.shape[EXPERT]
    if shape[0] % n:
        raise ValueError(f"{name} has {shape[0]} experts, not divisible by the mesh's {n} expert shards")
    return NamedSharding(mesh, P(EXPERT, *([None] * (len(shape) - 1))))


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict[str, NamedSharding]:
    """Every parameter's ``NamedSharding`` on ``mesh`` (names of :func:`plumrec.jax.model.param_shapes`):
    ``mlp.w_gate_up [E, d, 2f]`` and ``mlp.w_down [E, f, d]`` split over ``"expert"`` on axis 0 (``E``
    must be divisible by the expert axis's size), all others replicated."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    _check_mesh(mesh)
    return {name: _sharding(name, shape, mesh) for name, shape in param_shapes(cfg).items()}


def shard_params(params: dict, mesh: Mesh) -> dict[str, jax.Array]:
    """``params`` (a flat dict of :func:`plumrec.jax.model.param_shapes` names) placed on ``mesh`` with
    the shardings of :func:`param_shardings` (chosen by name and shape, so any config's params work)."""
    _check_mesh(mesh)
    return {name: jax.device_put(a, _sharding(name, tuple(a.shape), mesh)) for name, a in params.items()}


def _as_batch(b) -> Batch:
    if isinstance(b, PackedBatch):
        return batch_from_packed(b)
    if not isinstance(b, Batch):
        raise TypeError(f"batches must hold plumrec.jax.Batch or PackedBatch, got {type(b).__name__}")
    return b


def _pad_shard(b: Batch, T: int, B: int, M: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """One shard padded to ``T`` tokens, ``B`` sequences (``cu [B+1]``) and ``M`` loss targets."""
    ids, cu = np.asarray(b.input_ids, np.int32), np.asarray(b.cu_seqlens, np.int32)
    idx, tgt, w = np.asarray(b.loss_index, np.int32), np.asarray(b.targets, np.int32), np.asarray(b.weights)
    n = ids.shape[0]
    ids = np.concatenate([ids, np.full(T - n, pad_id, np.int32)])
    if T > n:
        cu = np.concatenate([cu, [T]]).astype(np.int32)     # the pad tokens: one sequence at the end
    cu = np.concatenate([cu, np.full(B + 1 - cu.shape[0], T, np.int32)])
    k = M - idx.shape[0]
    mask = np.ones(n, bool) if b.token_mask is None else np.asarray(b.token_mask, bool)
    real = np.concatenate([mask, np.zeros(T - n, bool)])
    return (ids, cu, np.concatenate([idx, np.full(k, idx[0], np.int32)]),
            np.concatenate([tgt, np.full(k, tgt[0], np.int32)]), np.concatenate([w, np.zeros(k, w.dtype)]), real)


def stack_batches(batches: Sequence, *, pad_id: int = 0) -> Batch:
    """Packed batches, one per data shard, as one :class:`~plumrec.jax.train.Batch` with a leading
    shard axis (host arrays; place them with :func:`shard_batch`).

    Args:
        batches: ``D >= 1`` :class:`~plumrec.jax.train.Batch` or :class:`~plumrec.sequences.PackedBatch`,
            each with ``cu_seqlens`` starting at 0 and ending at its token count, and at least one loss
            target.
        pad_id: the token id of the pad tokens (in ``[0, vocab_size)``).

    Returns:
        A ``Batch`` with ``input_ids`` int32 ``[D, T]`` (``T`` the most tokens of a shard), ``cu_seqlens``
        int32 ``[D, B+1]`` (each row from 0 to ``T``; a shorter shard's pad tokens form one extra sequence,
        unused rows repeat ``T``: empty sequences), ``loss_index`` / ``targets`` int32 and ``weights``
        ``[D, M]`` in the batches' dtype (float32 from ``batch_from_packed``; ``M`` the most targets of a
        shard; pad entries repeat the shard's first target with weight 0), and ``max_seqlen`` the longest
        sequence of any shard, pad sequences included.
    """
    batches = [_as_batch(b) for b in batches]
    if not batches:
        raise ValueError("batches must hold at least one batch (one per data shard)")
    sizes = [(b.input_ids.shape[0], b.cu_seqlens.shape[0] - 1, b.loss_index.shape[0]) for b in batches]
    if min(m for _, _, m in sizes) < 1:
        raise ValueError(f"every batch needs at least one loss target, got target counts {[m for *_, m in sizes]}")
    for i, b in enumerate(batches):
        cu = np.asarray(b.cu_seqlens)
        if cu[0] != 0 or cu[-1] != b.input_ids.shape[0]:
            raise ValueError(f"batches[{i}].cu_seqlens must run from 0 to its {b.input_ids.shape[0]} tokens, "
                             f"got {cu[0]}..{cu[-1]}")
    T = max(t for t, _, _ in sizes)
    B = max(nb + (t < T) for t, nb, _ in sizes)
    M = max(m for _, _, m in sizes)
    cols = list(zip(*[_pad_shard(b, T, B, M, int(pad_id)) for b in batches]))
    max_seqlen = max([b.max_seqlen for b in batches] + [T - t for t, _, _ in sizes])
    ids, cu, idx, tgt, w, real = (np.stack(c) for c in cols)
    return Batch(jnp.asarray(ids), jnp.asarray(cu), jnp.asarray(idx), jnp.asarray(tgt), jnp.asarray(w),
                 int(max_seqlen), jnp.asarray(real))


def shard_batch(batch: Batch, mesh: Mesh) -> Batch:
    """A stacked batch (:func:`stack_batches`, leading axis ``D`` = the mesh's ``"data"`` size) placed
    with its leading axis split over ``"data"`` and replicated over ``"expert"``."""
    _check_mesh(mesh)
    D = mesh.shape[DATA]
    if batch.input_ids.ndim != 2 or batch.input_ids.shape[0] != D:
        raise ValueError(f"batch must be stacked [D={D}, ...] (stack_batches), got input_ids {batch.input_ids.shape}")
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P(DATA, None))), batch)


def concat_batch(batch: Batch) -> Batch:
    """The stacked batch as one packed batch (jit-able): the shards' tokens back to back (``[D*T]``),
    their ``cu_seqlens`` and ``loss_index`` offset by ``d*T`` (``cu_seqlens [D*B+1]``), targets and
    weights concatenated (``[D*M]``). Every row of ``batch.cu_seqlens`` must end at ``T`` (as
    :func:`stack_batches` makes them)."""
    if batch.input_ids.ndim != 2:
        raise ValueError(f"batch must be stacked [D, T] (stack_batches), got input_ids {batch.input_ids.shape}")
    D, T = batch.input_ids.shape
    off = (jnp.arange(D, dtype=jnp.int32) * T)[:, None]
    cu = jnp.concatenate([(batch.cu_seqlens[:, :-1] + off).reshape(-1), jnp.full((1,), D * T, jnp.int32)])
    return Batch(batch.input_ids.reshape(-1), cu, (batch.loss_index + off).reshape(-1), batch.targets.reshape(-1),
                 batch.weights.reshape(-1), batch.max_seqlen,
                 None if batch.token_mask is None else batch.token_mask.reshape(-1))


def _constrain(tree, mesh: Mesh, names: set[str]):
    """Every leaf under a dict key that names a parameter gets that parameter's sharding; others replicate."""
    def place(path, leaf):
        key = getattr(path[-1], "key", None) if path else None
        name = key if isinstance(key, str) and key in names else ""
        return jax.lax.with_sharding_constraint(leaf, _sharding(name, tuple(leaf.shape), mesh))

    return jax.tree_util.tree_map_with_path(place, tree)


def make_sharded_train_step(loss_fn: Callable, tcfg: TrainConfig,
                            mesh: Mesh) -> tuple[optax.GradientTransformation, Callable]:
    """``(optimizer, train_step)`` on ``mesh``, the sharded twin of :func:`plumrec.jax.train.make_train_step`.

    ``train_step(params, opt_state, batch, dropout_key=None) -> (params, opt_state, loss, parts)``:
    ``params`` as :func:`shard_params` places them, ``opt_state = optimizer.init(params)``, ``batch`` a
    stacked batch (:func:`stack_batches`, :func:`shard_batch`); ``loss_fn`` (:func:`plumrec.jax.train.make_loss`)
    runs on :func:`concat_batch` ``(batch)``, so ``loss``, ``parts`` (``ce``, ``aux``, ``grad_norm``) and
    the update equal the unsharded step's on the concatenated batch with the same ``dropout_key`` (up to
    the rounding of sums that the partitioned program orders differently). The returned
    parameters and optimizer moments carry the shardings of :func:`param_shardings` (``optimizer.init``
    places the moments so too, and the step count replicated), so step after step reuses one compilation.
    """
    _check_mesh(mesh)
    base = make_optimizer(tcfg)
    init = jax.jit(lambda params: _constrain(base.init(params), mesh, set(params)))
    opt = optax.GradientTransformation(init, base.update)

    @jax.jit
    def train_step(params, opt_state, batch: Batch, dropout_key=None):
        names = set(params)
        flat = concat_batch(batch)
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, flat, dropout_key)
        grads = _constrain(grads, mesh, names)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = _constrain(optax.apply_updates(params, updates), mesh, names)
        return params, _constrain(opt_state, mesh, names), loss, {**parts, "grad_norm": global_norm(grads)}

    return opt, train_step
