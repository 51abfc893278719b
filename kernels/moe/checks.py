"""Argument checks of the MoE ops shared by the torch and JAX front ends
(docs/design.md, 'moe_route' .. 'moe_mlp').

Plain Python over :class:`~plum_kernels._checks.Arr` descriptors and host
values, so that every implementation (torch reference, Triton, jnp reference,
Pallas) raises the same errors for the same mistakes. The value checks take
what one read-back to the host gives (ranges, sums, a flag), computed by each
front end with its own framework.
"""
from __future__ import annotations

from typing import Optional, Sequence

from plum_kernels._checks import (
    FLOAT_KERNEL_DTYPES,
    Arr,
    check_device,
    check_index_array,
    is_float_dtype,
    is_int,
)

SCORES = ("softmax", "sigmoid")
KERNEL_IMPLS = ("triton", "pallas")


def _check_rows(name: str, a: Arr) -> None:
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [rows, features] array, got shape {list(a.shape)}")
    if not is_float_dtype(a):
        raise TypeError(f"{name} must be floating point, got {a.dtype}")


def _check_kernel_dtype(impl: str, names: str, a: Arr, impls: Sequence[str] = KERNEL_IMPLS) -> None:
    if impl in impls and a.dtype not in FLOAT_KERNEL_DTYPES:
        raise TypeError(f"impl={impl!r} takes {names} in {FLOAT_KERNEL_DTYPES}, got {a.dtype}")


def check_route(router_logits: Arr, top_k, score, bias: Optional[Arr], impl: str) -> None:
    """``moe_route``: logits ``[T, E]`` floating with T, E >= 1; ``top_k`` in
    ``[1, E]``; a known ``score``; an optional floating ``bias [E]``."""
    if router_logits.ndim != 2:
        raise ValueError(f"router_logits must be a [T, E] array, got shape {list(router_logits.shape)}")
    if not is_float_dtype(router_logits):
        raise TypeError(f"router_logits must be floating point, got {router_logits.dtype}")
    T, E = router_logits.shape
    if T == 0 or E == 0:
        raise ValueError(f"router_logits must have T >= 1 tokens and E >= 1 experts, got shape {[T, E]}")
    if not is_int(top_k) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, E={E}], got {top_k!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if bias is not None:
        if bias.shape != (E,):
            raise ValueError(f"bias must be a [E={E}] array, got shape {list(bias.shape)}")
        if not is_float_dtype(bias):
            raise TypeError(f"bias must be floating point, got {bias.dtype}")
        check_device("bias", bias, "router_logits", router_logits)
    _check_kernel_dtype(impl, "router_logits", router_logits, ("triton",))


def check_permute(x: Arr, expert_ids: Arr, num_experts) -> None:
    """``moe_permute``: ``x [T, d]`` floating, ``expert_ids [T, k]`` integer,
    ``num_experts >= 1``."""
    _check_rows("x", x)
    if not is_int(num_experts) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    if expert_ids.ndim != 2 or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"expert_ids must be [T={x.shape[0]}, k], got shape {list(expert_ids.shape)}")
    check_index_array("expert_ids", expert_ids, expert_ids.shape, "x", x)


def check_expert_ids_values(lo: int, hi: int, num_experts: int) -> None:
    """The smallest and largest expert id lie in ``[0, num_experts)``."""
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"expert_ids must lie in [0, {num_experts}), got values in [{lo}, {hi}]")


def check_unpermute(y: Arr, weights: Arr, permutation: Arr, inverse: Arr) -> None:
    """``moe_unpermute``: ``y [T*k, d]`` floating, ``weights [T, k]`` floating,
    ``permutation`` / ``inverse`` integer ``[T*k]``, all on y's device."""
    _check_rows("y", y)
    M = y.shape[0]
    if weights.ndim != 2 or weights.shape[0] * weights.shape[1] != M:
        raise ValueError(f"weights must be [T, k] with T*k = {M} rows of y, got shape {list(weights.shape)}")
    if not is_float_dtype(weights):
        raise TypeError(f"weights must be floating point, got {weights.dtype}")
    check_device("weights", weights, "y", y)
    check_index_array("permutation", permutation, (M,), "y", y)
    check_index_array("inverse", inverse, (M,), "y", y)


def check_unpermute_values(rows: int, permutation_range: tuple[int, int], inverse_range: tuple[int, int],
                           consistent: bool) -> None:
    """``permutation`` and ``inverse`` lie in ``[0, rows)`` (their ``(min,
    max)``) and are inverse permutations of each other
    (``permutation[inverse[a]] == a`` for every copy ``a``: ``consistent``)."""
    for name, (lo, hi) in (("inverse", inverse_range), ("permutation", permutation_range)):
        if lo < 0 or hi >= rows:
            raise ValueError(f"{name} must lie in [0, T*k = {rows}), got values in [{lo}, {hi}]")
    if not consistent:
        raise ValueError("inverse must be the inverse permutation of permutation (permutation[inverse[a]] == a "
                         "for every copy a), as moe_permute returns them")


def check_grouped_matmul(x: Arr, w: Arr, group_sizes: Arr, transpose_w: bool, impl: str,
                         name: str = "group_sizes") -> None:
    """``grouped_matmul``: ``x [M, K]``, ``w [E, K, N]`` (``[E, N, K]``
    transposed) of x's dtype and device, ``group_sizes`` (or ``offs``, the
    argument ``name``) integer ``[E]``."""
    _check_rows("x", x)
    if w.ndim != 3:
        raise ValueError(f"w must be a 3-D [E, K, N] array, got shape {list(w.shape)}")
    K = x.shape[1]
    if (w.shape[2] if transpose_w else w.shape[1]) != K:
        raise ValueError(f"w must be [E, K={K}, N]{' (transposed: [E, N, K])' if transpose_w else ''} "
                         f"to match x [M, {K}], got shape {list(w.shape)}")
    if w.dtype != x.dtype:
        raise TypeError(f"w has dtype {w.dtype} but x has {x.dtype}; they must match")
    check_device("w", w, "x", x)
    check_index_array(name, group_sizes, (w.shape[0],), "x", x)
    _check_kernel_dtype(impl, "x and w", x)


def check_group_sizes_values(sizes: Sequence[int], rows: int) -> None:
    """Every group size is non-negative and they sum to ``rows`` (M)."""
    sizes = [int(s) for s in sizes]
    if sizes and min(sizes) < 0:
        raise ValueError(f"group_sizes must be non-negative, got {sizes}")
    if sum(sizes) != rows:
        raise ValueError(f"group_sizes must sum to M = x.shape[0] = {rows}, got {sum(sizes)}")


def check_offs_values(offs: Sequence[int], rows: int) -> None:
    """``torch._grouped_mm``-style cumulative end offsets: non-negative,
    non-decreasing and ending at ``rows`` (M)."""
    offs = [int(o) for o in offs]
    if offs and offs[0] < 0:
        raise ValueError(f"offs must be non-negative end rows, got offs[0] = {offs[0]}")
    bad = [i for i in range(1, len(offs)) if offs[i] < offs[i - 1]]
    if bad:
        i = bad[0]
        raise ValueError(f"offs must be non-decreasing, got offs[{i - 1}] = {offs[i - 1]} > offs[{i}] = {offs[i]}")
    if (offs[-1] if offs else 0) != rows:
        raise ValueError(f"offs must end at M = x.shape[0] = {rows}, got offs[-1] = {offs[-1] if offs else None}")


def check_mlp(x: Arr, router_logits: Arr, w_gate_up: Arr, w_down: Arr, impl: str) -> None:
    """``moe_mlp``: ``x [T, d]``, ``router_logits [T, E]``, ``w_gate_up [E, d,
    2f]`` and ``w_down [E, f, d]`` in x's dtype, all on x's device (the
    routing arguments are ``check_route``'s)."""
    _check_rows("x", x)
    if w_gate_up.ndim != 3 or w_down.ndim != 3:
        raise ValueError(f"w_gate_up must be [E, d, 2f] and w_down [E, f, d], got shapes {list(w_gate_up.shape)} "
                         f"and {list(w_down.shape)}")
    T, d = x.shape
    E, f = w_down.shape[0], w_down.shape[1]
    if w_gate_up.shape != (E, d, 2 * f):
        raise ValueError(f"w_gate_up must be [E={E}, d={d}, 2f={2 * f}] to match x [T, {d}] and w_down "
                         f"{list(w_down.shape)}, got {list(w_gate_up.shape)}")
    if w_down.shape != (E, f, d):
        raise ValueError(f"w_down must be [E, f, d={d}], got {list(w_down.shape)}")
    if router_logits.shape != (T, E):
        raise ValueError(f"router_logits must be [T={T}, E={E}], got shape {list(router_logits.shape)}")
    for name, a in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if a.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {a.dtype} but x has {x.dtype}; they must match")
    for name, a in (("router_logits", router_logits), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        check_device(name, a, "x", x)
    _check_kernel_dtype(impl, "x and the weights", x)
