"""Explicit implementation choice shared by the op families (no env magic)."""
from __future__ import annotations

TORCH_IMPLS = ("reference", "triton")
JAX_IMPLS = ("reference", "pallas")


def resolve_torch_impl(impl: str | None, device) -> str:
    """``None`` -> ``"triton"`` on CUDA tensors, ``"reference"`` elsewhere."""
    if impl is None:
        return "triton" if getattr(device, "type", str(device)) == "cuda" else "reference"
    if impl not in TORCH_IMPLS:
        raise ValueError(f"impl must be None or one of {TORCH_IMPLS}, got {impl!r}")
    return impl


def default_backend_is_tpu() -> bool:
    import jax

    return jax.default_backend() == "tpu"


def resolve_jax_impl(impl: str | None) -> str:
    """``None`` -> ``"pallas"`` when the default JAX backend is a TPU, else ``"reference"``."""
    if impl is None:
        return "pallas" if default_backend_is_tpu() else "reference"
    if impl not in JAX_IMPLS:
        raise ValueError(f"impl must be None or one of {JAX_IMPLS}, got {impl!r}")
    return impl


def resolve_interpret(interpret: bool | None) -> bool:
    """``None`` -> interpret mode exactly when the default backend is not a TPU."""
    if interpret is None:
        return not default_backend_is_tpu()
    return bool(interpret)
