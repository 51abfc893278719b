"""Framework-free pieces of the argument checks that every op family shares.

The torch and JAX front ends describe each array argument as an :class:`Arr`
(shape, dtype name, device) and hand it to the family's ``checks.py``, so that
every implementation of an op (torch reference, Triton, jnp reference,
Pallas) raises the same exception type with the same message for the same
mistake. Nothing here imports torch or jax (numpy only).
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Optional

import numpy as np

FLOAT_KERNEL_DTYPES = ("bfloat16", "float16", "float32")
INDEX_DTYPES = ("int32", "int64")


@dataclasses.dataclass(frozen=True)
class Arr:
    """What the checks read of an array: its shape, dtype name (``"float32"``,
    ``"bfloat16"``, ``"int64"``...) and device (``str(tensor.device)`` for
    torch; ``None`` for JAX and numpy arrays, whose placement is not checked)."""

    shape: tuple
    dtype: str
    device: Optional[str]

    @property
    def ndim(self) -> int:
        return len(self.shape)


def dtype_name(dtype) -> str:
    """``torch.float32`` / ``jnp.dtype('float32')`` / ``np.float32`` -> ``"float32"``."""
    name = getattr(dtype, "name", None)
    if isinstance(name, str) and not str(dtype).startswith("torch."):
        return name
    return str(dtype).removeprefix("torch.")


def describe(name: str, x, doc: str = "") -> Arr:
    """The :class:`Arr` of a torch tensor, jax array or numpy array; a
    ``TypeError`` naming ``name`` for anything else."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")) or isinstance(x, type):
        expect = f" {doc}" if doc else ""
        raise TypeError(f"{name} must be an array (torch.Tensor or jax.Array){expect}, got {type(x).__name__}")
    device = str(x.device) if type(x).__module__.startswith("torch") else None
    return Arr(tuple(x.shape), dtype_name(x.dtype), device)


def is_int(x) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def is_float_dtype(a: Arr) -> bool:
    return a.dtype.startswith(("float", "bfloat"))


def is_int_dtype(a: Arr) -> bool:
    return a.dtype.startswith(("int", "uint"))


def check_rank(name: str, a: Arr, ndim: int, doc: str) -> None:
    if a.ndim != ndim:
        raise ValueError(f"{name} must have shape {doc} ({ndim} dims), got {a.shape}")


def check_device(name: str, a: Arr, ref_name: str, ref: Arr) -> None:
    if a.device is not None and ref.device is not None and a.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {a.device}")


def check_index_array(name: str, a: Arr, shape: tuple, ref_name: str, ref: Arr) -> None:
    """An int32 / int64 array of exactly ``shape`` on ``ref``'s device."""
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must be a {list(shape)} integer array, got shape {list(a.shape)}")
    if a.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {a.dtype}")
    check_device(name, a, ref_name, ref)
