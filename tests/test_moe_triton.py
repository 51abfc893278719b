"""Triton MoE kernels, launcher level: run under the Triton interpreter with
small tiles (many full and partial tiles at tiny sizes) against float64
oracles, outputs poisoned with NaN first; and compiled ahead of time for
Hopper (sm_90) at every configuration they ship with."""
from __future__ import annotations


import numpy as np
import pytest

from compile_checks import compile_in_clean_process
import torch
import triton

import moe_oracle as O
from compile_checks import HOPPER_SMEM_LIMIT
from kernels.moe import reference as R
from kernels.moe import triton_gmm as TG
from kernels.moe import triton_permute as TP
from kernels.moe import triton_route as TR

SMALL_GMM = TG.GmmBlockSizes(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)
SMALL_TGMM = TG.TgmmBlockSizes(block_k=16, block_n=16, block_m=16, num_warps=4, num_stages=1)
SMALL_ROWS = TP.RowBlockSizes(block_rows=4, block_d=16)
SMALL_ROUTE = TR.RouteBlockSizes(tile_elems=64)


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


# ----------------------------------------------------------------------------- grouped matmul


F32, BF16 = torch.float32, torch.bfloat16
GMM_CASES = [  # (E, M, K, N, kind, dtype): M, K, N never multiples of 16; K spans several K tiles
    (1, 37, 45, 29, "random", F32), (1, 37, 45, 29, "random", BF16),
    (8, 83, 50, 33, "random", F32), (8, 83, 50, 33, "random", BF16),
    (8, 61, 19, 40, "one", F32), (8, 61, 19, 40, "one", BF16),
    (64, 45, 33, 18, "sparse", BF16),
]


@pytest.mark.parametrize("E,M,K,N,kind,dtype", GMM_CASES)
def test_gmm_forward_dx_dw(E, M, K, N, kind, dtype):
    gen = np.random.default_rng(E * 1000 + M)
    gs = O.random_group_sizes(gen, M, E, kind)
    x = torch.randn(M, K).to(dtype)
    w = (torch.randn(E, K, N) / K ** 0.5).to(dtype)
    dy = torch.randn(M, N).to(dtype)
    budget = O.BUDGET[dtype]

    out = TG.gmm(x, w, gs, block_sizes=SMALL_GMM, out=_nan(M, N, dtype=dtype))
    O.assert_rel(out, O.grouped_matmul(x, w, gs), budget, "gmm forward")
    # dx = dy @ w[e]^T through the transposed-stride variant (no copy of w)
    dx = TG.gmm(dy, w, gs, transpose_w=True, block_sizes=SMALL_GMM, out=_nan(M, K, dtype=dtype))
    O.assert_rel(dx, O.grouped_matmul(dy, w, gs, transpose_w=True), budget, "gmm dx")
    dw = TG.tgmm(x, dy, gs, block_sizes=SMALL_TGMM, out=_nan(E, K, N, dtype=dtype))
    O.assert_rel(dw, O.grouped_matmul_dw(x, dy, gs), budget, "tgmm dw")
    empty = (gs == 0).nonzero().flatten()
    assert (dw[empty] == 0).all(), "empty groups must get a zero weight gradient"


def test_gmm_default_blocks_and_strided_inputs():
    """Shipped tiles (one partial tile per expert) and a non-contiguous x / w."""
    E, M, K, N = 8, 150, 70, 90
    gs = O.random_group_sizes(np.random.default_rng(3), M, E)
    x = torch.randn(K, M).T                                   # strided x
    w = (torch.randn(E, N, K) / 9).transpose(1, 2)            # strided w [E, K, N]
    out = TG.gmm(x, w, gs, out=_nan(M, N, dtype=torch.float32))
    O.assert_rel(out, O.grouped_matmul(x, w, gs), 1e-4, "gmm default blocks")
    dw = TG.tgmm(x, out, gs, out=_nan(E, K, N, dtype=torch.float32))
    O.assert_rel(dw, O.grouped_matmul_dw(x, out, gs), 1e-4, "tgmm default blocks")


def test_tile_schedule():
    gs = torch.tensor([0, 5, 16, 0, 17, 1], dtype=torch.int32)
    sched = TG.tile_schedule(gs, int(gs.sum()), 16)
    real = sched[:, sched[0] >= 0].T.tolist()
    assert real == [[1, 0, 5], [2, 5, 21], [4, 21, 38], [4, 37, 38], [5, 38, 39]]  # end = group end
    assert sched.shape[1] == triton.cdiv(39, 16) + 6 and (sched[0, len(real):] == -1).all()


# ----------------------------------------------------------------------------- route


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("E,k", [(1, 1), (8, 2), (8, 8), (64, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_forward_backward(E, k, score, renormalize):
    T = 19
    logits = torch.randn(T, E) * 2
    bias = torch.randn(E) * 0.05 if score == "sigmoid" else None
    w, ids, lse, lb, z = TR.route_forward(logits, k, score, bias, renormalize, block_sizes=SMALL_ROUTE)
    l64 = logits.double().requires_grad_()
    ow, oids, olb, oz = O.route(l64, k, score, bias, renormalize)
    assert torch.equal(ids.long(), oids)
    O.assert_rel(w, ow.detach(), 1e-5, "weights")
    O.assert_rel(lse, torch.logsumexp(l64, -1).detach(), 1e-5, "lse")
    O.assert_rel(lb, olb.detach(), 1e-5, "load balance loss")
    O.assert_rel(z, oz.detach(), 1e-5, "z loss")

    gw, glb, gz = torch.randn(T, k), torch.tensor(0.7), torch.tensor(-1.3)
    dl = TR.route_backward(logits, ids, lse, score, renormalize, gw, glb, gz, block_sizes=SMALL_ROUTE)
    (odl,) = torch.autograd.grad((ow, olb, oz), (l64,), (gw.double(), glb.double(), gz.double()))
    O.assert_rel(dl, odl, 1e-4, "d logits")


def test_route_bf16_logits():
    T, E, k = 9, 64, 8
    # distinct logits in bf16 (no ties), spread over [-1.6, 1.6]
    logits = (torch.argsort(torch.rand(T, E), 1).float() * 0.05 - 1.6).to(torch.bfloat16)
    w, ids, lse, lb, z = TR.route_forward(logits, k, "softmax", None, True, block_sizes=SMALL_ROUTE)
    l64 = logits.double().requires_grad_()
    ow, oids, olb, oz = O.route(l64, k)
    assert torch.equal(ids.long(), oids)
    O.assert_rel(w, ow.detach(), 1e-5, "weights")
    gw = torch.randn(T, k)
    dl = TR.route_backward(logits, ids, lse, "softmax", True, gw, torch.tensor(1.0), torch.tensor(1.0),
                           block_sizes=SMALL_ROUTE)
    assert dl.dtype == torch.bfloat16
    (odl,) = torch.autograd.grad((ow, olb, oz), (l64,), (gw.double(), torch.tensor(1.0).double(),
                                                          torch.tensor(1.0).double()))
    O.assert_rel(dl, odl, 1e-2, "d logits (bf16)")


# ----------------------------------------------------------------------------- permute / combine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,k", [(1, 1), (8, 2), (64, 8)])
def test_permute_combine(E, k, dtype):
    T, D = 11, 37
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)
    x = torch.randn(T, D).to(dtype)
    gs, perm, inv = R.permute_indices(ids, E)
    # oracle: stable order of (expert, token, slot)
    order = sorted(range(T * k), key=lambda a: (int(ids.view(-1)[a]), a))
    assert perm.tolist() == order
    assert torch.equal(inv[perm.long()], torch.arange(T * k, dtype=torch.int32))
    assert gs.tolist() == [int((ids == e).sum()) for e in range(E)]

    xs = TP.gather_rows(x, perm, k, block_sizes=SMALL_ROWS, out=_nan(T * k, D, dtype=dtype))
    assert torch.equal(xs, x[torch.tensor(order) // k])

    y = torch.randn(T * k, D).to(dtype)
    wts = torch.rand(T, k)
    out = TP.combine(y, wts, inv, k, block_sizes=SMALL_ROWS, out=_nan(T, D, dtype=dtype))
    exp = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            exp[t] += wts[t, j].double() * y[order.index(t * k + j)].double()
    O.assert_rel(out, exp, O.BUDGET[dtype], "combine")
    # unweighted combine = backward of the permutation
    back = TP.combine(y, None, inv, k, block_sizes=SMALL_ROWS, out=_nan(T, D, dtype=dtype))
    exp1 = torch.stack([sum(y[order.index(t * k + j)].double() for j in range(k)) for t in range(T)])
    O.assert_rel(back, exp1, O.BUDGET[dtype], "permute backward")

    g = torch.randn(T, D).to(dtype)
    dy, dw = TP.unpermute_backward(g, y, wts, perm, block_sizes=SMALL_ROWS)
    y64 = y.double().requires_grad_()
    w64 = wts.double().requires_grad_()
    o64 = torch.stack([sum(w64[t, j] * y64[order.index(t * k + j)] for j in range(k)) for t in range(T)])
    ody, odw = torch.autograd.grad(o64, (y64, w64), g.double())
    O.assert_rel(dy, ody, O.BUDGET[dtype], "unpermute dy")
    O.assert_rel(dw, odw, 1e-4 if dtype == torch.float32 else 1e-2, "unpermute dweights")


# ----------------------------------------------------------------------------- AOT for Hopper


@pytest.fixture(scope="module")
def hopper_builds():
    """Every shipped configuration compiled for sm_90 by ``moe_aot.build_all``
    in a clean child process (see ``compile_in_clean_process``)."""
    return compile_in_clean_process("moe_aot", "build_all")


def test_every_kernel_compiles_for_hopper(hopper_builds):
    import moe_aot

    expected = moe_aot.config_names()
    assert sorted(hopper_builds) == sorted(expected)
    for name, b in hopper_builds.items():
        assert b["sm_90"], name
        assert b["shared"] <= HOPPER_SMEM_LIMIT, f"{name}: {b['shared']} B of shared memory"
        if b["matrix"]:
            assert b["wgmma"], f"{name}: no wgmma in the PTX"


def test_grouped_gemm_is_pipelined_at_run_time_alignment(hopper_builds):
    """With the run-time specialisation (16-byte-aligned pointers and strides),
    the shipped bf16/fp16 GEMM tiles are multi-buffered: shared memory holds
    ``num_stages`` copies of the A and B tiles (minus at most one stage)."""
    bs = TG.DEFAULT_GMM_BLOCKS
    tile_bytes = (bs.block_m + bs.block_n) * bs.block_k * 2
    for name, b in hopper_builds.items():
        if name.startswith("gmm") and "aligned" in name and "fp32" not in name:
            assert b["shared"] >= (bs.num_stages - 1) * tile_bytes, (name, b["shared"])


def test_bf16_stores_round_to_nearest_even():
    """The kernels' bf16 stores round like the GPU (and torch) even under the
    interpreter, whose own cast truncates (``triton_gmm.cpu_interpreter``)."""
    x = torch.randn(4096)
    out = torch.empty(4096, 1, dtype=torch.bfloat16)
    TP.combine(x[:, None], None, torch.arange(4096, dtype=torch.int32), 1, out=out)
    assert torch.equal(out[:, 0], x.bfloat16())


def test_block_size_validation():
    with pytest.raises(ValueError, match="block_m"):
        TG.GmmBlockSizes(block_m=96)
    with pytest.raises(ValueError, match="num_stages"):
        TG.TgmmBlockSizes(num_stages=0)
    with pytest.raises(ValueError, match="block_d"):
        TP.RowBlockSizes(block_d=100)
    with pytest.raises(ValueError, match="tile_elems"):
        TR.RouteBlockSizes(tile_elems=3)
