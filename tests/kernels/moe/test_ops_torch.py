"""PyTorch MoE ops (``plum_kernels.torch``): both implementations, outputs and
gradients against float64 per-expert loops; routings with empty experts and
with every token on one expert; bad input; ``torch.library.opcheck``;
``torch.compile(fullgraph=True)``."""
from __future__ import annotations

import moe_oracle as O
import numpy as np
import pytest
import torch

import plum_kernels.torch as K

IMPLS = ["reference", "triton"]


def _layer(T, d, E, f, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(dtype)
    logits = torch.randn(T, E, generator=g) * 1.5
    wg = (torch.randn(E, d, 2 * f, generator=g) / d ** 0.5).to(dtype)
    wd = (torch.randn(E, f, d, generator=g) / f ** 0.5).to(dtype)
    return x, logits, wg, wd


def _oracle_layer(x, logits, wg, wd, k, score="softmax", bias=None, renormalize=True):
    leaves = [t.detach().double().requires_grad_() for t in (x, logits, wg, wd)]
    w, ids, lb, z = O.route(leaves[1], k, score, bias, renormalize)
    out = O.moe_mlp(leaves[0], w, ids, leaves[2], leaves[3])
    return leaves, ids, out, lb, z


def _grads(outs, inputs, cot, c_lb=0.3, c_z=0.2):
    out, lb, z = outs
    loss = (out.double() * cot).sum() + c_lb * lb.double() + c_z * z.double()
    return torch.autograd.grad(loss, inputs)


MLP_CASES = [(1, 1, "softmax", torch.float32), (8, 2, "sigmoid", torch.float32), (8, 2, "sigmoid", torch.bfloat16),
             (8, 8, "softmax", torch.bfloat16)]


# E = 64 runs through the reference here; the Triton kernels meet E = 64 in
# tests/kernels/moe/test_triton.py (the interpreter runs one Python program per tile).
@pytest.mark.parametrize("impl,E,k,score,dtype", [(i, *c) for i in IMPLS for c in MLP_CASES]
                         + [("reference", 64, 8, "softmax", torch.bfloat16)])
def test_moe_mlp_matches_oracle(impl, dtype, E, k, score):
    T, d, f = (13, 24, 20) if E < 64 else (9, 20, 12)
    x, logits, wg, wd = _layer(T, d, E, f, dtype, seed=E + k)
    bias = torch.randn(E) * 0.1 if score == "sigmoid" else None
    leaves, ids, o_out, o_lb, o_z = _oracle_layer(x, logits, wg, wd, k, score, bias)
    cot = torch.randn(T, d, dtype=torch.float64)
    o_grads = _grads((o_out, o_lb, o_z), leaves, cot)

    def run(impl_, dt):
        ins = [t.detach().to(dt if i != 1 else torch.float32).requires_grad_()
               for i, t in enumerate((x, logits, wg, wd))]
        res = K.moe_mlp(ins[0], ins[1], ins[2], ins[3], k, score=score, bias=bias, impl=impl_)
        return res, _grads(res, ins, cot)

    res, grads = run(impl, dtype)
    assert res.out.dtype == dtype and res.out.shape == (T, d)
    if dtype == torch.float32:
        budgets = [1e-4] * 5
    else:  # 1e-2, or twice the error of the reference computed in bf16
        ref_res, ref_grads = run("reference", dtype)
        budgets = [max(1e-2, 2 * O.rel_err(a, b)) for a, b in zip([ref_res.out, *ref_grads], [o_out, *o_grads])]
    O.assert_rel(res.out, o_out.detach(), budgets[0], "out")
    O.assert_rel(res.load_balance_loss, o_lb.detach(), 1e-5, "load balance loss")
    O.assert_rel(res.z_loss, o_z.detach(), 1e-5, "z loss")
    for name, a, b, bud in zip(["dx", "dlogits", "dw_gate_up", "dw_down"], grads, o_grads, budgets[1:]):
        O.assert_rel(a, b, bud, name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["random", "one", "sparse"])
def test_grouped_matmul_op_and_grads(impl, kind):
    E, M, Kd, N = 8, 75, 70, 33      # odd M, K, N; K > one K tile of the shipped 64
    gs = O.random_group_sizes(np.random.default_rng(7), M, E, kind)
    x = torch.randn(M, Kd, dtype=torch.float32, requires_grad=True)
    w = (torch.randn(E, Kd, N) / 8).requires_grad_()
    out = K.grouped_matmul(x, w, gs, impl=impl)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exp = O.grouped_matmul(x64, w64, gs)
    O.assert_rel(out, exp.detach(), 1e-4, "forward")
    cot = torch.randn(M, N, dtype=torch.float64)
    dx, dw = torch.autograd.grad((out.double() * cot).sum(), (x, w))
    ex, ew = torch.autograd.grad((exp * cot).sum(), (x64, w64))
    O.assert_rel(dx, ex, 1e-4, "dx")
    O.assert_rel(dw, ew, 1e-4, "dw")
    assert (dw[gs == 0] == 0).all()
    # transposed weight: [E, N, K] used as w^T
    wt = w.detach().transpose(1, 2).contiguous().requires_grad_()
    out_t = K.grouped_matmul(x, wt, gs, transpose_w=True, impl=impl)
    O.assert_rel(out_t, exp.detach(), 1e-4, "forward, transposed w")
    (dwt,) = torch.autograd.grad((out_t.double() * cot).sum(), (wt,))
    O.assert_rel(dwt, ew.transpose(1, 2), 1e-4, "dw, transposed w")


@pytest.mark.parametrize("impl", IMPLS)
def test_route_permute_unpermute_ops(impl):
    T, E, k, d = 10, 8, 2, 19
    logits = torch.randn(T, E, requires_grad=True)
    r = K.moe_route(logits, k, impl=impl)
    l64 = logits.detach().double().requires_grad_()
    ow, oids, olb, oz = O.route(l64, k)
    assert torch.equal(r.expert_ids.long(), oids) and r.expert_ids.dtype == torch.int32
    O.assert_rel(r.weights, ow.detach(), 1e-5, "weights")
    gw = torch.randn(T, k)
    (dl,) = torch.autograd.grad((r.weights * gw).sum() + r.load_balance_loss + 2 * r.z_loss, logits)
    (odl,) = torch.autograd.grad((ow * gw.double()).sum() + olb + 2 * oz, l64)
    O.assert_rel(dl, odl, 1e-4, "dlogits")

    x = torch.randn(T, d, requires_grad=True)
    xs, gs, perm, inv = K.moe_permute(x, r.expert_ids, E, impl=impl)
    assert gs.tolist() == [int((r.expert_ids == e).sum()) for e in range(E)]
    assert torch.equal(xs, x.detach()[perm.long() // k])
    y = torch.randn(T * k, d, requires_grad=True)
    wts = torch.rand(T, k, requires_grad=True)
    out = K.moe_unpermute(y, wts, perm, inv, impl=impl)
    exp = torch.stack([sum(wts[t, j].double() * y[inv[t * k + j]].double() for j in range(k)) for t in range(T)])
    O.assert_rel(out, exp.detach(), 1e-5, "unpermute")
    cot = torch.randn(T, d)
    gy, gwt = torch.autograd.grad((out * cot).sum(), (y, wts))
    ey, ewt = torch.autograd.grad((exp * cot.double()).sum(), (y, wts))
    O.assert_rel(gy, ey, 1e-5, "unpermute dy")
    O.assert_rel(gwt, ewt, 1e-5, "unpermute dweights")
    (gx,) = torch.autograd.grad((xs * y.detach()).sum(), x)
    O.assert_rel(gx, torch.stack([y.detach()[inv[t * k:(t + 1) * k].long()].sum(0) for t in range(T)]), 1e-5,
                 "permute dx")


def test_bad_inputs():
    x, logits, wg, wd = _layer(6, 8, 4, 6, torch.float32)
    with pytest.raises(ValueError, match="top_k"):
        K.moe_route(logits, 5)
    with pytest.raises(ValueError, match="top_k"):
        K.moe_mlp(x, logits, wg, wd, 0)
    with pytest.raises(ValueError, match="score"):
        K.moe_route(logits, 2, score="relu")
    with pytest.raises(ValueError, match="bias"):
        K.moe_route(logits, 2, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="router_logits"):
        K.moe_route(logits[0], 2)
    with pytest.raises(ValueError, match="T >= 1"):
        K.moe_route(logits[:0], 2)
    gs = torch.tensor([2, 2, 1, 0], dtype=torch.int32)
    xm = torch.randn(6, 8)
    w = torch.randn(4, 8, 5)
    with pytest.raises(ValueError, match="sum to M"):
        K.grouped_matmul(xm, w, gs)
    with pytest.raises(ValueError, match="non-negative"):
        K.grouped_matmul(xm, w, torch.tensor([4, 3, -1, 0], dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype"):
        K.grouped_matmul(xm, w.double(), torch.tensor([6, 0, 0, 0]))
    with pytest.raises(TypeError, match="group_sizes"):
        K.grouped_matmul(xm, w, torch.tensor([6.0, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"group_sizes must be a \[4\]"):
        K.grouped_matmul(xm, w, torch.tensor([6, 0, 0]))
    with pytest.raises(ValueError, match="K=8"):
        K.grouped_matmul(xm, torch.randn(4, 7, 5), torch.tensor([6, 0, 0, 0]))
    with pytest.raises(ValueError, match="device"):
        K.grouped_matmul(xm, w.to("meta"), torch.tensor([6, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, 4\)"):
        K.moe_permute(x, torch.tensor([[0, 4]] * 6), 4)
    with pytest.raises(TypeError, match="expert_ids"):
        K.moe_permute(x, torch.zeros(6, 2), 4)
    with pytest.raises(ValueError, match="w_gate_up"):
        K.moe_mlp(x, logits, wg[:, :, :-1], wd, 2)
    with pytest.raises(TypeError, match="w_down"):
        K.moe_mlp(x, logits, wg, wd.double(), 2)
    with pytest.raises(ValueError, match="router_logits"):
        K.moe_mlp(x, logits[:, :3], wg, wd, 2)
    with pytest.raises(ValueError, match="impl"):
        K.moe_mlp(x, logits, wg, wd, 2, impl="cuda")
    with pytest.raises(TypeError, match="impl='triton'"):
        K.grouped_matmul(xm.double(), w.double(), torch.tensor([6, 0, 0, 0]), impl="triton")


def test_opcheck():
    T, E, k, d = 6, 4, 2, 8
    logits = torch.randn(T, E, requires_grad=True)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)
    gs = torch.bincount(ids.view(-1).long(), minlength=E).to(torch.int32)
    perm = torch.sort(ids.view(-1).long(), stable=True).indices.to(torch.int32)
    inv = torch.empty_like(perm).scatter_(0, perm.long(), torch.arange(T * k, dtype=torch.int32))
    x = torch.randn(T, d, requires_grad=True)
    xs = torch.randn(T * k, d, requires_grad=True)
    w = torch.randn(E, d, 5, requires_grad=True)
    wts = torch.rand(T, k, requires_grad=True)
    cases = [
        (torch.ops.plum_kernels.moe_route.default, (logits, k, "softmax", None, True, "reference")),
        (torch.ops.plum_kernels.moe_route.default, (logits, k, "sigmoid", torch.randn(E), False, "triton")),
        (torch.ops.plum_kernels.moe_permute.default, (x, ids, E, "reference")),
        (torch.ops.plum_kernels.moe_unpermute.default, (xs, wts, perm, inv, "reference")),
        (torch.ops.plum_kernels.moe_unpermute.default, (xs, wts, perm, inv, "triton")),
        (torch.ops.plum_kernels.grouped_matmul.default, (xs, w, gs, False, "reference")),
        (torch.ops.plum_kernels.grouped_matmul.default, (xs, w, gs, False, "triton")),
        (torch.ops.plum_kernels.grouped_matmul.default, (xs, w.detach().transpose(1, 2).contiguous().requires_grad_(),
                                                     gs, True, "reference")),
        (torch.ops.plum_kernels.grouped_matmul_dw.default, (xs.detach(), torch.randn(T * k, 5), gs, "reference")),
        (torch.ops.plum_kernels.moe_route_backward.default,
         (logits.detach(), ids, torch.randn(T), None, k, "softmax", True, torch.randn(T, k), torch.tensor(1.0),
          torch.tensor(1.0), "reference")),
        (torch.ops.plum_kernels.moe_unpermute_backward.default, (torch.randn(T, d), xs.detach(), wts.detach(), perm,
                                                         "reference")),
        (torch.ops.plum_kernels.moe_unpermute_backward.default, (torch.randn(T, d), xs.detach(), wts.detach(), perm,
                                                         "triton")),
        # moe_combine is moe_permute's backward, with no autograd of its own: no inputs that require grad
        (torch.ops.plum_kernels.moe_combine.default, (xs.detach(), wts.detach(), inv, k, "reference")),
        (torch.ops.plum_kernels.moe_combine.default, (xs.detach(), None, inv, k, "triton")),
        (torch.ops.plum_kernels.moe_permute.default, (x, ids, E, "triton")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                    "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph_moe_mlp():
    x, logits, wg, wd = _layer(12, 16, 8, 12, torch.float32)
    eager = K.moe_mlp(x, logits, wg, wd, 2, impl="reference")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, logits, wg, wd):
        r = K.moe_mlp(x, logits, wg, wd, 2, impl="reference")
        return r.out, r.load_balance_loss + r.z_loss

    ins = [t.clone().requires_grad_() for t in (x, logits, wg, wd)]
    out, aux = step(*ins)
    torch.testing.assert_close(out, eager.out, rtol=0, atol=0)
    (out.sum() + aux).backward()
    ref_ins = [t.clone().requires_grad_() for t in (x, logits, wg, wd)]
    r = K.moe_mlp(*ref_ins, 2, impl="reference")
    (r.out.sum() + r.load_balance_loss + r.z_loss).backward()
    for a, b in zip(ins, ref_ins):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_torch_compile_fullgraph_triton_moe_mlp_matches_eager_and_float64_oracle():
    """Every MoE op with ``impl="triton"`` (route, permute, the grouped matmuls, unpermute and, in the
    backward, route_backward, combine, unpermute_backward) under AOT tracing, in the interpreter."""
    x, logits, wg, wd = _layer(12, 16, 8, 12, torch.float32, seed=4)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, logits, wg, wd):
        r = K.moe_mlp(x, logits, wg, wd, 2, impl="triton")
        return r.out, r.load_balance_loss, r.z_loss

    ins = [t.clone().requires_grad_() for t in (x, logits, wg, wd)]
    outs = step(*ins)
    eager_ins = [t.clone().requires_grad_() for t in (x, logits, wg, wd)]
    eager = K.moe_mlp(*eager_ins, 2, impl="triton")
    leaves, _, o_out, o_lb, o_z = _oracle_layer(x, logits, wg, wd, 2)
    cot = torch.randn(12, 16, dtype=torch.float64)
    for got, e, o in zip(outs, eager, (o_out, o_lb, o_z)):
        torch.testing.assert_close(got, e, rtol=0, atol=0)
        torch.testing.assert_close(got.double(), o, rtol=1e-5, atol=1e-6)
    grads = _grads(outs, ins, cot)
    for g, e, o in zip(grads, _grads(tuple(eager), eager_ins, cot), _grads((o_out, o_lb, o_z), leaves, cot)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
        torch.testing.assert_close(g.double(), o, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["random", "one", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_segment_grouped_matmul_equals_dense_reference(kind, dtype):
    """The CPU path (one product per expert) against the dense reference and the float64 oracle."""
    from plum_kernels.moe import reference as R

    E, M, Kd, N = 6, 53, 37, 29
    gs = O.random_group_sizes(np.random.default_rng(11), M, E, kind)
    x = torch.randn(M, Kd, dtype=torch.float64).to(dtype)
    w = (torch.randn(E, Kd, N, dtype=torch.float64) / 6).to(dtype)
    dy = torch.randn(M, N, dtype=torch.float64).to(dtype)
    seg, dense = R.grouped_matmul_segments(x, w, gs), R.grouped_matmul(x, w, gs)
    seg_t = R.grouped_matmul_segments(x, w.transpose(1, 2).contiguous(), gs, transpose_w=True)
    dws, dwd = R.grouped_matmul_dw_segments(x, dy, gs), R.grouped_matmul_dw(x, dy, gs)
    assert seg.dtype == dws.dtype == dtype and seg.shape == (M, N) and dws.shape == (E, Kd, N)
    exp = O.grouped_matmul(x.double(), w.double(), gs)
    exp_dw = O.grouped_matmul_dw(x.double(), dy.double(), gs)
    budget = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for a, b, what in [(seg, exp, "forward"), (seg_t, exp, "forward, transposed w"), (dws, exp_dw, "dw"),
                       (dense, exp, "dense forward"), (dwd, exp_dw, "dense dw")]:
        O.assert_rel(a, b, budget, what)
    assert (dws[gs == 0] == 0).all()
    if dtype == torch.float64:
        torch.testing.assert_close(seg, dense, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(dws, dwd, rtol=1e-13, atol=1e-13)


# ----------------------------------------------------------------------------- unchecked values (validate=False)

def _guarded(t: torch.Tensor, before: int = 4, after: int = 8) -> torch.Tensor:
    """``t`` as rows of a buffer with NaN rows before and after it: reading past ``t`` gives NaN."""
    buf = torch.full((before + t.shape[0] + after, *t.shape[1:]), float("nan"), dtype=t.dtype)
    buf[before:before + t.shape[0]] = t
    return buf[before:before + t.shape[0]]


def test_unchecked_bad_indices_stay_inside_the_rows():
    """``validate=False`` with out-of-range ``inverse`` / ``permutation`` / expert ids and group sizes that are
    negative or sum past M: undefined values, but the Triton kernels clamp every row index (NaN guard rows
    around the inputs are never read; forward and backward run)."""
    T, k, d = 6, 2, 8
    y = _guarded(torch.randn(T * k, d)).requires_grad_()
    w = torch.rand(T, k, requires_grad=True)
    perm = torch.randperm(T * k).int()
    inv = torch.argsort(perm).int()
    bad_inv, bad_perm = inv.clone(), perm.clone()
    bad_inv[[0, 5]] = torch.tensor([T * k + 3, -2], dtype=torch.int32)
    bad_perm[[1, 7]] = torch.tensor([-1, 10**6], dtype=torch.int32)
    with pytest.raises(ValueError, match="inverse must lie in"):
        K.moe_unpermute(y, w, perm, bad_inv, impl="triton")
    out = K.moe_unpermute(y, w, bad_perm, bad_inv, impl="triton", validate=False)
    gy, gw = torch.autograd.grad(out.sum(), (y, w))
    assert out.shape == (T, d) and torch.isfinite(out).all() and gy.shape == y.shape and gw.shape == w.shape
    x = _guarded(torch.randn(T, d)).requires_grad_()
    xs, gs, p, _ = K.moe_permute(x, torch.tensor([[0, 7], [-1, 1]] * 3), 4, impl="triton", validate=False)
    assert xs.shape == (T * k, d) and gs.shape == (4,) and torch.isfinite(xs).all()
    wt = torch.randn(4, d, 5, requires_grad=True)
    for sizes in ([4, 5, 2, 1], [9, -3, 0, 1], [-2, -2, -2, -2]):
        out = K.grouped_matmul(x, wt, torch.tensor(sizes, dtype=torch.int32), impl="triton", validate=False)
        gx, gwt = torch.autograd.grad(out.sum(), (x, wt))
        assert out.shape == (T, 5) and gx.shape == x.shape and torch.isfinite(gwt).all()
