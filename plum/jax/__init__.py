"""The PLUM model layer in JAX on ``plum_kernels.jax``: plain-pytree parameters that load the torch
model's checkpoints, CPT / SFT training, generative retrieval and a training step on a device mesh.

- ``model.py``: :func:`init_params`, :func:`params_from_torch_state`, :func:`forward`, :func:`decode_step`;
- ``train.py``: :class:`Batch`, :func:`lm_loss`, :func:`codebook_loss`, :func:`make_optimizer`,
  :func:`make_train_step`;
- ``loop.py``: ``plumrec.jax.loop.train``, the CPT / SFT loop over the torch side's datasets (same
  batches), with ``checkpoint.py``'s atomic checkpoints and exact resume, and :func:`save_model` /
  :func:`load_params` in the torch model folder's layout (``loop.train`` is not re-exported here: the
  name ``plumrec.jax.train`` is the module of the losses and the step);
- ``retrieval.py``: :class:`JaxRetriever`, the trie-constrained beam search over a KV cache, with the
  metrics of the torch retriever;
- ``shard.py``: :func:`make_mesh`, :func:`shard_params`, :func:`stack_batches`, :func:`shard_batch`,
  :func:`make_sharded_train_step` (data x expert parallel).
"""
from plumrec.jax.checkpoint import load_params, save_model
from plumrec.jax.model import (
    decode_step,
    forward,
    init_params,
    lm_logits,
    param_shapes,
    params_from_torch_state,
)
from plumrec.jax.retrieval import JaxRetriever
from plumrec.jax.shard import (
    make_mesh,
    make_sharded_train_step,
    param_shardings,
    shard_batch,
    shard_params,
    stack_batches,
)
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

__all__ = ["param_shapes", "init_params", "params_from_torch_state", "forward", "decode_step", "lm_logits",
           "Batch", "batch_from_packed", "level_bounds", "lm_loss", "codebook_loss", "make_loss", "make_optimizer",
           "make_train_step", "save_model", "load_params", "JaxRetriever", "make_mesh",
           "param_shardings", "shard_params", "stack_batches", "shard_batch", "make_sharded_train_step"]
