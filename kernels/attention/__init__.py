"""attention op family: reference, Triton and Pallas TPU implementations.

Public entry points: ``plum_kernels.torch.history_attention`` /
``beam_decode_attention`` and ``plum_kernels.jax.history_attention`` /
``beam_decode_attention`` (docs/design.md, 'history_attention' and
'beam_decode_attention').

Files:

- ``reference.py``      torch reference (the contract), incl. the explicit backward
- ``reference_jax.py``  jnp reference
- ``triton_common.py``  block-size configs, flattened (sequence, block) schedule, ``mma``
- ``triton_fwd.py``     varlen forward (FlashAttention-2, GQA, causal block skipping)
- ``triton_bwd.py``     backward: delta preprocess, dK/dV kernel, dQ kernel (no atomics)
- ``triton_decode.py``  beam decode: prefix split-K kernel + merge/suffix kernel
- ``pallas.py``         Pallas TPU forward (segment ids, block skipping by scalar prefetch)
- ``pallas_bwd.py``     Pallas TPU backward (dK/dV and dQ kernels)
- ``pallas_decode.py``  Pallas TPU prefix pass of beam decode, jnp suffix + merge
- ``ops_torch.py``      torch.library custom ops, validation, dispatch, autograd
- ``ops_jax.py``        jax.custom_vjp wrappers, validation, dispatch
"""
