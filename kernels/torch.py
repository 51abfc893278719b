"""Public PyTorch API of the PLUM kernels.

Each op family keeps its dispatch and ``torch.library`` registration next to
its kernels (``kernels/<family>/ops_torch.py``); this module is the one public
namespace users import::

    import kernels.torch as K
    out = K.history_attention(q, k, v, cu_seqlens, max_seqlen)

``impl=None`` picks Triton for CUDA tensors and the torch reference
otherwise; ``impl="triton"`` forces the Triton kernel (on CPU tensors it runs
under the Triton interpreter, which the caller enables with
``TRITON_INTERPRET=1`` before importing triton), ``impl="reference"`` the
reference.
"""
from __future__ import annotations

# --- attention (issue 3) ---
# --- moe (issue 4) ---
# --- beam search (issue 5) ---
