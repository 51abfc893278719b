"""Public JAX API of the PLUM kernels.

Each op family keeps its dispatch and ``jax.custom_vjp`` wrappers next to its
kernels (``kernels/<family>/ops_jax.py``); this module is the one public
namespace users import::

    import kernels.jax as KJ
    out = KJ.history_attention(q, k, v, cu_seqlens, max_seqlen)

``impl=None`` picks the Pallas TPU kernel when the default backend is a TPU and
the jnp reference otherwise; ``impl="pallas"`` forces the kernel.
``interpret=None`` means TPU interpret mode exactly when the default backend is
not a TPU; ``interpret=False`` forces the TPU lowering.
"""
from __future__ import annotations

# --- attention (issue 3) ---
# --- moe (issue 4) ---
# --- beam search (issue 5) ---
