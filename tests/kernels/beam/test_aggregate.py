"""trie_aggregate: torch reference (float64 and float32), Triton (interpreter on CPU), jnp reference and
Pallas (TPU interpret mode) against a float64 oracle built on the SIDTrie query API, on fresh random tries
with chains, collision groups, sparse item ids, and codebooks giving 33-, 60- (64-bit keys) and 67-bit
(128-bit keys) SIDs; the log-ratios along every root-to-leaf path sum to the smoothed log d(leaf); empty
subtrees give finite, very negative biases; NaN propagates; bad input raises the same error everywhere."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from aggregate_oracle import make_items, oracle_aggregate

import plum_kernels.torch as K
from plum_kernels.beam.checks import item_arrays

IMPLS = ["torch-reference64", "torch-reference", "torch-triton", "jax-reference", "jax-pallas"]


def aggregate(impl: str, trie, mass: np.ndarray, eps: float, items=None, validate: bool = True):
    """``(node_mass, edge_mass, edge_bias)`` as float64 numpy through ``impl``."""
    items = trie if items is None else items
    if impl.startswith("jax"):
        import plum_kernels.jax as KJ
        out = KJ.trie_aggregate(mass.astype(np.float32), trie.to_jax(), items, eps=eps, impl=impl.split("-")[1],
                                interpret=True)
    else:
        m = torch.from_numpy(mass.astype(np.float64 if impl.endswith("64") else np.float32))
        out = K.trie_aggregate(m, trie.to_torch(), items, eps=eps, impl=impl.split("-")[1].removesuffix("64"),
                               validate=validate)
    return tuple(np.asarray(t, dtype=np.float64) for t in out)


def _masses(rng, n_ids: int, zero_frac: float = 0.3) -> np.ndarray:
    mass = rng.random(n_ids) * rng.choice([1e-3, 1.0, 50.0], n_ids)
    mass[rng.random(n_ids) < zero_frac] = 0.0
    return mass


def _check(got, want, impl):
    rtol = 1e-12 if impl.endswith("64") else 2e-5
    for name, g, w in zip(("node_mass", "edge_mass"), got[:2], want[:2]):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * w.max(), err_msg=name)
    np.testing.assert_allclose(got[2], want[2], rtol=0, atol=rtol * 10 * max(1.0, np.abs(want[2]).max()),
                               err_msg="edge_bias")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind,sparse_ids", [("small", False), ("plum", True), ("wide128", False)])
def test_aggregate_matches_float64_oracle(impl, kind, sparse_ids):
    rng = np.random.default_rng(len(kind) + 7 * sparse_ids)
    trie, codes, ids = make_items(kind, rng, sparse_ids=sparse_ids)
    N = int(ids.max()) + 1 + 5                            # ids no SID holds are ignored
    mass = _masses(rng, N)
    eps = 1e-6
    node_mass, edge_mass, bias, paths = oracle_aggregate(trie, codes, ids, mass, eps)
    got = aggregate(impl, trie, mass, eps)
    assert [g.shape for g in got] == [(trie.num_internal,), (trie.num_edges,), (trie.num_edges,)]
    _check(got, (node_mass, edge_mass, bias), impl)
    np.testing.assert_allclose(got[0][0], mass[ids].sum(), rtol=1e-5)   # the root holds the whole mass
    # the log-ratios telescope: their sum along each SID's path is its smoothed log d(leaf)
    tol = 1e-12 if impl.endswith("64") else 5e-5
    for sid, (edges, log_d) in paths.items():
        assert abs(got[2][edges].sum() - log_d) <= tol * max(1.0, abs(log_d)) * trie.num_levels, sid


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_subtrees_give_finite_very_negative_bias(impl):
    rng = np.random.default_rng(3)
    trie, codes, ids = make_items("small", rng, n=60)
    mass = np.zeros(len(ids))
    mass[ids[codes[:, 0] == codes[0, 0]]] = 1.0          # only the subtree below codes[0, 0] has mass
    eps = 1e-9
    node_mass, edge_mass, bias, _ = oracle_aggregate(trie, codes, ids, mass, eps)
    got = aggregate(impl, trie, mass, eps)
    assert np.isfinite(got[2]).all()
    parent = np.repeat(np.arange(trie.num_internal), np.diff(trie.child_ptr))
    empty = (edge_mass == 0) & (node_mass[parent] > 0)     # the first empty edge below a node with mass
    assert empty.any() and (got[2][empty] < -15).all()
    inside = (edge_mass == 0) & (node_mass[parent] == 0)   # below it: uniform over the SIDs, log(k / k')
    assert inside.any() and (got[2][inside] > -np.log(trie.num_edges)).all()
    _check(got, (node_mass, edge_mass, bias), impl)
    all_zero = aggregate(impl, trie, np.zeros(len(ids)), eps)            # no mass at all: uniform over SIDs
    assert np.isfinite(all_zero[2]).all() and (all_zero[0] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_nan_mass_reaches_the_root_and_its_path(impl):
    rng = np.random.default_rng(4)
    trie, codes, ids = make_items("small", rng, n=40)
    mass = _masses(rng, len(ids), 0.0)
    mass[5] = np.nan
    node_mass, edge_mass, bias, paths = oracle_aggregate(trie, codes, ids, mass, 1e-6)
    got = aggregate(impl, trie, mass, 1e-6)
    assert np.isnan(got[0][0])
    edges, _ = paths[tuple(codes[5].tolist())]
    assert np.isnan(got[1][edges]).all() and np.isnan(got[2][edges]).all()
    clean = np.isfinite(edge_mass)
    np.testing.assert_allclose(got[1][clean], edge_mass[clean], rtol=2e-5)


def test_item_arrays_may_be_device_tensors_and_validation_can_be_skipped():
    rng = np.random.default_rng(5)
    trie, codes, ids = make_items("small", rng, n=40)
    mass = _masses(rng, len(ids))
    items = SimpleNamespace(**{n: torch.from_numpy(np.asarray(getattr(trie, n))) for n in
                               ("edge_item", "dup_ptr", "dup_items")})
    want = aggregate("torch-reference", trie, mass, 1e-6)
    for impl in ("torch-reference", "torch-triton"):
        got = aggregate(impl, trie, mass, 1e-6, items=items, validate=False)
        _check(got, want, impl)


# ------------------------------------------------------------------ bad input: the same error everywhere

def _parity_trie():
    return make_items("small", np.random.default_rng(0), n=30)


def _bad_call(impl, case):
    trie, codes, ids = _parity_trie()
    mass = np.ones(len(ids), np.float32)
    items, eps, tr = trie, 1e-6, None
    if case == "rank":
        mass = np.ones((2, len(ids)), np.float32)
    elif case == "dtype":
        mass = mass.astype(np.float16)
    elif case == "short":
        mass = mass[:-3]
    elif case == "negative":
        mass[2] = -1.0
    elif case in ("eps0", "epsnan"):
        eps = 0.0 if case == "eps0" else float("nan")
    elif case == "no_items":
        items = SimpleNamespace(edge_item=trie.edge_item, dup_ptr=trie.dup_ptr)
    elif case == "edge_item_len":
        items = SimpleNamespace(edge_item=trie.edge_item[:-1], dup_ptr=trie.dup_ptr, dup_items=trie.dup_items)
    elif case == "other_framework":
        tr = trie.to_torch() if impl.startswith("jax") else trie.to_jax()
    if impl.startswith("jax"):
        import jax.numpy as jnp

        import plum_kernels.jax as KJ
        return KJ.trie_aggregate(jnp.asarray(mass), tr or trie.to_jax(), items, eps=eps, impl=impl.split("-")[1],
                                 interpret=True)
    return K.trie_aggregate(torch.from_numpy(mass), tr or trie.to_torch(), items, eps=eps, impl=impl.split("-")[1])


BAD = [("rank", ValueError, "item_mass"), ("dtype", TypeError, "item_mass"), ("short", ValueError, "item_mass"),
       ("negative", ValueError, "item_mass"), ("eps0", ValueError, "eps"), ("epsnan", ValueError, "eps"),
       ("no_items", TypeError, "items"), ("edge_item_len", ValueError, "items.edge_item")]


@pytest.mark.parametrize("case,exc,arg", BAD)
def test_bad_arguments_raise_the_same_error_in_every_implementation(case, exc, arg):
    messages = {}
    for impl in ("torch-reference", "torch-triton", "jax-reference", "jax-pallas"):
        with pytest.raises(exc) as info:
            _bad_call(impl, case)
        assert type(info.value) is exc and arg in str(info.value), (impl, info.value)
        messages[impl] = str(info.value)
    assert len(set(messages.values())) == 1, messages


@pytest.mark.parametrize("impl", ["torch-reference", "jax-reference"])
def test_a_trie_of_the_other_framework_is_refused(impl):
    with pytest.raises(TypeError, match="SIDTrie.to_"):
        _bad_call(impl, "other_framework")


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_opcheck(impl):
    rng = np.random.default_rng(11)
    trie, codes, ids = make_items("small", rng)
    tr = trie.to_torch()
    edge_item, dup_ptr, dup_items = (torch.as_tensor(np.asarray(a)) for a in item_arrays(trie))
    mass = torch.from_numpy(_masses(rng, int(ids.max()) + 3).astype(np.float32))
    args = (mass, tr.child_ptr, tr.edge_word, tr.level_ptr, edge_item, dup_ptr, dup_items, 1e-6, impl)
    torch.library.opcheck(torch.ops.plum_kernels.trie_aggregate.default, args)
