"""Leave-one-out splits: the last item of each long enough history is its test target, the one before its
validation target, the rest training (on the Beauty file layout: test_formats.py)."""
import numpy as np
import pytest

from plumrec.data import InteractionData, leave_one_out


def test_leave_one_out():
    seqs = (np.array([0, 1, 2, 3, 4]), np.array([5, 6, 7]), np.array([2, 4]))
    data = InteractionData(seqs, ("a", "b", "c"), tuple(str(i) for i in range(8)))
    split = leave_one_out(data)
    assert [s.tolist() for s in split.train] == [[0, 1, 2], [5], [2, 4]]  # short user: all training
    assert split.test.users.tolist() == split.valid.users.tolist() == [0, 1]
    assert split.valid.targets.tolist() == [3, 6]
    assert [h.tolist() for h in split.valid.histories] == [[0, 1, 2], [5]]
    assert split.test.targets.tolist() == [4, 7]
    assert [h.tolist() for h in split.test.histories] == [[0, 1, 2, 3], [5, 6]]
    # no target ever leaks into its own history or into training
    for u, h, t in zip(split.test.users, split.test.histories, split.test.targets):
        assert len(h) == len(seqs[u]) - 1 and seqs[u][-1] == t
    with pytest.raises(ValueError, match="min_length"):
        leave_one_out(data, min_length=2)


def test_min_length_keeps_short_users_for_training_only():
    seqs = (np.array([0, 1, 2, 3]), np.array([1, 2, 3]))
    split = leave_one_out(InteractionData(seqs, ("a", "b"), ("w", "x", "y", "z")), min_length=4)
    assert [s.tolist() for s in split.train] == [[0, 1], [1, 2, 3]] and split.num_items == 4
    assert len(split.valid) == len(split.test) == 1 and split.test.users.tolist() == [0]
    assert split.test.targets.dtype == np.int64
    with pytest.raises(ValueError, match=r"min_length must be >= 3 \(train, validation and test items\), got 2"):
        leave_one_out(InteractionData(seqs, ("a", "b"), ("w", "x", "y", "z")), min_length=2)
    with pytest.raises(ValueError, match="data has no users"):
        leave_one_out(InteractionData((), (), ("w",)))
