"""PyTorch trie-constrained beam search: validation, dispatch, ``torch.library``.

Public functions (re-exported by ``plum_kernels.torch``):

- ``constrained_beam_step(logits, beam_scores, nodes, trie, level, W, *,
  normalize="codebook", vocab_offset=None, impl=None, validate=True)``
  (docs/design.md, 'constrained_beam_step'; exact semantics in
  ``kernels/beam/reference.py``)
- ``constrained_beam_search(step_fn, trie, *, batch_size, beam_width,
  normalize="codebook", impl=None)`` (docs/design.md, 'constrained_beam_search')

The step is the custom op ``plum_kernels::constrained_beam_step`` (no
autograd: beam search is not differentiated), carrying ``impl`` as a string so
both implementations go through one registration with a fake kernel for
``torch.compile``. ``trie`` is the ``TrieArrays`` object of
``SIDTrie.to_torch(device)``, read by attribute (``plum_kernels`` does not
import ``plumrec``).
The step is a ``triton_visible_op``: with ``impl="triton"`` ``torch.compile``
traces into its two Triton launches. ``plum_kernels::trie_aggregate`` stays an
opaque custom op: its Triton launcher reads ``level_ptr`` on the host (one
launch per trie depth).

Host synchronisation: ``validate=True`` reads back one flag to check the
*values* of ``nodes`` (range and depth); the search skips it, its states
coming from the previous step. Under ``torch.compile``
(``torch.compiler.is_compiling()``) the value checks are skipped (a host read
would break the graph); the shape, dtype and device checks still run. The Triton path is otherwise sync-free (the
chain-word layout is computed on the host from ``codebook_sizes``).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from .._autotune import triton_visible_op
from .._checks import describe
from .._dispatch import resolve_torch_impl
from . import reference as ref
from .checks import (
    DEFAULT_EPS,
    check_aggregate_args,
    check_aggregate_values,
    check_bias_row_values,
    check_edge_bias,
    check_node_values,
    check_search_args,
    check_step_args,
    item_arrays,
)

MAX_TRITON_CODEBOOK = 1 << 23


class _TrieView(NamedTuple):
    """What both implementations read: device arrays plus host constants."""
    child_ptr: Tensor
    child_token: Tensor
    edge_word: Tensor
    shift: tuple
    mask: tuple
    codebook_sizes: tuple
    num_internal: int
    num_edges: int


def chain_layout(codebook_sizes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(shift, mask)`` of the packed chain words, level 0 highest (the
    layout of ``plum/sid/trie.py``), on the host."""
    bits = [int(v - 1).bit_length() for v in codebook_sizes]
    shift = [sum(bits[l + 1:]) for l in range(len(bits))]
    return tuple(shift), tuple((1 << b) - 1 for b in bits)


class BeamStep(NamedTuple):
    scores: Tensor   # [B, W] float32, best first, -inf in empty slots
    nodes: Tensor    # [B, W] int64 trie states, -1 in empty slots
    parent: Tensor   # [B, W] int64 input beam each slot extends, 0 in empty slots
    token: Tensor    # [B, W] int64 code chosen at this level, -1 in empty slots


def _triton():
    # Imported lazily: importing plum_kernels.torch must not import triton.
    from . import triton as triton_beam
    return triton_beam


@triton_visible_op("plum_kernels::constrained_beam_step")
def _step_op(logits: Tensor, beam_scores: Tensor, nodes: Tensor, child_ptr: Tensor, child_token: Tensor,
             edge_word: Tensor, codebook_sizes: list[int], num_internal: int, level: int, W: int,
             normalize: str, vocab_offset: int, impl: str, edge_bias: Optional[Tensor] = None,
             bias_row: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    shift, mask = chain_layout(codebook_sizes)
    trie = _TrieView(child_ptr, child_token, edge_word, shift, mask, tuple(codebook_sizes), num_internal,
                     int(edge_word.shape[0]))
    if impl == "triton":
        return _triton().beam_step(logits, beam_scores, nodes, trie, level, W, normalize, vocab_offset,
                                   edge_bias=edge_bias, bias_row=bias_row)
    return ref.constrained_beam_step(logits, beam_scores, nodes, trie, level, W, normalize=normalize,
                                     vocab_offset=vocab_offset, edge_bias=edge_bias, bias_row=bias_row)


@_step_op.register_fake
def _(logits, beam_scores, nodes, child_ptr, child_token, edge_word, codebook_sizes, num_internal, level, W,
      normalize, vocab_offset, impl, edge_bias=None, bias_row=None):
    B = nodes.shape[0]
    return (logits.new_empty(B, W, dtype=torch.float32), nodes.new_empty(B, W, dtype=torch.int64),
            nodes.new_empty(B, W, dtype=torch.int64), nodes.new_empty(B, W, dtype=torch.int64))


# ============================================================================= validation


def _check_trie(trie) -> None:
    for name in ("child_ptr", "child_token", "edge_word", "level_ptr", "edge_level_ptr", "codebook_sizes",
                 "num_internal", "num_edges"):
        if not hasattr(trie, name):
            raise TypeError(f"trie must be the TrieArrays of SIDTrie.to_torch(device); it has no {name!r}")
    if not isinstance(trie.child_ptr, Tensor):
        raise TypeError("trie arrays must be torch tensors: use SIDTrie.to_torch(device), not to_jax()")


def _check_step(logits, beam_scores, nodes, trie, level, W, normalize, vocab_offset, impl, edge_bias=None,
                bias_row=None) -> int:
    """Shape/dtype/device checks; returns the vocabulary offset."""
    _check_trie(trie)
    for name, t in (("logits", logits), ("beam_scores", beam_scores), ("nodes", nodes)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if nodes.dtype != torch.int64:
        raise TypeError(f"nodes must be int64 trie states, got {nodes.dtype}")
    off = check_step_args(level=level, W=W, normalize=normalize, codebook_sizes=trie.codebook_sizes,
                          nodes_shape=tuple(nodes.shape), scores_shape=tuple(beam_scores.shape),
                          scores_dtype=beam_scores.dtype, logits_shape=tuple(logits.shape),
                          logits_dtype=logits.dtype, vocab_offset=vocab_offset)
    V = int(trie.codebook_sizes[level])
    dev = trie.child_ptr.device
    for name, t in (("logits", logits), ("beam_scores", beam_scores), ("nodes", nodes)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but the trie arrays are on {dev}")
    if impl == "triton" and V > MAX_TRITON_CODEBOOK:
        raise ValueError(f"the Triton kernel supports codebooks up to 2**23 codes, level {level} has {V}")
    _check_bias(edge_bias, bias_row, trie, int(nodes.shape[0]))
    return off


def _check_bias(edge_bias, bias_row, trie, batch_size: int) -> None:
    check_edge_bias(None if edge_bias is None else describe("edge_bias", edge_bias), int(trie.num_edges),
                    str(trie.child_ptr.device), None if bias_row is None else describe("bias_row", bias_row),
                    batch_size)


def _check_bias_row_values(edge_bias, bias_row) -> None:
    """``checks.check_bias_row_values`` on one host copy of ``bias_row``."""
    if bias_row is not None:
        check_bias_row_values(bias_row.cpu().numpy(), int(edge_bias.shape[0]))


def _check_node_values(nodes: Tensor, trie, level: int) -> None:
    """``checks.check_node_values`` on one host copy of ``nodes`` and the
    level tables (one sync)."""
    L1 = trie.level_ptr.shape[0]
    host = torch.cat([nodes.reshape(-1), trie.level_ptr.to(nodes.device, torch.int64),
                      trie.edge_level_ptr.to(nodes.device, torch.int64)]).cpu().numpy()
    n = nodes.numel()
    check_node_values(host[:n].reshape(nodes.shape), host[n:n + L1], host[n + L1:], trie.num_internal,
                      trie.num_edges, level)


# ============================================================================= public ops


def constrained_beam_step(logits: Tensor, beam_scores: Tensor, nodes: Tensor, trie, level: int, W: int, *,
                          normalize: str = "codebook", vocab_offset: Optional[int] = None,
                          edge_bias: Optional[Tensor] = None, bias_row: Optional[Tensor] = None,
                          impl: Optional[str] = None, validate: bool = True) -> BeamStep:
    """One step of beam search restricted to the SID trie (docs/design.md,
    'constrained_beam_step').

    Args:
        logits: ``[B, W_in, V_level]`` float16/bfloat16/float32, or ``[B, W_in,
            V_total]`` holding the level's codes at ``vocab_offset``.
        beam_scores: ``[B, W_in]`` float32 cumulative log-probabilities; start
            with ``[0, -inf, ...]`` so that the root is expanded once.
        nodes: ``[B, W_in]`` int64 trie states (``0`` = root, ``-1`` = none).
        trie: ``TrieArrays`` from ``SIDTrie.to_torch(device)``.
        level: the level whose code is chosen, ``0 <= level < L``.
        W: beams kept, ``1 <= W <= 512``.
        normalize: ``"codebook"`` (log-softmax over the level's codebook) or
            ``"children"`` (renormalized over the beam's valid children).
        edge_bias: optional float32 ``[E]`` on the trie's device, one value
            per edge of the trie's edge arrays (``trie_aggregate``'s
            ``edge_bias``): the candidate through edge ``e`` scores
            ``(beam_score + (x - lse)) + edge_bias[e]``, after the
            normalisation; a candidate inside a chain adds 0. Or float32
            ``[T, E]``, a table of such rows, with ``bias_row``.
        bias_row: int32/int64 ``[B]`` on the trie's device, each user's row
            of a ``[T, E]`` ``edge_bias`` (``0 <= row < T``); None with an
            ``[E]`` bias or none.
        impl: ``None`` (Triton on CUDA, reference elsewhere), ``"reference"``
            or ``"triton"``.
        validate: check the values of ``nodes`` and ``bias_row`` (one host
            sync each; skipped under ``torch.compile``). Without it,
            states that are not valid at ``level`` give undefined results;
            both implementations clamp every index they read from ``nodes``
            and the trie into its array, so nothing is read out of bounds.

    Returns ``BeamStep(scores, nodes, parent, token)``, each ``[B, W]``: the best
    ``W`` (beam, child) pairs of each user ranked by score, then parent, then
    token; empty slots hold ``-inf`` / ``-1`` / ``0`` / ``-1``. A NaN candidate
    score is kept and ranked after every number, with its real node, parent
    and token (``reference.py``, semantics 5); a beam with a NaN score is live.
    """
    impl = resolve_torch_impl(impl, logits.device if isinstance(logits, Tensor) else "cpu")
    off = _check_step(logits, beam_scores, nodes, trie, level, W, normalize, vocab_offset, impl, edge_bias,
                      bias_row)
    if validate and not torch.compiler.is_compiling():
        _check_node_values(nodes, trie, level)
        _check_bias_row_values(edge_bias, bias_row)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = _step_op(logits, beam_scores, nodes, trie.child_ptr, trie.child_token, trie.edge_word,
                   [int(v) for v in trie.codebook_sizes], int(trie.num_internal), level, W, normalize, off, impl,
                   None if edge_bias is None else edge_bias.contiguous(),
                   None if bias_row is None else bias_row.contiguous())
    return BeamStep(*out)


def constrained_beam_search(step_fn: Callable[[int, Tensor, Tensor], Tensor], trie, *, batch_size: int,
                            beam_width: int, normalize: str = "codebook", edge_bias: Optional[Tensor] = None,
                            bias_row: Optional[Tensor] = None, impl: Optional[str] = None
                            ) -> tuple[Tensor, Tensor]:
    """Beam search over the SIDs of ``trie`` (docs/design.md, 'constrained_beam_search').

    ``step_fn(level, tokens, parent) -> logits [B, W, V_level]`` is called for
    ``level = 0 .. L-1``; ``tokens [B, W, level]`` int64 holds each beam's
    prefix, already reordered by ``parent [B, W]`` int64 (the beam of the
    previous call each row came from; ``arange(W)`` at level 0, where only
    beam 0 is live). Rows of dead beams (score ``-inf``) are ignored.
    ``edge_bias`` (optional float32 ``[E]``) is passed to every step: a SID's
    score is its log-probability plus the bias summed along its path; a
    ``[T, E]`` table with ``bias_row`` (int32/int64 ``[B]``, checked on the
    host once) gives user ``b`` the row ``bias_row[b]``.

    Returns ``(codes [B, W, L] int64, scores [B, W] float32)``, best first: every
    slot whose score is not ``-inf`` holds a SID of the trie, the others score
    ``-inf`` and codes ``-1`` (a user has fewer than ``W`` such slots only when
    the trie has fewer than ``W`` SIDs reachable with scores above ``-inf``).
    Non-finite logits are not hidden: a user whose scores met a NaN (a NaN
    logit in a row it expanded, an ``inf`` logit) keeps its SIDs with score
    NaN, ranked after its numeric slots (``reference.py``, semantics 5), so
    ``isnan(scores)`` finds every such user.
    """
    _check_trie(trie)
    check_search_args(batch_size, beam_width)
    _check_bias(edge_bias, bias_row, trie, batch_size)
    _check_bias_row_values(edge_bias, bias_row)
    B, W = batch_size, beam_width
    dev = trie.child_ptr.device
    scores = torch.full((B, W), float("-inf"), device=dev)
    scores[:, 0] = 0.0
    nodes = torch.full((B, W), -1, dtype=torch.int64, device=dev)
    nodes[:, 0] = 0
    tokens = torch.empty(B, W, 0, dtype=torch.int64, device=dev)
    parent = torch.arange(W, device=dev).expand(B, W)
    for level in range(len(trie.codebook_sizes)):
        logits = step_fn(level, tokens, parent)
        if not isinstance(logits, Tensor):
            raise TypeError(f"step_fn must return a tensor, got {type(logits).__name__} at level {level}")
        scores, nodes, parent, token = constrained_beam_step(logits, scores, nodes, trie, level, W,
                                                             normalize=normalize, edge_bias=edge_bias,
                                                             bias_row=bias_row, impl=impl,
                                                             validate=False)
        prefix = torch.gather(tokens, 1, parent[..., None].expand(B, W, level))
        tokens = torch.cat([prefix, token[..., None]], dim=2)
    codes = torch.where((scores != float("-inf"))[..., None], tokens, torch.full_like(tokens, -1))
    return codes, scores


# ============================================================================= trie_aggregate


class TrieAggregate(NamedTuple):
    node_mass: Tensor   # [I] float32 mass below each internal node (node_mass[0]: the total)
    edge_mass: Tensor   # [E] float32 mass below each edge (a chain edge: its SID's mass)
    edge_bias: Tensor   # [E] float32 smoothed log d(child) - log d(parent) of each edge


@torch.library.custom_op("plum_kernels::trie_aggregate", mutates_args=())
def _aggregate_op(item_mass: Tensor, child_ptr: Tensor, edge_word: Tensor, level_ptr: Tensor, edge_item: Tensor,
                  dup_ptr: Tensor, dup_items: Tensor, eps: float, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    trie = SimpleNamespace(child_ptr=child_ptr, edge_word=edge_word, level_ptr=level_ptr,
                           num_internal=child_ptr.shape[0] - 1, num_edges=edge_word.shape[0])
    if impl == "triton":
        return _triton().trie_aggregate(item_mass, trie, edge_item, dup_ptr, dup_items, eps)
    return ref.trie_aggregate(item_mass, trie, edge_item, dup_ptr, dup_items, eps)


@_aggregate_op.register_fake
def _(item_mass, child_ptr, edge_word, level_ptr, edge_item, dup_ptr, dup_items, eps, impl):
    acc = torch.float64 if item_mass.dtype == torch.float64 else torch.float32
    I, E = child_ptr.shape[0] - 1, edge_word.shape[0]
    return item_mass.new_empty(I, dtype=acc), item_mass.new_empty(E, dtype=acc), item_mass.new_empty(E, dtype=acc)


def _item_arrays(items, dev) -> tuple[Tensor, Tensor, Tensor]:
    """The item arrays as tensors (host arrays are copied to ``dev``)."""
    return tuple(a if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a), device=dev) for a in item_arrays(items))


def trie_aggregate(item_mass: Tensor, trie, items, *, eps: float = DEFAULT_EPS, impl: Optional[str] = None,
                   validate: bool = True) -> TrieAggregate:
    """Bottom-up sums of per-item masses over the SID trie and the per-edge
    log-ratio bias (docs/design.md, 'trie_aggregate'; reference:
    ``reference.trie_aggregate``).

    Args:
        item_mass: ``[N]`` float32 (float64 with ``impl="reference"``): the
            mass of item id ``i`` (the ids ``SIDTrie`` stores: rows of
            ``codes`` or ``item_ids``, duplicates included); ``N`` exceeds
            every id; ids no SID holds are ignored. Non-negative.
        trie: ``TrieArrays`` from ``SIDTrie.to_torch(device)``.
        items: an object with the SIDTrie item arrays ``edge_item [E]``,
            ``dup_ptr [C + 1]``, ``dup_items [D]`` (the ``SIDTrie`` itself, whose
            numpy arrays are copied to the device at each call, or tensors on
            the trie's device).
        eps: positive pseudo-mass added to every SID before the log-ratios.
        impl: ``None`` (Triton on CUDA, reference elsewhere), ``"reference"``
            or ``"triton"``.
        validate: check the values (masses >= 0 or NaN, ids < N, groups;
            one host sync; skipped under ``torch.compile``). Without it, bad ids give undefined masses (every
            id is clamped as an address) and negative masses NaN biases.

    Returns ``TrieAggregate(node_mass [I], edge_mass [E], edge_bias [E])``
    float32 (float64 for float64 masses): the mass below each internal node
    and below each edge (a chain edge: its SID's mass, the sum over its
    collision group), and ``edge_bias[e] = log(m~(child)) - log(m~(parent))``
    with ``m~(n) = mass(n) + eps * sids(n)``; along a root-to-leaf path the
    biases sum to ``log((mass(sid) + eps) / (total + eps * S))``. One host
    read of ``level_ptr`` (the level bounds).
    """
    _check_trie(trie)
    if not isinstance(item_mass, Tensor):
        raise TypeError(f"item_mass must be a torch.Tensor, got {type(item_mass).__name__}")
    impl = resolve_torch_impl(impl, item_mass.device)
    dev = trie.child_ptr.device
    edge_item, dup_ptr, dup_items = _item_arrays(items, dev)
    eps = check_aggregate_args(mass=describe("item_mass", item_mass), edge_item=describe("edge_item", edge_item),
                               dup_ptr=describe("dup_ptr", dup_ptr), dup_items=describe("dup_items", dup_items),
                               num_edges=int(trie.num_edges), eps=eps, impl=impl, trie_device=str(dev))
    if validate and not torch.compiler.is_compiling():
        n = (item_mass.numel(), edge_item.numel(), dup_ptr.numel())
        host = torch.cat([t.reshape(-1).double() for t in (item_mass, edge_item, dup_ptr, dup_items)]).cpu().numpy()
        check_aggregate_values(host[:n[0]], host[n[0]:n[0] + n[1]].astype(np.int64),
                               host[n[0] + n[1]:sum(n)].astype(np.int64), host[sum(n):].astype(np.int64))
    out = _aggregate_op(item_mass.contiguous(), trie.child_ptr, trie.edge_word, trie.level_ptr, edge_item, dup_ptr,
                        dup_items, eps, impl)
    return TrieAggregate(*out)
