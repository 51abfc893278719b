"""PLUM model layer (imports only point down; ``tests/test_import_graph.py`` checks it):

- ``cli``: the ``plum`` command;
- ``pipeline``: SIDs -> CPT -> SFT -> evaluation over a work directory, the demos, ``plum run``;
- ``train``, ``retrieval``, ``baselines``: training, generative retrieval, the baselines (side by side);
- ``sequences``: histories, examples and packed batches, shared by the three above;
- ``data``, ``sid``, ``model``, ``metrics``: datasets, Semantic IDs, the LM, top-K metrics;
- ``io``: atomic file writes.
"""
__version__ = "0.1.0"
