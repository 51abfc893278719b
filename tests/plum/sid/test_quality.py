"""sid_quality on hand-made codes, where every figure is known exactly."""
from __future__ import annotations

import numpy as np
import pytest

from plumrec.sid import sid_quality

CODES = np.array([
    [0, 0, 1],
    [0, 0, 1],  # collides with item 0
    [0, 1, 0],
    [1, 0, 0],
    [2, 1, 1],
    [2, 1, 0],
])
SIZES = (4, 2, 3)


def test_uniqueness_and_utilisation():
    q = sid_quality(CODES, SIZES)
    assert q.num_items == 6
    assert q.uniqueness == pytest.approx(4 / 6)
    assert q.max_items_per_sid == 2
    assert q.utilisation == pytest.approx((3 / 4, 2 / 2, 2 / 3))
    assert q.prefix_share is None and q.prefix_lift is None and q.reconstruction_error is None
    assert sid_quality(np.arange(5)[:, None], (5,)).uniqueness == 1.0


def test_retrieval_proxy():
    pairs = np.array([[0, 1], [0, 2], [4, 5], [3, 0]])
    q = sid_quality(CODES, SIZES, cooccurrence=pairs, reconstruction_error=0.25, seed=0)
    assert q.num_pairs == 4 and q.reconstruction_error == 0.25
    # level 1 agrees for (0,1), (0,2), (4,5); levels 1-2 for (0,1), (4,5); all three for (0,1)
    assert q.prefix_share == pytest.approx((3 / 4, 2 / 4, 1 / 4))
    # random pairs: first items against the shuffled second items, recomputed here
    perm = np.random.default_rng(0).permutation(4)
    a, b = CODES[pairs[:, 0]], CODES[pairs[perm, 1]]
    expect = [np.mean(np.all(a[:, : l + 1] == b[:, : l + 1], axis=1)) for l in range(3)]
    assert q.random_prefix_share == pytest.approx(tuple(expect))
    lift = q.prefix_lift
    for s, r, x in zip(q.prefix_share, q.random_prefix_share, lift):
        assert x == (s / r if r > 0 else float("inf"))
    assert "uniqueness 66.67%" in str(q) and "level-1 code 0.750" in str(q)
    assert q.as_dict()["prefix_lift"] == lift


@pytest.mark.parametrize(
    "codes, kwargs, exc, match",
    [
        (CODES[:, :2], {}, ValueError, r"shape \[N, 3\]"),
        (np.zeros((0, 3), np.int64), {}, ValueError, "empty"),
        (CODES.astype(float), {}, TypeError, "integers"),
        (np.where(CODES == 2, 4, CODES), {}, ValueError, r"codes\[:, 0\] must be in \[0, 4\)"),
        (CODES, dict(cooccurrence=np.array([[0, 6]])), ValueError, "names item 6"),
        (CODES, dict(cooccurrence=np.array([0, 1])), ValueError, r"\[P, 2\]"),
        (CODES, dict(cooccurrence=np.array([[0.0, 1.0]])), TypeError, "integer"),
    ],
)
def test_bad_input(codes, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sid_quality(codes, SIZES, **kwargs)
