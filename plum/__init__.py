"""PLUM model layer (imports only point down; ``tests/test_import_graph.py`` checks it):

- ``cli``: the ``plum`` command;
- ``pipeline``: SIDs -> CPT -> SFT -> evaluation over a work directory, the demos, ``plum run``;
- ``train``, ``retrieval``, ``baselines``: training, generative retrieval, the baselines (side by side);
- ``sequences``: histories, examples and packed batches, shared by the three above;
- ``data``, ``sid``, ``model``, ``metrics``: datasets, Semantic IDs, the LM, top-K metrics;
- ``io``: atomic file writes.

The model layer is PyTorch: it needs the ``[torch]`` extra (torch, triton, safetensors, tokenizers,
tqdm), and importing it without them raises ``ImportError`` naming the install command.
"""
import importlib.util

__version__ = "0.1.0"

# Looked up, not imported: ``import plumrec`` stays cheap, and a missing extra fails here, by name.
_NEEDS = ("torch", "safetensors", "tokenizers", "tqdm")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a blocked module, or one set to None in sys.modules
        return False


_MISSING = [name for name in _NEEDS if not _installed(name)]
if _MISSING:
    raise ImportError(f"plumrec (the model layer) needs PyTorch and its extra, missing here: {', '.join(_MISSING)}; "
                      'install them with: pip install "plum-kernels[torch]" '
                      '(plum_kernels.jax needs only pip install "plum-kernels[jax]")')
