"""Leave-one-out splits, as in S3-Rec, TIGER, P5 and LETTER.

For a user with sequence ``s = [i_1, ..., i_n]`` (time order):

- train: ``s[:-2]`` (every prefix of it is a training example downstream),
- validation: history ``s[:-2]``, target ``s[-2]``,
- test: history ``s[:-1]``, target ``s[-1]``.

Users with fewer than ``min_length`` items (default 3, the least that leaves a
non-empty training history) are not evaluated; their whole sequence is
training data. The public 5-core Amazon splits have no such user.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from plumrec.data.interactions import InteractionData

__all__ = ["EvalSet", "LeaveOneOutSplit", "leave_one_out"]


@dataclass(frozen=True)
class EvalSet:
    """Next-item examples: ``histories[k]`` -> ``targets[k]`` for user ``users[k]``."""

    users: np.ndarray  # int64 [U], user (sequence) index in the dataset
    histories: tuple[np.ndarray, ...]
    targets: np.ndarray  # int64 [U]

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class LeaveOneOutSplit:
    train: tuple[np.ndarray, ...]  # one per user (may be empty for no user here)
    valid: EvalSet
    test: EvalSet
    num_items: int


def leave_one_out(data: InteractionData, *, min_length: int = 3) -> LeaveOneOutSplit:
    """Split every user's sequence: last item test, second to last validation."""
    if min_length < 3:
        raise ValueError(f"min_length must be >= 3 (train, validation and test items), got {min_length}")
    if data.num_users == 0:
        raise ValueError("data has no users")
    train, users, v_hist, v_tgt, t_hist, t_tgt = [], [], [], [], [], []
    for u, seq in enumerate(data.sequences):
        if len(seq) < min_length:
            train.append(seq.copy())
            continue
        train.append(seq[:-2].copy())
        users.append(u)
        v_hist.append(seq[:-2].copy())
        v_tgt.append(seq[-2])
        t_hist.append(seq[:-1].copy())
        t_tgt.append(seq[-1])
    users_arr = np.asarray(users, np.int64)
    valid = EvalSet(users_arr, tuple(v_hist), np.asarray(v_tgt, np.int64))
    test = EvalSet(users_arr.copy(), tuple(t_hist), np.asarray(t_tgt, np.int64))
    return LeaveOneOutSplit(tuple(train), valid, test, data.num_items)
