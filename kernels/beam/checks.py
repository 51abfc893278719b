"""Argument checks of ``constrained_beam_step`` shared by the torch and JAX
front ends: plain Python over shapes, dtype names and ints, so both
frameworks give the same errors for the same mistakes."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from plum_kernels._checks import dtype_name, is_int

MAX_BEAM = 512             # parent index takes 9 bits of the Triton key
NORMALIZE = ("codebook", "children")
LOGIT_DTYPES = ("float16", "bfloat16", "float32")


def check_step_args(*, level, W, normalize, codebook_sizes: Sequence[int], nodes_shape: tuple,
                    scores_shape: tuple, scores_dtype, logits_shape: tuple, logits_dtype,
                    vocab_offset: Optional[int]) -> int:
    """Checks every framework-independent argument of a beam step and
    returns the vocabulary offset of the level's logits."""
    L = len(codebook_sizes)
    if not is_int(level) or not 0 <= level < L:
        raise ValueError(f"level must be an int in [0, {L}), got {level!r}")
    if not is_int(W) or not 1 <= W <= MAX_BEAM:
        raise ValueError(f"W (beam width) must be an int in [1, {MAX_BEAM}], got {W!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if len(nodes_shape) != 2 or nodes_shape[0] == 0 or nodes_shape[1] == 0:
        raise ValueError(f"nodes must be [B, W_in] with B, W_in >= 1, got shape {tuple(nodes_shape)}")
    B, W_in = nodes_shape
    if W_in > MAX_BEAM:
        raise ValueError(f"nodes has {W_in} beams, more than the supported maximum {MAX_BEAM}")
    if dtype_name(scores_dtype) != "float32":
        raise TypeError(f"beam_scores must be float32, got {dtype_name(scores_dtype)}")
    if tuple(scores_shape) != (B, W_in):
        raise ValueError(f"beam_scores must have shape [B, W_in] = {[B, W_in]}, got {list(scores_shape)}")
    if dtype_name(logits_dtype) not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16 or float32, got {dtype_name(logits_dtype)}")
    V = int(codebook_sizes[level])
    if len(logits_shape) != 3 or tuple(logits_shape[:2]) != (B, W_in):
        raise ValueError(f"logits must have shape [B, W_in, V] = [{B}, {W_in}, ...], got {list(logits_shape)}")
    if vocab_offset is None:
        if logits_shape[2] != V:
            raise ValueError(f"logits must have width V_{level} = {V} (the level's codebook), got "
                             f"{logits_shape[2]}; pass vocab_offset= for a slice of a larger vocabulary")
        return 0
    if not is_int(vocab_offset) or vocab_offset < 0:
        raise ValueError(f"vocab_offset must be a non-negative int, got {vocab_offset!r}")
    if vocab_offset + V > logits_shape[2]:
        raise ValueError(f"vocab_offset + V_{level} = {vocab_offset} + {V} exceeds the logits width "
                         f"{logits_shape[2]}")
    return vocab_offset


def check_search_args(batch_size, beam_width) -> None:
    """Arguments of ``constrained_beam_search`` (both frameworks)."""
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not is_int(beam_width) or not 1 <= beam_width <= MAX_BEAM:
        raise ValueError(f"beam_width must be an int in [1, {MAX_BEAM}], got {beam_width!r}")


def check_node_values(nodes: np.ndarray, level_ptr: Sequence[int], edge_level_ptr: Sequence[int],
                      num_internal: int, num_edges: int, level: int) -> None:
    """Every state of ``nodes [B, W_in]`` (host array) is -1, an internal node
    at depth ``level`` or a chain entered above ``level``."""
    nodes = np.asarray(nodes, dtype=np.int64)
    I, E = int(num_internal), int(num_edges)
    lo_n, hi_n = int(level_ptr[level]), int(level_ptr[level + 1])
    chains = int(edge_level_ptr[level])
    ok = (nodes == -1) | ((nodes >= lo_n) & (nodes < hi_n)) | ((nodes >= I) & (nodes < I + min(E, chains)))
    if not ok.all():
        b, w = np.argwhere(~ok)[0]
        raise ValueError(f"nodes[{b}, {w}] = {nodes[b, w]} is not a trie state at level {level}: expected -1, an "
                         f"internal node in [{lo_n}, {hi_n}) or a chain state in [{I}, {I + chains})")


# ----------------------------------------------------------------------------- trie_aggregate, edge_bias

DEFAULT_EPS = 1e-9
MASS_DTYPES = ("float32", "float64")


def check_edge_bias(bias, num_edges: int, trie_device: Optional[str], bias_row=None,
                    batch_size: Optional[int] = None) -> None:
    """``edge_bias`` and ``bias_row`` (:class:`~plum_kernels._checks.Arr` or
    None): ``edge_bias`` float32 ``[E]`` (one value per trie edge, shared by
    every user, ``bias_row`` None) or ``[T, E]`` (a table of rows) with
    ``bias_row`` int32/int64 ``[B]`` (each user's row; ``B = batch_size``
    when given), both on the trie's device."""
    if bias is None:
        if bias_row is not None:
            raise ValueError("bias_row is given without an edge_bias: it selects rows of a [T, E] edge_bias")
        return
    if bias.ndim not in (1, 2) or bias.shape[-1] != num_edges or (bias.ndim == 2 and bias.shape[0] < 1):
        raise ValueError(f"edge_bias must have shape [E] = [{num_edges}] (one value per trie edge) or [T, E] "
                         f"with T >= 1 (one row per bias_row value), got {list(bias.shape)}")
    if bias.dtype != "float32":
        raise TypeError(f"edge_bias must be float32, got {bias.dtype}")
    if bias.device is not None and trie_device is not None and bias.device != trie_device:
        raise ValueError(f"edge_bias is on {bias.device} but the trie arrays are on {trie_device}")
    if bias.ndim == 1:
        if bias_row is not None:
            raise ValueError("bias_row must be None with a one-dimensional edge_bias [E] (shared by every user); "
                             "pass edge_bias as a [T, E] table to give each user a row")
        return
    if bias_row is None:
        raise ValueError(f"edge_bias of shape [T, E] = {list(bias.shape)} needs bias_row, int32/int64 [B]: each "
                         f"user's row of the table")
    if bias_row.dtype not in ("int32", "int64"):
        raise TypeError(f"bias_row must be int32 or int64, got {bias_row.dtype}")
    if bias_row.ndim != 1 or (batch_size is not None and bias_row.shape[0] != batch_size):
        raise ValueError(f"bias_row must have shape [B] = [{batch_size}] (one row per user), "
                         f"got {list(bias_row.shape)}")
    if bias_row.device is not None and trie_device is not None and bias_row.device != trie_device:
        raise ValueError(f"bias_row is on {bias_row.device} but the trie arrays are on {trie_device}")


def check_bias_row_values(bias_row: np.ndarray, num_rows: int) -> None:
    """Host values of ``bias_row``: every row indexes the ``[T, E]`` table."""
    bad = (bias_row < 0) | (bias_row >= num_rows)
    if bad.any():
        b = int(np.argmax(bad))
        raise ValueError(f"bias_row[{b}] = {int(bias_row[b])} is not a row of edge_bias: expected 0 <= row < "
                         f"T = {num_rows}")


ITEM_ARRAYS = ("edge_item", "dup_ptr", "dup_items")


def item_arrays(items) -> tuple:
    """``(edge_item, dup_ptr, dup_items)`` read from ``items`` by attribute (a
    ``SIDTrie``, or any object holding those arrays)."""
    for name in ITEM_ARRAYS:
        if not hasattr(items, name):
            raise TypeError(f"items must hold the SIDTrie item arrays edge_item, dup_ptr, dup_items (a SIDTrie, "
                            f"or an object with those arrays); it has no {name!r}")
    return tuple(getattr(items, name) for name in ITEM_ARRAYS)


def check_aggregate_args(*, mass, edge_item, dup_ptr, dup_items, num_edges: int, eps, impl: str,
                         trie_device: Optional[str]) -> float:
    """Array descriptors (:class:`~plum_kernels._checks.Arr`) of ``trie_aggregate``'s
    arguments; returns ``eps`` as a float."""
    if mass.ndim != 1 or mass.shape[0] < 1:
        raise ValueError(f"item_mass must have shape [N] with N >= 1 (one mass per item id), got {list(mass.shape)}")
    if mass.dtype not in (MASS_DTYPES if impl == "reference" else ("float32",)):
        raise TypeError(f"item_mass must be float32 (or float64 with the torch reference), got {mass.dtype}")
    for name, a, doc in (("items.edge_item", edge_item, f"[E] = [{num_edges}]"), ("items.dup_ptr", dup_ptr, "[C + 1]"),
                         ("items.dup_items", dup_items, "[D]")):
        if a.dtype not in ("int32", "int64"):
            raise TypeError(f"{name} must be int32 or int64, got {a.dtype}")
        if a.ndim != 1 or (name == "items.edge_item" and a.shape[0] != num_edges) or (name == "items.dup_ptr"
                                                                                      and not a.shape[0]):
            raise ValueError(f"{name} must have shape {doc}, got {list(a.shape)}")
    for name, a in (("item_mass", mass), ("items.edge_item", edge_item), ("items.dup_ptr", dup_ptr),
                    ("items.dup_items", dup_items)):
        if a.device is not None and trie_device is not None and a.device != trie_device:
            raise ValueError(f"{name} is on {a.device} but the trie arrays are on {trie_device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not 0 < float(eps) < float("inf"):
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")
    return float(eps)


def check_aggregate_values(mass: np.ndarray, edge_item: np.ndarray, dup_ptr: np.ndarray,
                           dup_items: np.ndarray) -> None:
    """Host values: every mass is >= 0 or NaN (NaN propagates), every item id
    the trie holds indexes ``item_mass``, ``dup_ptr`` rises from 0 to ``len(dup_items)``
    and names as many groups as ``edge_item`` does."""
    N = mass.shape[0]
    if (mass < 0).any():
        i = int(np.argmax(mass < 0))
        raise ValueError(f"item_mass must be non-negative, item_mass[{i}] = {mass[i]}")
    ids = np.concatenate([edge_item[edge_item >= 0], dup_items]).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= N):
        bad = int(ids.max()) if ids.max() >= N else int(ids.min())
        raise ValueError(f"item_mass has N = {N} entries but the trie holds item id {bad}: item ids index "
                         f"item_mass, so N must exceed every id")
    groups = int((edge_item <= -2).sum())
    bad_group = groups and int(-edge_item.min()) - 2 >= groups
    if (bad_group or dup_ptr[0] != 0 or dup_ptr[-1] != dup_items.shape[0] or (np.diff(dup_ptr) < 0).any()
            or dup_ptr.shape[0] != groups + 1):
        raise ValueError(f"items.dup_ptr must rise from 0 to len(dup_items) = {dup_items.shape[0]} over the "
                         f"{groups} collision groups of items.edge_item")
