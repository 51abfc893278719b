"""The plain-Python and numpy reference builders of the SID trie (the native build against them:
test_trie.py)."""
from __future__ import annotations

import numpy as np
import pytest
from trie_checks import assert_same_trie

from plumrec.sid.reference import build_numpy, build_python

CODES = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 0], [3, 3, 3], [3, 3, 3], [3, 0, 1]])
SIZES = (4, 4, 4)


@pytest.mark.parametrize("build", [build_python, build_numpy])
def test_a_reference_trie_answers_prefix_and_item_queries(build):
    trie = build(CODES, SIZES, item_ids=np.array([10, 11, 12, 13, 14, 15]))
    assert (trie.num_items, trie.num_sids, trie.num_levels) == (6, 5, 3)
    assert trie.contains(np.array([[0, 1, 3], [3, 3, 3], [0, 1, 1]])).tolist() == [True, True, False]
    assert [x.tolist() for x in trie.items(np.array([[3, 3, 3], [0, 2, 0], [1, 1, 1]]))] == [[13, 14], [12], []]
    root = int(trie.walk(np.zeros((1, 0), np.int64))[0])
    assert trie.children(root, depth=0).tolist() == [0, 3]
    prefix = int(trie.walk(np.array([[0, 1]]))[0])
    assert trie.children(prefix, depth=2).tolist() == [2, 3]
    assert int(trie.walk(np.array([[1]]))[0]) < 0


def test_the_two_references_build_the_same_arrays():
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, v, 200) for v in (16, 8, 300)], axis=1)
    codes[-20:] = codes[:20]  # collisions
    assert_same_trie(build_python(codes, (16, 8, 300)), build_numpy(codes, (16, 8, 300)))
    assert_same_trie(build_python(CODES, SIZES, np.arange(6) * 7), build_numpy(CODES, SIZES, np.arange(6) * 7))


@pytest.mark.parametrize("build", [build_python, build_numpy])
def test_a_reference_refuses_codes_outside_their_codebook(build):
    with pytest.raises(ValueError, match=r"codes\[1, 2\] = 4 is outside level 2's codebook"):
        build(np.array([[0, 1, 2], [0, 1, 4]]), SIZES)
