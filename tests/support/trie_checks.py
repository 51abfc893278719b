"""Comparison of two built SID tries, array by array (the native build against the references)."""
from __future__ import annotations

import numpy as np

from plumrec.sid import SIDTrie
from plumrec.sid.trie import _ARRAYS


def assert_same_trie(a: SIDTrie, b: SIDTrie):
    for name in _ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, (name, x.dtype, y.dtype)
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert (a.num_items, a.num_sids, a.num_nodes, a.chain_min_depth) == \
        (b.num_items, b.num_sids, b.num_nodes, b.chain_min_depth)
