"""The PLUM LM in JAX on ``plum_kernels.jax``: plain-pytree parameters that load the torch model's
checkpoints, the packed forward, the CPT / SFT losses and an optax training step.

- ``model.py``: :func:`init_params`, :func:`params_from_torch_state`, :func:`forward`;
- ``train.py``: :class:`Batch`, :func:`lm_loss`, :func:`codebook_loss`, :func:`make_optimizer`,
  :func:`make_train_step`.
"""
from plumrec.jax.model import forward, init_params, lm_logits, param_shapes, params_from_torch_state
from plumrec.jax.train import (
    Batch,
    batch_from_packed,
    codebook_loss,
    level_bounds,
    lm_loss,
    make_loss,
    make_optimizer,
    make_train_step,
)

__all__ = ["param_shapes", "init_params", "params_from_torch_state", "forward", "lm_logits", "Batch",
           "batch_from_packed", "level_bounds", "lm_loss", "codebook_loss", "make_loss", "make_optimizer",
           "make_train_step"]
