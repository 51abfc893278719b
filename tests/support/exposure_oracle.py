"""Brute-force exposure measures in plain Python (dictionaries, double loops, ``math``), for checking
``plumrec.metrics``' vectorised ones, and random top-K lists to check them on."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def random_lists(rng: np.random.Generator, num_users: int, num_items: int, max_len: int, *, ragged: bool):
    """Top-K-like lists: ``[N, max_len]`` int64 with -1 padding at the end of each row, or (``ragged``) a
    Python list of N Python lists of lengths 0..max_len. Items are drawn from a skewed distribution."""
    weights = rng.pareto(1.0, num_items) + 0.01
    weights /= weights.sum()
    rows = []
    for _ in range(num_users):
        n = int(rng.integers(0, min(max_len, num_items) + 1))
        rows.append([int(i) for i in rng.choice(num_items, n, replace=False, p=weights)])
    if ragged:
        return rows
    out = np.full((num_users, max_len), -1, np.int64)
    for u, r in enumerate(rows):
        out[u, :len(r)] = r
    return out


def counts(lists, num_items: int, k=None) -> list[int]:
    """How many list entries (first ``k`` of each list, -1 skipped) hold each item."""
    c = {i: 0 for i in range(num_items)}
    for row in lists:
        for pos, item in enumerate(list(row)):
            if k is not None and pos >= k:
                break
            if int(item) != -1:
                c[int(item)] += 1
    return [c[i] for i in range(num_items)]


def coverage(lists, num_items: int, k=None) -> float:
    return sum(1 for x in counts(lists, num_items, k) if x > 0) / num_items


def entropy(lists, num_items: int, k=None) -> float:
    c = counts(lists, num_items, k)
    total = sum(c)
    return -sum(x / total * math.log(x / total) for x in c if x > 0)


def gini(lists, num_items: int, k=None) -> float:
    """Mean absolute difference over all ordered pairs of items, over twice the mean."""
    c = counts(lists, num_items, k)
    diff = sum(abs(a - b) for a in c for b in c)
    return diff / (2 * num_items * num_items * (sum(c) / num_items))


def tail(popularity, head_fraction: float) -> set[int]:
    """Items outside the ceil(head_fraction * M) most popular (ties: lower index in the head)."""
    m = len(popularity)
    head = math.ceil(Fraction(str(head_fraction)) * m)
    order = sorted(range(m), key=lambda i: (-float(popularity[i]), i))
    return set(order[head:])


def tail_exposure(lists, num_items: int, popularity, head_fraction: float, k=None) -> float:
    c = counts(lists, num_items, k)
    t = tail(popularity, head_fraction)
    return sum(c[i] for i in t) / sum(c)


def novelty(lists, num_items: int, popularity, k=None) -> float:
    total = sum(float(x) for x in popularity)
    values = []
    for row in lists:
        for pos, item in enumerate(list(row)):
            if (k is None or pos < k) and int(item) != -1:
                values.append(-math.log2((float(popularity[int(item)]) + 1) / (total + num_items)))
    return sum(values) / len(values)
