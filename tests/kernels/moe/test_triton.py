"""Triton MoE kernels, launcher level: run under the Triton interpreter with
small tiles (many full and partial tiles at tiny sizes) and with every shipped
tile configuration against float64 oracles, outputs poisoned with NaN first;
the autotuning path itself run on the CPU; and every shipped configuration
compiled ahead of time for Hopper (sm_90) from a recorded launch
(``tests/support/moe_aot.py``)."""
from __future__ import annotations

import moe_aot
import moe_oracle as O
import numpy as np
import pytest
import torch
import triton

from plum_kernels.moe import reference as R
from plum_kernels.moe import triton_gmm as TG
from plum_kernels.moe import triton_permute as TP
from plum_kernels.moe import triton_route as TR

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
    real = sched[sched[:, 0] >= 0].tolist()
    assert real == [[1, 0, 5], [2, 5, 21], [4, 21, 38], [4, 37, 38], [5, 38, 39]]  # end = group end
    assert sched.shape == (triton.cdiv(39, 16) + 6, 3) and (sched[len(real):, 0] == -1).all()
    # refilled in place for a larger block, in a buffer sized for the smallest
    buf = torch.full((TG.num_tiles(39, 6, 16), 3), 7, dtype=torch.int32)
    TG.tile_schedule(gs, 39, 32, out=buf)
    n = TG.num_tiles(39, 6, 32)
    assert buf[:n][buf[:n, 0] >= 0].tolist() == [[1, 0, 5], [2, 5, 21], [4, 21, 38], [5, 38, 39]]
    assert (buf[:n][len(real) - 1:, 0] == -1).all() and (buf[n:] == 7).all()


def _gmm_case(E, M, K, N, dtype, seed):
    """Random inputs with empty groups (the first and one in the middle)."""
    gen = np.random.default_rng(seed)
    gs = O.random_group_sizes(gen, M, E)
    gs[0], gs[E // 2] = 0, 0
    gs[1] += M - int(gs.sum())
    x = torch.randn(M, K).to(dtype)
    w = (torch.randn(E, K, N) / K ** 0.5).to(dtype)
    return gs, x, w, torch.randn(M, N).to(dtype)


def _check_gmm(gs, x, w, dy, out, dx, dw, what):
    budget = O.BUDGET[x.dtype]
    O.assert_rel(out, O.grouped_matmul(x, w, gs), budget, f"{what} forward")
    O.assert_rel(dx, O.grouped_matmul(dy, w, gs, transpose_w=True), budget, f"{what} dx")
    O.assert_rel(dw, O.grouped_matmul_dw(x, dy, gs), budget, f"{what} dw")
    assert (dw[(gs == 0).nonzero().flatten()] == 0).all(), "empty groups must get a zero weight gradient"


# M, K, N multiples of no tile; K and N span several tiles of the largest config
SPACE_SHAPE = dict(E=5, M=203, K=150, N=270)


@pytest.mark.parametrize("dtype,i", [(torch.bfloat16, i) for i in range(len(TG.GMM_SPACES[2]))]
                         + [(torch.float32, 0)])
def test_every_gmm_config_forced(dtype, i):
    """Each entry of the forward / dx space (and the fp32 default), forced."""
    E, M, K, N = SPACE_SHAPE.values()
    gs, x, w, dy = _gmm_case(E, M, K, N, dtype, seed=i)
    cfg = TG.gmm_space(dtype)[i]
    out = TG.gmm(x, w, gs, block_sizes=cfg, out=_nan(M, N, dtype=dtype))
    dx = TG.gmm(dy, w, gs, transpose_w=True, block_sizes=cfg, out=_nan(M, K, dtype=dtype))
    dw = TG.tgmm(x, dy, gs, block_sizes=TG.TgmmBlockSizes(), out=_nan(E, K, N, dtype=dtype))
    _check_gmm(gs, x, w, dy, out, dx, dw, str(cfg))


@pytest.mark.parametrize("dtype,i", [(torch.bfloat16, i) for i in range(len(TG.TGMM_SPACES[2]))]
                         + [(torch.float32, 0)])
def test_every_tgmm_config_forced(dtype, i):
    """Each entry of the weight-gradient space (and the fp32 default), forced."""
    E, M, K, N = SPACE_SHAPE.values()
    gs, x, w, dy = _gmm_case(E, M, K, N, dtype, seed=10 + i)
    cfg = TG.tgmm_space(dtype)[i]
    dw = TG.tgmm(x, dy, gs, block_sizes=cfg, out=_nan(E, K, N, dtype=dtype))
    O.assert_rel(dw, O.grouped_matmul_dw(x, dy, gs), O.BUDGET[dtype], f"{cfg} dw")
    assert (dw[(gs == 0).nonzero().flatten()] == 0).all(), "empty groups must get a zero weight gradient"


def test_autotune_path_refills_the_schedule_per_config(last_config_wins):
    """The GPU path (``triton.autotune`` over each 16-bit space, the tile
    schedule refilled for each config's BLOCK_M by a pre-hook into a buffer
    sized for the smallest), run through the interpreter with a fake timer that
    makes the last config of each space win: the results still match float64
    and ``chosen_configs`` reports the winners, one per tuning key."""
    E, M, K, N = 4, 150, 72, 136
    gs, x, w, dy = _gmm_case(E, M, K, N, torch.bfloat16, seed=5)
    out = TG.gmm(x, w, gs, out=_nan(M, N, dtype=x.dtype))
    dx = TG.gmm(dy, w, gs, transpose_w=True, out=_nan(M, K, dtype=x.dtype))
    dw = TG.tgmm(x, dy, gs, out=_nan(E, K, N, dtype=x.dtype))
    _check_gmm(gs, x, w, dy, out, dx, dw, "autotuned")
    # a second batch of a slightly different M falls in the same bucket: no new tuning
    gs2, x2, w2, _ = _gmm_case(E, M - 9, K, N, torch.bfloat16, seed=6)
    out2 = TG.gmm(x2, w, gs2, out=_nan(M - 9, N, dtype=x.dtype))
    O.assert_rel(out2, O.grouped_matmul(x2, w, gs2), O.BUDGET[x.dtype], "autotuned, cached key")

    chosen = last_config_wins.chosen_configs()
    assert set(chosen) == {"moe_gmm", "moe_tgmm"}
    assert len(chosen["moe_gmm"]) == 2 and len(chosen["moe_tgmm"]) == 1, chosen   # plain + transposed; dw
    for name, space in (("moe_gmm", TG.GMM_SPACES[2]), ("moe_tgmm", TG.TGMM_SPACES[2])):
        last = space[-1]
        for cfg in chosen[name].values():
            for k, v in last.meta().items():
                assert f"{k}: {v}," in cfg, (name, cfg)
            assert f"num_warps: {last.num_warps}" in cfg and f"num_stages: {last.num_stages}" in cfg, (name, cfg)


def test_gmm_spaces():
    """The interpreter and ``set_autotune(False)`` run a space's first entry:
    each space is non-empty and its entries distinct; 16-bit inputs are tuned,
    fp32 runs its default; every BLOCK_M is >= 64 (wgmma rows)."""
    for spaces in (TG.GMM_SPACES, TG.TGMM_SPACES):
        assert set(spaces) == {2, 4}
        for esize, space in spaces.items():
            assert space and len(set(space)) == len(space), esize
            assert (len(space) > 1) == (esize == 2), esize
    assert all(c.block_m >= 64 for c in TG.GMM_SPACES[2])
    assert all(c.block_k >= 64 for c in TG.TGMM_SPACES[2])
    assert TG.DEFAULT_GMM_BLOCKS == TG.GMM_SPACES[2][0] and TG.DEFAULT_TGMM_BLOCKS == TG.TGMM_SPACES[2][0]
    assert TG.GmmBlockSizes() == TG.GMM_SPACES[2][0] and TG.TgmmBlockSizes() == TG.TGMM_SPACES[2][0]
    assert TG.gmm_space(torch.float16) == TG.gmm_space(torch.bfloat16)
    assert [TG.tune_bucket(m) for m in (1, 150, 141, 256, 257)] == [1, 256, 256, 256, 512]


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


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_route_default_tiles_at_256_experts(score):
    """The shipped tile at E = 256 (8 tokens x 256 experts, 4 warps), forward
    and backward, against float64; T not a multiple of the token block."""
    T, E, k = 21, 256, 8
    logits = torch.randn(T, E) * 2
    bias = torch.randn(E) * 0.05 if score == "sigmoid" else None
    assert (TR.DEFAULT_ROUTE_BLOCKS.block_t(E), TR.DEFAULT_ROUTE_BLOCKS.num_warps(E)) == (8, 4)
    w, ids, lse, lb, z = TR.route_forward(logits, k, score, bias, True)
    l64 = logits.double().requires_grad_()
    ow, oids, olb, oz = O.route(l64, k, score, bias, True)
    assert torch.equal(ids.long(), oids)
    O.assert_rel(w, ow.detach(), 1e-5, "weights")
    O.assert_rel(lb, olb.detach(), 1e-5, "load balance loss")
    O.assert_rel(z, oz.detach(), 1e-5, "z loss")
    gw, glb, gz = torch.randn(T, k), torch.tensor(0.7), torch.tensor(-1.3)
    dl = TR.route_backward(logits, ids, lse, score, True, gw, glb, gz)
    (odl,) = torch.autograd.grad((ow, olb, oz), (l64,), (gw.double(), glb.double(), gz.double()))
    O.assert_rel(dl, odl, 1e-4, "d logits")


def test_route_tile_rule():
    """BLOCK_T x BLOCK_E holds at most 16 float32 values per thread at every E
    (the sm_90 builds of tests/support/moe_aot.py, one per tile up to E = 256, show no
    spills), and the AOT cases cover every tile the rule gives for E <= 256."""
    bs = TR.DEFAULT_ROUTE_BLOCKS
    tiles = {}
    for E in range(1, TR.MAX_EXPERTS + 1):
        bt, be, warps = bs.block_t(E), triton.next_power_of_2(E), bs.num_warps(E)
        assert 1 <= bt <= 128 and 4 <= warps <= 16 and bt * be <= 16 * 32 * warps, E
        if 8 <= E <= 256:
            tiles.setdefault((bt, be, warps), E)
    assert {(bs.block_t(E), triton.next_power_of_2(E), bs.num_warps(E)) for E, *_ in moe_aot.ROUTE_CASES} \
        == set(tiles)


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
    with pytest.raises(ValueError, match="values_per_thread"):
        TR.RouteBlockSizes(values_per_thread=0)
