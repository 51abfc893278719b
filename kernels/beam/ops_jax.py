"""JAX trie-constrained beam search: validation and dispatch.

Public functions (re-exported by ``plum_kernels.jax``):

- ``constrained_beam_step(logits, beam_scores, nodes, trie, level, W, *,
  normalize="codebook", vocab_offset=None, max_children=None, impl=None,
  interpret=None, validate=True)`` (docs/design.md, 'constrained_beam_step';
  semantics in ``kernels/beam/reference.py``)
- ``constrained_beam_search(step_fn, trie, *, batch_size, beam_width,
  normalize="codebook", impl=None, interpret=None)`` (docs/design.md,
  'constrained_beam_search')

No ``custom_vjp``: beam search is not differentiated. ``trie`` is any object
with the fields of ``TrieArrays`` (``SIDTrie.to_jax()`` returns one);
``TrieArrays`` (``kernels/beam/trie_arrays.py``) is a JAX pytree (the seven
arrays are its leaves, the integers its static aux data), so
``SIDTrie.to_jax()`` / ``TrieArrays.from_trie(trie)`` can be an argument of a
``jax.jit`` / ``shard_map`` function: tries with equal shapes, dtypes and
integers then share one trace. Integer outputs are int32 (JAX
without ``jax_enable_x64``). Inside ``jax.jit`` the trie's values are traced:
``max_children`` should then be given (``children_bounds(trie)[level]``,
computed outside), else the codebook size is the (always safe, slower)
child-count bound, and the node values are not checked.
"""
from __future__ import annotations

import functools
import weakref
from types import SimpleNamespace
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import describe
from .._dispatch import resolve_interpret, resolve_jax_impl
from . import reference_jax as ref
from .checks import (
    DEFAULT_EPS,
    ITEM_ARRAYS,
    check_aggregate_args,
    check_aggregate_values,
    check_bias_row_values,
    check_edge_bias,
    check_node_values,
    check_search_args,
    check_step_args,
    item_arrays,
)
from .trie_arrays import TRIE_ARRAYS, TRIE_META, narrow_int64, register_jax_pytree
from .trie_arrays import TrieArrays as TrieArrays  # re-exported by plum_kernels.jax

_BOUNDS_CACHE: dict[int, tuple] = {}
register_jax_pytree()


class BeamStep(NamedTuple):
    scores: jax.Array   # [B, W] float32, best first, -inf in empty slots
    nodes: jax.Array    # [B, W] int32 trie states, -1 in empty slots
    parent: jax.Array   # [B, W] int32, 0 in empty slots
    token: jax.Array    # [B, W] int32, -1 in empty slots


def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def children_bounds(trie) -> tuple[int, ...]:
    """``reference_jax.children_bounds``, cached per trie object (the host
    read of ``child_ptr`` happens once, not at every step)."""
    hit = _BOUNDS_CACHE.get(id(trie))
    if hit is not None and hit[0]() is trie:
        return hit[1]
    bounds = ref.children_bounds(trie)
    try:
        _BOUNDS_CACHE[id(trie)] = (weakref.ref(trie, lambda _, k=id(trie): _BOUNDS_CACHE.pop(k, None)), bounds)
    except TypeError:  # not weak-referenceable: no caching
        pass
    return bounds


def _check_trie(trie) -> None:
    for name in TRIE_ARRAYS + TRIE_META[:3]:
        if not hasattr(trie, name):
            raise TypeError(f"trie must be the TrieArrays of SIDTrie.to_jax(); it has no {name!r}")
    if type(trie.child_ptr).__module__.startswith("torch"):
        raise TypeError("trie arrays must be jax arrays: use SIDTrie.to_jax(), not to_torch()")


def _check_step(logits, beam_scores, nodes, trie, level, W, normalize, vocab_offset, max_children,
                edge_bias=None, bias_row=None) -> int:
    _check_trie(trie)
    nodes_dt = jnp.dtype(getattr(nodes, "dtype", None) or np.float64)
    if nodes_dt.kind != "i":
        raise TypeError(f"nodes must be int32/int64 trie states, got {nodes_dt}")
    dtype_of = lambda x: jnp.dtype(getattr(x, "dtype", None) or np.float64)  # noqa: E731
    off = check_step_args(level=level, W=W, normalize=normalize, codebook_sizes=trie.codebook_sizes,
                          nodes_shape=tuple(jnp.shape(nodes)), scores_shape=tuple(jnp.shape(beam_scores)),
                          scores_dtype=dtype_of(beam_scores), logits_shape=tuple(jnp.shape(logits)),
                          logits_dtype=dtype_of(logits), vocab_offset=vocab_offset)
    V = int(trie.codebook_sizes[level])
    if max_children is not None and (isinstance(max_children, bool) or not isinstance(max_children, int)
                                     or not 1 <= max_children <= V):
        raise ValueError(f"max_children must be an int in [1, V_{level} = {V}], got {max_children!r}")
    _check_bias(edge_bias, bias_row, trie, int(jnp.shape(nodes)[0]))
    return off


def _check_bias(edge_bias, bias_row, trie, batch_size: int) -> None:
    check_edge_bias(None if edge_bias is None else describe("edge_bias", edge_bias), int(trie.num_edges), None,
                    None if bias_row is None else describe("bias_row", bias_row), batch_size)


def _check_bias_row_values(edge_bias, bias_row) -> None:
    if bias_row is not None and _concrete(bias_row):
        check_bias_row_values(np.asarray(bias_row), int(edge_bias.shape[0]))


def constrained_beam_step(logits, beam_scores, nodes, trie, level: int, W: int, *, normalize: str = "codebook",
                          vocab_offset: Optional[int] = None, max_children: Optional[int] = None,
                          edge_bias=None, bias_row=None, impl: Optional[str] = None,
                          interpret: Optional[bool] = None, validate: bool = True) -> BeamStep:
    """One step of beam search restricted to the SID trie (docs/design.md,
    'constrained_beam_step'); the arguments and results of
    ``plum_kernels.torch.constrained_beam_step``, plus:

    ``edge_bias``: optional float32 ``[E]``, added to each candidate's score
    after the normalisation (the Pallas kernel takes it gathered per candidate),
    or ``[T, E]`` with ``bias_row`` int32/int64 ``[B]``: user ``b`` reads row
    ``bias_row[b]`` (``0 <= row < T``, checked with the nodes).
    ``max_children``: static bound on any state's child count at ``level``
    (``children_bounds(trie)[level]``); ``None`` computes it from the trie
    when its arrays are concrete, else uses the codebook size.
    ``impl``: ``None`` (Pallas on TPU, jnp reference elsewhere),
    ``"reference"`` or ``"pallas"``. ``interpret``: ``None`` = TPU interpret
    mode exactly when the default backend is not a TPU.
    ``validate``: check the values of ``nodes`` when they are concrete; under
    ``jax.jit`` (or with False) bad states give undefined results, never an
    out-of-range access (XLA clamps every gather).
    """
    impl = resolve_jax_impl(impl)
    off = _check_step(logits, beam_scores, nodes, trie, level, W, normalize, vocab_offset, max_children, edge_bias,
                      bias_row)
    if validate and _concrete(nodes, trie.level_ptr, trie.edge_level_ptr):
        check_node_values(np.asarray(nodes), np.asarray(trie.level_ptr), np.asarray(trie.edge_level_ptr),
                          trie.num_internal, trie.num_edges, level)
    if validate:
        _check_bias_row_values(edge_bias, bias_row)
    if max_children is None:
        max_children = (children_bounds(trie)[level] if _concrete(trie.child_ptr)
                        else int(trie.codebook_sizes[level]))
    out = _step_jit(logits, beam_scores, nodes.astype(jnp.int32), trie.child_ptr, trie.child_token, trie.edge_word,
                    trie.shift, trie.mask, codebook_sizes=tuple(int(v) for v in trie.codebook_sizes),
                    num_internal=int(trie.num_internal), num_edges=int(trie.num_edges), level=level, W=W,
                    normalize=normalize, off=off, C=int(max_children), impl=impl,
                    interpret=resolve_interpret(interpret) if impl == "pallas" else True, edge_bias=edge_bias,
                    bias_row=bias_row)
    return BeamStep(*out)


@functools.partial(jax.jit, static_argnames=("codebook_sizes", "num_internal", "num_edges", "level", "W",
                                             "normalize", "off", "C", "impl", "interpret"))
def _step_jit(logits, beam_scores, nodes, child_ptr, child_token, edge_word, shift, mask, *, codebook_sizes,
              num_internal, num_edges, level, W, normalize, off, C, impl, interpret, edge_bias=None, bias_row=None):
    trie = SimpleNamespace(child_ptr=child_ptr, child_token=child_token, edge_word=edge_word, shift=shift,
                           mask=mask, codebook_sizes=codebook_sizes, num_internal=num_internal,
                           num_edges=num_edges)
    if impl == "reference":
        return ref.constrained_beam_step(logits, beam_scores, nodes, trie, level, W, normalize=normalize,
                                         vocab_offset=off, max_children=C, edge_bias=edge_bias, bias_row=bias_row)
    from . import pallas as pallas_beam

    x, token, nxt, _, cl = ref.candidate_logits(logits, beam_scores, nodes, trie, level, C, off)
    cb = None if edge_bias is None else ref.candidate_bias(nodes, beam_scores, trie, edge_bias, C, bias_row)
    top, flat = pallas_beam.beam_select(x, cl, beam_scores, cb, W=W, normalize=normalize, interpret=interpret)
    return ref.decode(flat, top, token, nxt, C)


def constrained_beam_search(step_fn: Callable, trie, *, batch_size: int, beam_width: int,
                            normalize: str = "codebook", edge_bias=None, bias_row=None,
                            impl: Optional[str] = None, interpret: Optional[bool] = None):
    """Beam search over the SIDs of ``trie`` (docs/design.md, 'constrained_beam_search'); see
    ``plum_kernels.torch.constrained_beam_search``. ``step_fn(level, tokens [B, W,
    level] int32, parent [B, W] int32) -> logits [B, W, V_level]``. Returns
    ``(codes [B, W, L] int32, scores [B, W] float32)``; ``edge_bias`` (optional
    float32 ``[E]``, or ``[T, E]`` with ``bias_row`` int ``[B]``, its rows
    checked once when concrete) is passed to every step."""
    _check_trie(trie)
    check_search_args(batch_size, beam_width)
    _check_bias(edge_bias, bias_row, trie, batch_size)
    _check_bias_row_values(edge_bias, bias_row)
    B, W = batch_size, beam_width
    L = len(trie.codebook_sizes)
    bounds = children_bounds(trie) if _concrete(trie.child_ptr) else tuple(int(v) for v in trie.codebook_sizes)
    lane = jnp.arange(W)
    scores = jnp.broadcast_to(jnp.where(lane == 0, 0.0, -jnp.inf).astype(jnp.float32), (B, W))
    nodes = jnp.broadcast_to(jnp.where(lane == 0, 0, -1).astype(jnp.int32), (B, W))
    tokens = jnp.zeros((B, W, 0), jnp.int32)
    parent = jnp.broadcast_to(lane.astype(jnp.int32), (B, W))
    for level in range(L):
        logits = step_fn(level, tokens, parent)
        scores, nodes, parent, token = constrained_beam_step(
            logits, scores, nodes, trie, level, W, normalize=normalize, max_children=bounds[level],
            edge_bias=edge_bias, bias_row=bias_row, impl=impl, interpret=interpret, validate=False)
        prefix = jnp.take_along_axis(tokens, parent[..., None], axis=1) if level else tokens
        tokens = jnp.concatenate([prefix, token[..., None].astype(jnp.int32)], axis=2)
    codes = jnp.where((scores != -jnp.inf)[..., None], tokens, -1)
    return codes, scores


# ============================================================================= trie_aggregate


class TrieAggregate(NamedTuple):
    node_mass: jax.Array   # [I] float32 mass below each internal node
    edge_mass: jax.Array   # [E] float32 mass below each edge
    edge_bias: jax.Array   # [E] float32 smoothed log-ratio of each edge


def trie_aggregate(item_mass, trie, items, *, eps: float = DEFAULT_EPS, impl: Optional[str] = None,
                   interpret: Optional[bool] = None) -> TrieAggregate:
    """Bottom-up sums of per-item masses over the SID trie and the per-edge
    log-ratio bias (docs/design.md, 'trie_aggregate'); the arguments and
    results of ``plum_kernels.torch.trie_aggregate`` (float32 only), plus
    ``interpret``. ``items``: an object with ``edge_item``, ``dup_ptr``,
    ``dup_items`` (numpy or jax arrays; a ``SIDTrie``). Concrete values are
    checked (masses >= 0 or NaN, ids < N); under ``jax.jit`` an id outside
    ``[0, N)`` reads a clamped address and a negative mass gives a NaN bias.
    The segmented sums run in XLA (``L`` rounds over every edge, no host
    read), the ``"pallas"`` log-ratio in a Pallas kernel."""
    _check_trie(trie)
    impl = resolve_jax_impl(impl)
    edge_item, dup_ptr, dup_items = (narrow_int64(a, f"items.{n}") for a, n in zip(item_arrays(items), ITEM_ARRAYS))
    eps = check_aggregate_args(mass=describe("item_mass", item_mass), edge_item=describe("edge_item", edge_item),
                               dup_ptr=describe("dup_ptr", dup_ptr), dup_items=describe("dup_items", dup_items),
                               num_edges=int(trie.num_edges), eps=eps, impl="jax", trie_device=None)
    if _concrete(item_mass, edge_item, dup_ptr, dup_items):
        check_aggregate_values(*(np.asarray(a) for a in (item_mass, edge_item, dup_ptr, dup_items)))
    out = _aggregate_jit(jnp.asarray(item_mass), trie.child_ptr, trie.edge_word, jnp.asarray(edge_item),
                         jnp.asarray(dup_ptr), jnp.asarray(dup_items), num_levels=len(trie.codebook_sizes),
                         eps=eps, impl=impl, interpret=resolve_interpret(interpret) if impl == "pallas" else True)
    return TrieAggregate(*out)


@functools.partial(jax.jit, static_argnames=("num_levels", "eps", "impl", "interpret"))
def _aggregate_jit(item_mass, child_ptr, edge_word, edge_item, dup_ptr, dup_items, *, num_levels, eps, impl,
                   interpret):
    trie = SimpleNamespace(child_ptr=child_ptr, edge_word=edge_word, num_internal=child_ptr.shape[0] - 1,
                           num_edges=edge_word.shape[0], codebook_sizes=(0,) * num_levels)
    if impl == "reference":
        return ref.trie_aggregate(item_mass, trie, edge_item, dup_ptr, dup_items, eps)
    from . import pallas as pallas_beam

    node_mass, node_count, edge_mass, edge_count, parent = ref.aggregate_masses(item_mass, trie, edge_item, dup_ptr,
                                                                                dup_items)
    bias = pallas_beam.log_ratio(edge_mass, edge_count, node_mass[parent], node_count[parent], eps=eps,
                                 interpret=interpret)
    return node_mass, edge_mass, bias
