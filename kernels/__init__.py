"""PLUM kernels: one contract per op, several implementations side by side.

Import the framework you use; neither imports the other, and this package
itself imports neither (the base install is numpy only):

- ``plum_kernels.torch``: PyTorch ops (Triton on CUDA, torch reference elsewhere),
  registered with ``torch.library``; ``pip install "plum-kernels[torch]"``.
- ``plum_kernels.jax``: JAX ops (Pallas on TPU, jnp reference elsewhere), with
  ``jax.custom_vjp``; ``pip install "plum-kernels[jax]"``.

Every public op takes ``impl=None | "reference" | "triton"`` (torch) or
``impl=None | "reference" | "pallas"`` (jax); ``None`` picks the fast one where
the hardware has it. Nothing here reads environment variables.
"""

__all__ = ["torch", "jax"]
