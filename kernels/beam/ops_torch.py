"""PyTorch trie-constrained beam search: validation, dispatch, ``torch.library``.

Public functions (re-exported by ``kernels.torch``):

- ``constrained_beam_step(logits, beam_scores, nodes, trie, level, W, *,
  normalize="codebook", vocab_offset=None, impl=None, validate=True)``
  (contract 4; exact semantics in ``kernels/beam/reference.py``)
- ``constrained_beam_search(step_fn, trie, *, batch_size, beam_width,
  normalize="codebook", impl=None)`` (contract 5)

The step is the custom op ``plum_beam::step`` (no autograd: beam search is
not differentiated), carrying ``impl`` as a string so both implementations go
through one registration with a fake kernel for ``torch.compile``. ``trie`` is
the ``TrieArrays`` object of ``SIDTrie.to_torch(device)``, read by attribute
(``kernels`` does not import ``plum``).

Host synchronisation: ``validate=True`` reads back one flag to check the
*values* of ``nodes`` (range and depth); the search skips it, its states
coming from the previous step. The Triton path is otherwise sync-free (the
chain-word layout is computed on the host from ``codebook_sizes``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .._dispatch import resolve_torch_impl
from . import reference as ref
from .checks import check_search_args, check_step_args

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
    # Imported lazily: importing kernels.torch must not import triton.
    from . import triton as triton_beam
    return triton_beam


@torch.library.custom_op("plum_beam::step", mutates_args=())
def _step_op(logits: Tensor, beam_scores: Tensor, nodes: Tensor, child_ptr: Tensor, child_token: Tensor,
             edge_word: Tensor, codebook_sizes: list[int], num_internal: int, level: int, W: int,
             normalize: str, vocab_offset: int, impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    shift, mask = chain_layout(codebook_sizes)
    trie = _TrieView(child_ptr, child_token, edge_word, shift, mask, tuple(codebook_sizes), num_internal,
                     int(edge_word.shape[0]))
    if impl == "triton":
        return _triton().beam_step(logits, beam_scores, nodes, trie, level, W, normalize, vocab_offset)
    return ref.constrained_beam_step(logits, beam_scores, nodes, trie, level, W, normalize=normalize,
                                     vocab_offset=vocab_offset)


@_step_op.register_fake
def _(logits, beam_scores, nodes, child_ptr, child_token, edge_word, codebook_sizes, num_internal, level, W,
      normalize, vocab_offset, impl):
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


def _check_step(logits, beam_scores, nodes, trie, level, W, normalize, vocab_offset, impl) -> int:
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
    return off


def _check_node_values(nodes: Tensor, trie, level: int) -> None:
    """Every state is -1, an internal node at depth ``level`` or a chain
    entered above ``level`` (one host sync)."""
    I, E = int(trie.num_internal), int(trie.num_edges)
    lo_n, hi_n = trie.level_ptr[level], trie.level_ptr[level + 1]
    internal_ok = (nodes >= lo_n) & (nodes < hi_n)
    chain_ok = (nodes >= I) & (nodes < I + E) & (nodes - I < trie.edge_level_ptr[level])
    bad = ~((nodes == -1) | internal_ok | chain_ok)
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        b, w = divmod(i, nodes.shape[1])
        raise ValueError(f"nodes[{b}, {w}] = {int(nodes[b, w])} is not a trie state at level {level}: expected -1, "
                         f"an internal node in [{int(lo_n)}, {int(hi_n)}) or a chain state in "
                         f"[{I}, {I + int(trie.edge_level_ptr[level])})")


# ============================================================================= public ops


def constrained_beam_step(logits: Tensor, beam_scores: Tensor, nodes: Tensor, trie, level: int, W: int, *,
                          normalize: str = "codebook", vocab_offset: Optional[int] = None,
                          impl: Optional[str] = None, validate: bool = True) -> BeamStep:
    """One step of beam search restricted to the SID trie (contract 4).

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
        impl: ``None`` (Triton on CUDA, reference elsewhere), ``"reference"``
            or ``"triton"``.
        validate: check the values of ``nodes`` (one host sync).

    Returns ``BeamStep(scores, nodes, parent, token)``, each ``[B, W]``: the best
    ``W`` (beam, child) pairs of each user ranked by score, then parent, then
    token; empty slots hold ``-inf`` / ``-1`` / ``0`` / ``-1``.
    """
    impl = resolve_torch_impl(impl, logits.device if isinstance(logits, Tensor) else "cpu")
    off = _check_step(logits, beam_scores, nodes, trie, level, W, normalize, vocab_offset, impl)
    if validate:
        _check_node_values(nodes, trie, level)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = _step_op(logits, beam_scores, nodes, trie.child_ptr, trie.child_token, trie.edge_word,
                   [int(v) for v in trie.codebook_sizes], int(trie.num_internal), level, W, normalize, off, impl)
    return BeamStep(*out)


def constrained_beam_search(step_fn: Callable[[int, Tensor, Tensor], Tensor], trie, *, batch_size: int,
                            beam_width: int, normalize: str = "codebook",
                            impl: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Beam search over the SIDs of ``trie`` (contract 5).

    ``step_fn(level, tokens, parent) -> logits [B, W, V_level]`` is called for
    ``level = 0 .. L-1``; ``tokens [B, W, level]`` int64 holds each beam's
    prefix, already reordered by ``parent [B, W]`` int64 (the beam of the
    previous call each row came from; ``arange(W)`` at level 0, where only
    beam 0 is live). Rows of dead beams (score ``-inf``) are ignored.

    Returns ``(codes [B, W, L] int64, scores [B, W] float32)``, best first: every
    slot with a finite score holds a SID of the trie, the others score
    ``-inf`` and codes ``-1`` (a user has fewer than ``W`` such slots only when
    the trie has fewer than ``W`` SIDs reachable with finite scores).
    """
    _check_trie(trie)
    check_search_args(batch_size, beam_width)
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
                                                             normalize=normalize, impl=impl, validate=False)
        prefix = torch.gather(tokens, 1, parent[..., None].expand(B, W, level))
        tokens = torch.cat([prefix, token[..., None]], dim=2)
    codes = torch.where((scores > float("-inf"))[..., None], tokens, torch.full_like(tokens, -1))
    return codes, scores
