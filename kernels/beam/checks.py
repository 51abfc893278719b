"""Argument checks of ``constrained_beam_step`` shared by the torch and JAX
front ends: plain Python over shapes, dtype names and ints, so both
frameworks give the same errors for the same mistakes."""
from __future__ import annotations

from typing import Optional, Sequence

MAX_BEAM = 512             # parent index takes 9 bits of the Triton key
NORMALIZE = ("codebook", "children")
LOGIT_DTYPES = ("float16", "bfloat16", "float32")


def dtype_name(dtype) -> str:
    """``torch.float32`` / ``jnp.dtype('float32')`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_step_args(*, level, W, normalize, codebook_sizes: Sequence[int], nodes_shape: tuple,
                    scores_shape: tuple, scores_dtype, logits_shape: tuple, logits_dtype,
                    vocab_offset: Optional[int]) -> int:
    """Checks every framework-independent argument of a beam step and
    returns the vocabulary offset of the level's logits."""
    L = len(codebook_sizes)
    if not _is_int(level) or not 0 <= level < L:
        raise ValueError(f"level must be an int in [0, {L}), got {level!r}")
    if not _is_int(W) or not 1 <= W <= MAX_BEAM:
        raise ValueError(f"W (beam width) must be an int in [1, {MAX_BEAM}], got {W!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if len(nodes_shape) != 2 or nodes_shape[0] == 0 or nodes_shape[1] == 0:
        raise ValueError(f"nodes must be [B, W_in] with B, W_in >= 1, got shape {tuple(nodes_shape)}")
    B, W_in = nodes_shape
    if W_in > MAX_BEAM:
        raise ValueError(f"nodes has {W_in} beams, more than the supported maximum {MAX_BEAM}")
    if dtype_name(scores_dtype) != "float32":
        raise TypeError(f"beam_scores must be float32, got {scores_dtype}")
    if tuple(scores_shape) != (B, W_in):
        raise ValueError(f"beam_scores must have shape [B, W_in] = {[B, W_in]}, got {list(scores_shape)}")
    if dtype_name(logits_dtype) not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16 or float32, got {logits_dtype}")
    V = int(codebook_sizes[level])
    if len(logits_shape) != 3 or tuple(logits_shape[:2]) != (B, W_in):
        raise ValueError(f"logits must have shape [B, W_in, V] = [{B}, {W_in}, ...], got {list(logits_shape)}")
    if vocab_offset is None:
        if logits_shape[2] != V:
            raise ValueError(f"logits must have width V_{level} = {V} (the level's codebook), got "
                             f"{logits_shape[2]}; pass vocab_offset= for a slice of a larger vocabulary")
        return 0
    if not _is_int(vocab_offset) or vocab_offset < 0:
        raise ValueError(f"vocab_offset must be a non-negative int, got {vocab_offset!r}")
    if vocab_offset + V > logits_shape[2]:
        raise ValueError(f"vocab_offset + V_{level} = {vocab_offset} + {V} exceeds the logits width "
                         f"{logits_shape[2]}")
    return vocab_offset


def check_search_args(batch_size, beam_width) -> None:
    """Arguments of ``constrained_beam_search`` (both frameworks)."""
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not _is_int(beam_width) or not 1 <= beam_width <= MAX_BEAM:
        raise ValueError(f"beam_width must be an int in [1, {MAX_BEAM}], got {beam_width!r}")
