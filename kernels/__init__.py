"""PLUM kernels: one contract per op, several implementations side by side.

Import the framework you use; neither imports the other:

- ``plum_kernels.torch``: PyTorch ops (Triton on CUDA, torch reference elsewhere),
  registered with ``torch.library``.
- ``plum_kernels.jax``: JAX ops (Pallas on TPU, jnp reference elsewhere), with
  ``jax.custom_vjp``.

Every public op takes ``impl=None | "reference" | "triton"`` (torch) or
``impl=None | "reference" | "pallas"`` (jax); ``None`` picks the fast one where
the hardware has it. Nothing here reads environment variables.
"""

__all__ = ["torch", "jax"]
