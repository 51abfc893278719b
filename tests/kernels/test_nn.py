"""plum_kernels.nn: HistoryAttention and MoEMLP against float64 oracles written here, forward and backward."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from plum_kernels.nn import HistoryAttention, MoEMLP, swiglu_experts
from plum_kernels.torch import MoEOutput

RTOL, ATOL = 1e-4, 1e-5  # fp32 module vs float64 oracle


def _attention_oracle(q, k, v, lengths, causal, scale):
    """Per sequence, per head: softmax(q k^T * scale [+ causal mask]) v in float64."""
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    scale = D ** -0.5 if scale is None else scale
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start:start + n].double() for t in (q, k, v))
        ks = ks.repeat_interleave(Hq // Hkv, dim=1)
        vs = vs.repeat_interleave(Hq // Hkv, dim=1)
        s = torch.einsum("thd,jhd->htj", qs, ks) * scale
        if causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.einsum("htj,jhd->thd", s.softmax(-1), vs))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("causal,scale,D,Hkv", [(True, None, 16, 2), (False, 0.3, 32, 4), (True, 0.2, 32, 1)])
def test_history_attention_module_matches_float64_oracle(causal, scale, D, Hkv):
    torch.manual_seed(0)
    lengths, Hq = [5, 1, 9, 4], 4
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, D, requires_grad=True) for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = HistoryAttention(causal=causal, scale=scale)(q, k, v, cu, max(lengths))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _attention_oracle(q64, k64, v64, lengths, causal, scale)
    torch.testing.assert_close(out.double(), ref, rtol=RTOL, atol=ATOL)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    for name, a, b in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=RTOL, atol=ATOL, msg=name)


def test_history_attention_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        HistoryAttention(scale=-1.0)
    q = torch.randn(6, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens"):
        HistoryAttention()(q, q, q, torch.tensor([0, 4, 3, 6], dtype=torch.int32), 6)


def _moe_oracle(x, router_w, w_gate_up, w_down, top_k, renormalize):
    """Token by token in float64: softmax router, top-k, SwiGLU experts with [E, 2f, d] / [E, d, f] weights;
    also the Switch load-balance loss and the router z-loss."""
    f = w_down.shape[2]
    logits = x @ router_w.T
    probs = logits.softmax(-1)
    top = probs.detach().topk(top_k, dim=-1).indices
    rows = []
    for t in range(x.shape[0]):
        w = probs[t, top[t]]
        w = w / w.sum() if renormalize else w
        acc = torch.zeros_like(x[t])
        for j, e in enumerate(top[t].tolist()):
            h = w_gate_up[e] @ x[t]
            acc = acc + w[j] * (w_down[e] @ (F.silu(h[:f]) * h[f:]))
        rows.append(acc)
    E = router_w.shape[0]
    frac = torch.bincount(top.flatten(), minlength=E).double() / top.numel()
    lb = E * (frac * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    return torch.stack(rows), lb, z


@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_mlp_matches_float64_oracle(renormalize):
    torch.manual_seed(1)
    mlp = MoEMLP(24, 16, num_experts=4, top_k=2, renormalize=renormalize)
    x = torch.randn(3, 7, 24, requires_grad=True)
    res = mlp(x, return_aux=True)
    assert isinstance(res, MoEOutput) and res.out.shape == x.shape
    params = {n: p.detach().double().requires_grad_() for n, p in mlp.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    ref, lb, z = _moe_oracle(x64.reshape(-1, 24), params["router.weight"], params["w_gate_up"], params["w_down"], 2,
                             renormalize)
    torch.testing.assert_close(res.out.double(), ref.reshape(x.shape), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(res.load_balance_loss.double(), lb, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(res.z_loss.double(), z, rtol=RTOL, atol=ATOL)
    g = torch.randn_like(res.out)
    (res.out * g).sum().backward()
    (ref.reshape(x.shape) * g.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=RTOL, atol=ATOL)
    for n, p in mlp.named_parameters():
        torch.testing.assert_close(p.grad.double(), params[n].grad, rtol=RTOL, atol=ATOL, msg=n)
    torch.testing.assert_close(mlp(x), res.out)  # return_aux=False: the tensor alone


def test_swiglu_experts_takes_given_routing():
    torch.manual_seed(2)
    E, f, d, T = 3, 8, 12, 10
    x, wgu, wd = torch.randn(T, d), torch.randn(E, 2 * f, d), torch.randn(E, d, f)
    ids = torch.randint(0, E, (T, 2))
    ids[:, 1] = (ids[:, 0] + 1) % E
    weights = torch.rand(T, 2)
    out = swiglu_experts(x, weights, ids, wgu, wd)
    ref = torch.stack([sum(weights[t, j].double() * (wd[e].double() @ (F.silu(wgu[e, :f].double() @ x[t].double())
                                                                         * (wgu[e, f:].double() @ x[t].double())))
                           for j, e in enumerate(ids[t].tolist())) for t in range(T)])
    torch.testing.assert_close(out.double(), ref, rtol=RTOL, atol=1e-4)
    with pytest.raises(ValueError, match="expert_ids"):
        swiglu_experts(x, weights, ids + E, wgu, wd)
    with pytest.raises(ValueError, match="w_down"):
        swiglu_experts(x, weights, ids, wgu, wd[:, :, :-1])


@pytest.mark.parametrize("kw,name", [(dict(top_k=5), "top_k"), (dict(num_experts=0), "num_experts"),
                                     (dict(score="relu"), "score"), (dict(hidden_size=2.5), "hidden_size")])
def test_moe_mlp_rejects_bad_arguments(kw, name):
    args = dict(hidden_size=8, intermediate_size=4, num_experts=4, top_k=2)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        MoEMLP(**args)


def test_moe_mlp_rejects_wrong_width():
    with pytest.raises(ValueError, match="x must be"):
        MoEMLP(8, 4, 4, 2)(torch.randn(3, 7))


def test_modules_import_without_transformers():
    code = "import sys, plum_kernels.nn, plum_kernels.torch; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
