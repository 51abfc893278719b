"""JAX MoE ops: the Pallas TPU gmm/tgmm in TPU interpret mode and their
custom_vjp against float64 per-expert loops (odd shapes, empty groups, all
rows on one group), the jnp reference, ``jax.jit`` + ``jax.grad`` of the
layer, and bad input (TPU lowering: test_aot.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import moe_oracle as O
import numpy as np
import pytest
import torch

import plum_kernels.jax as KJ
from plum_kernels.moe import pallas_gmm as P

SMALL = P.GmmTiles(tm=16, tk=128, tn=128)


def _t(a):
    return torch.from_numpy(np.asarray(jnp.asarray(a, jnp.float32)).astype(np.float64))


@pytest.mark.parametrize("E,M,K,N,kind,dtype", [
    (1, 37, 45, 29, "random", jnp.float32),
    (8, 45, 200, 150, "random", jnp.bfloat16),     # 2 K tiles and 2 N tiles, partial
    (8, 29, 130, 40, "one", jnp.float32),
    (64, 30, 33, 18, "sparse", jnp.bfloat16),
])
def test_pallas_grouped_matmul_and_vjp(E, M, K, N, kind, dtype):
    gen = np.random.default_rng(E + M)
    gs = O.random_group_sizes(gen, M, E, kind)
    x = gen.standard_normal((M, K)).astype(np.float32)
    w = (gen.standard_normal((E, K, N)) / np.sqrt(K)).astype(np.float32)
    cot = gen.standard_normal((M, N))
    xj, wj = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    gsj = jnp.asarray(gs.numpy())
    budget = 1e-4 if dtype == jnp.float32 else 1e-2

    def loss(x_, w_):
        out = KJ.grouped_matmul(x_, w_, gsj, impl="pallas", interpret=True, tiles=SMALL)
        return jnp.sum(out.astype(jnp.float32) * jnp.asarray(cot, jnp.float32)), out

    (_, out), (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(xj, wj)
    x64 = _t(xj).requires_grad_()
    w64 = _t(wj).requires_grad_()
    exp = O.grouped_matmul(x64, w64, gs)
    ex, ew = torch.autograd.grad((exp * torch.from_numpy(cot)).sum(), (x64, w64))
    assert out.dtype == dtype and dw.dtype == dtype
    O.assert_rel(_t(out), exp.detach(), budget, "gmm")
    O.assert_rel(_t(dx), ex, budget, "gmm dx (transposed rhs)")
    O.assert_rel(_t(dw), ew, budget, "tgmm dw")
    assert bool(jnp.all(dw[np.asarray(gs) == 0] == 0))


def test_reference_and_pallas_moe_mlp_jit_grad():
    T, d, f, E, k = 12, 40, 24, 8, 2
    gen = np.random.default_rng(0)
    x = jnp.asarray(gen.standard_normal((T, d)), jnp.float32)
    logits = jnp.asarray(gen.standard_normal((T, E)) * 1.5, jnp.float32)
    wg = jnp.asarray(gen.standard_normal((E, d, 2 * f)) / np.sqrt(d), jnp.float32)
    wd = jnp.asarray(gen.standard_normal((E, f, d)) / np.sqrt(f), jnp.float32)
    cot = gen.standard_normal((T, d))

    leaves = [_t(a).requires_grad_() for a in (x, logits, wg, wd)]
    w, ids, lb, z = O.route(leaves[1], k)
    out = O.moe_mlp(leaves[0], w, ids, leaves[2], leaves[3])
    o_grads = torch.autograd.grad((out * torch.from_numpy(cot)).sum() + 0.3 * lb + 0.2 * z, leaves)

    for impl in ("reference", "pallas"):
        @jax.jit
        def loss(x_, l_, wg_, wd_):
            r = KJ.moe_mlp(x_, l_, wg_, wd_, k, impl=impl, interpret=True, tiles=SMALL)
            return jnp.sum(r.out * jnp.asarray(cot, jnp.float32)) + 0.3 * r.load_balance_loss + 0.2 * r.z_loss, r

        (_, r), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, logits, wg, wd)
        O.assert_rel(_t(r.out), out.detach(), 1e-4, f"{impl} out")
        O.assert_rel(_t(r.load_balance_loss), lb.detach(), 1e-5, f"{impl} load balance")
        O.assert_rel(_t(r.z_loss), z.detach(), 1e-5, f"{impl} z loss")
        for name, a, b in zip(["dx", "dlogits", "dw_gate_up", "dw_down"], grads, o_grads):
            O.assert_rel(_t(a), b, 1e-4, f"{impl} {name}")


@pytest.mark.parametrize("score,renormalize", [("softmax", True), ("sigmoid", False)])
def test_route_and_permute_reference(score, renormalize):
    T, E, k, d = 10, 64, 8, 7
    gen = np.random.default_rng(1)
    logits = gen.standard_normal((T, E)).astype(np.float32)
    bias = (gen.standard_normal(E) * 0.05).astype(np.float32) if score == "sigmoid" else None
    r = KJ.moe_route(jnp.asarray(logits), k, score=score, bias=None if bias is None else jnp.asarray(bias),
                     renormalize=renormalize)
    ow, oids, olb, oz = O.route(torch.from_numpy(logits).double(), k, score,
                                None if bias is None else torch.from_numpy(bias), renormalize)
    assert np.array_equal(np.asarray(r.expert_ids), oids.numpy())
    O.assert_rel(_t(r.weights), ow, 1e-5, "weights")
    O.assert_rel(_t(r.load_balance_loss), olb, 1e-5, "load balance")
    x = jnp.asarray(gen.standard_normal((T, d)), jnp.float32)
    xs, gs, perm, inv = KJ.moe_permute(x, r.expert_ids, E)
    ids = np.asarray(r.expert_ids).reshape(-1)
    order = sorted(range(T * k), key=lambda a: (ids[a], a))
    assert np.asarray(perm).tolist() == order
    assert np.array_equal(np.asarray(gs), np.bincount(ids, minlength=E))
    np.testing.assert_array_equal(np.asarray(xs), np.asarray(x)[np.array(order) // k])
    back = KJ.moe_unpermute(xs, jnp.ones((T, k)), perm, inv)
    O.assert_rel(_t(back), _t(x) * k, 1e-6, "unpermute")


def test_bad_inputs():
    x = jnp.zeros((6, 8))
    with pytest.raises(ValueError, match="top_k"):
        KJ.moe_route(jnp.ones((4, 3)), 4)
    with pytest.raises(ValueError, match="score"):
        KJ.moe_route(jnp.ones((4, 3)), 2, score="tanh")
    with pytest.raises(ValueError, match="K=8"):
        KJ.grouped_matmul(x, jnp.zeros((2, 7, 3)), jnp.array([6, 0]))
    with pytest.raises(TypeError, match="dtype"):
        KJ.grouped_matmul(x, jnp.zeros((2, 8, 3), jnp.bfloat16), jnp.array([6, 0]))
    with pytest.raises(TypeError, match="group_sizes"):
        KJ.grouped_matmul(x, jnp.zeros((2, 8, 3)), jnp.array([6.0, 0.0]))
    with pytest.raises(ValueError, match="impl"):
        KJ.grouped_matmul(x, jnp.zeros((2, 8, 3)), jnp.array([6, 0]), impl="triton")
    with pytest.raises(ValueError, match="w_gate_up"):
        KJ.moe_mlp(x, jnp.zeros((6, 2)), jnp.zeros((2, 8, 5)), jnp.zeros((2, 3, 8)), 1)
    with pytest.raises(ValueError, match="tm"):
        P.GmmTiles(tm=12)
    with pytest.raises(ValueError, match="tn"):
        P.GmmTiles(tn=100)




def test_jit_defines_the_result_of_values_that_eager_calls_refuse():
    """Traced ids, indices and group sizes cannot raise (eager calls do: tests/kernels/test_checks_parity.py):
    an expert id outside [0, E) belongs to no group (7 and -1 with E = 4 are not counted, -1 does not wrap to
    expert 3), an out-of-range ``inverse`` entry makes its token NaN, and the Pallas gmm clamps its row
    ranges into [0, M) for sizes that are negative or sum past M."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8)), jnp.float32)
    ids = jnp.asarray([[0, 7], [3, -1], [3, 1], [2, 0]], jnp.int32)
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, 4\)"):
        KJ.moe_permute(x, ids, 4)
    xs, gs, perm, inv = jax.jit(lambda i: KJ.moe_permute(x, i, 4))(ids)
    assert np.asarray(gs).tolist() == [2, 1, 1, 2] and xs.shape == (8, 8)
    bad_inv = jnp.asarray(np.array([0, 1, 2, 3, 4, 5, 6, 99], np.int32))
    out = np.asarray(jax.jit(lambda i: KJ.moe_unpermute(xs, jnp.ones((4, 2)), perm, i))(bad_inv))
    assert np.isnan(out[3]).all() and np.isfinite(out[:3]).all()
    w = jnp.ones((2, 8, 128), jnp.float32)
    for sizes in ([3, 9], [-5, 2], [0, 0]):
        y = jax.jit(lambda s: KJ.grouped_matmul(x, w, s, impl="pallas", interpret=True, tiles=SMALL))(
            jnp.asarray(sizes, jnp.int32))
        assert y.shape == (4, 128)
