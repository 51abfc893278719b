"""The catalogue's content embeddings as rows read in blocks, for the SID tokenizer.

Inputs are numpy arrays (a ``np.memmap`` of an embedding file included) or CPU tensors, ``[N, d_m]``
each. They are validated without being copied (finiteness in blocks of :data:`BLOCK_ROWS` rows), and
:class:`Rows` reads any set of rows standardised on the fly, so a catalogue on disk is never loaded
whole: a minibatch, a block of the final encoding or the k-means sample is read when it is needed.
Standardising a gathered block is elementwise, so it gives the same values as standardising the
whole array first.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["BLOCK_ROWS", "Rows", "as_tensor", "block_stats", "validate_embeddings", "validate_pairs"]

BLOCK_ROWS = 65536  # rows per block of the scans: 32 MB of 128-d float32, whatever the catalogue's size


def _check_array(x, name: str):
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    elif isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        x = x.detach().cpu()
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor [N, d], got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [N, d], got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero width (shape {tuple(x.shape)})")
    for s in range(0, x.shape[0], BLOCK_ROWS):
        block = x[s:s + BLOCK_ROWS]
        finite = np.isfinite(block) if isinstance(block, np.ndarray) else torch.isfinite(block).numpy()
        if not finite.all():
            bad = s + int(np.flatnonzero(~finite.all(1))[0])
            raise ValueError(f"{name} contains NaN or infinite values (first at row {bad})")
    return x


def validate_embeddings(embeddings, expected_dims: tuple[int, ...] | None = None) -> list:
    """One ``[N, d]`` array or a list of them -> the list of inputs, checked (float, 2-D, finite, same N)
    but not copied."""
    if isinstance(embeddings, (list, tuple)):
        if len(embeddings) == 0:
            raise ValueError("embeddings is an empty list: pass one [N, d] array or a list of them")
        xs = [_check_array(x, f"embeddings[{m}]") for m, x in enumerate(embeddings)]
    else:
        xs = [_check_array(embeddings, "embeddings")]
    n = xs[0].shape[0]
    if n == 0:
        raise ValueError("embeddings: the catalogue is empty (0 items)")
    for m, x in enumerate(xs[1:], 1):
        if x.shape[0] != n:
            raise ValueError(f"embeddings[{m}] has {x.shape[0]} rows but embeddings[0] has {n}: "
                             "every content embedding needs one row per item")
    if expected_dims is not None:
        dims = tuple(x.shape[1] for x in xs)
        if dims != expected_dims:
            raise ValueError(f"embeddings widths {dims} do not match the fitted tokenizer's input widths "
                             f"{expected_dims}")
    return xs


def as_tensor(x) -> torch.Tensor:
    """A float32 tensor of ``x`` (no copy when it already is one, or a writable float32 numpy array; a
    read-only one, e.g. a block of a read-only memory map, is copied)."""
    if isinstance(x, torch.Tensor):
        return x.to(torch.float32)
    x = np.ascontiguousarray(x)
    return torch.from_numpy(x if x.flags.writeable else x.copy()).to(torch.float32)


def block_stats(x) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean [d], scale [])`` of ``x [N, d]`` as :meth:`plumrec.sid.rqvae.RQVAE.set_input_stats` defines them
    (the per-column mean, the root mean square of the centred values), in two passes over blocks of rows with
    float64 sums."""
    n, d = x.shape
    total = np.zeros(d, np.float64)
    for s in range(0, n, BLOCK_ROWS):
        total += as_tensor(x[s:s + BLOCK_ROWS]).double().sum(0).numpy()
    mean = total / n
    sq = 0.0
    for s in range(0, n, BLOCK_ROWS):
        sq += float(((as_tensor(x[s:s + BLOCK_ROWS]).double().numpy() - mean) ** 2).sum())
    return torch.from_numpy(mean.astype(np.float32)), torch.tensor(np.sqrt(sq / (n * d)), dtype=torch.float32)


class Rows:
    """Standardised rows of a catalogue's inputs.

    Args:
        xs: the inputs, ``[N, d_m]`` each (numpy arrays, memory maps or tensors).
        means, scales: per input, the ``[d_m]`` mean and the scalar scale to standardise with.
    """

    def __init__(self, xs: Sequence, means: Sequence[torch.Tensor], scales: Sequence[torch.Tensor]):
        self.xs, self.means, self.scales = list(xs), list(means), list(scales)
        self.num_rows = int(self.xs[0].shape[0])

    def take(self, index) -> list[torch.Tensor]:
        """The rows ``index`` (a slice or an int64 tensor ``[B]``) of every input, standardised:
        float32 ``[B, d_m]`` each."""
        out = []
        for x, mean, scale in zip(self.xs, self.means, self.scales):
            if isinstance(x, torch.Tensor):
                block = x[index]
            else:
                block = x[index if isinstance(index, slice) else index.numpy()]
            out.append((as_tensor(block) - mean) / scale)
        return out

    def blocks(self, index: torch.Tensor | None = None, rows: int = 8192):
        """Standardised blocks of at most ``rows`` rows: of every row in order (``index`` None) or of the rows
        ``index [K]``, in its order."""
        n = self.num_rows if index is None else len(index)
        for s in range(0, n, rows):
            yield self.take(slice(s, s + rows) if index is None else index[s:s + rows])


def validate_pairs(cooccurrence, num_items: int) -> torch.Tensor:
    """``[P, 2]`` int item-index pairs -> an int64 tensor (checked against ``num_items``)."""
    pairs = np.asarray(cooccurrence.cpu() if isinstance(cooccurrence, torch.Tensor) else cooccurrence)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"cooccurrence must have shape [P, 2] (pairs of item indices), got {pairs.shape}")
    if pairs.size and not np.issubdtype(pairs.dtype, np.integer):
        raise TypeError(f"cooccurrence must hold integer item indices, got dtype {pairs.dtype}")
    if pairs.shape[0] == 0:
        raise ValueError("cooccurrence is empty: pass None to train without the co-occurrence loss")
    lo, hi = int(pairs.min()), int(pairs.max())
    if lo < 0 or hi >= num_items:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"cooccurrence names item {bad}, but the catalogue has {num_items} items (indices 0..{num_items - 1})"
        )
    return torch.from_numpy(pairs.astype(np.int64))
