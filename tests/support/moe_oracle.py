"""Float64 oracles for the MoE tests: plain per-token / per-expert loops,
independent of ``kernels/moe/reference.py`` (which they also check)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

BUDGET = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-10}


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| (expected in float64)."""
    a = torch.as_tensor(np.asarray(actual, dtype=np.float64)) if not isinstance(actual, torch.Tensor) else actual
    e = torch.as_tensor(np.asarray(expected, dtype=np.float64)) if not isinstance(expected, torch.Tensor) else expected
    a, e = a.double().cpu(), e.double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.isfinite(a).all(), "non-finite values in the result (poisoned output not overwritten?)"
    scale = e.abs().max().item()
    return (a - e).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_rel(actual, expected, budget: float, what: str = "") -> None:
    err = rel_err(actual, expected)
    assert err <= budget, f"{what}: relative error {err:.3e} > budget {budget:.1e}"


def route(logits, k, score="softmax", bias=None, renormalize=True):
    """float64 routing with autograd; selection by a stable sort (ties -> lower id)."""
    l = logits.double()
    if score == "softmax":
        s = torch.softmax(l, -1)
        p = s
    else:
        s = torch.sigmoid(l)
        p = s / s.sum(-1, keepdim=True)
    sel = s.detach() + (0 if bias is None else bias.double())
    order = np.argsort(-sel.numpy(), axis=1, kind="stable")[:, :k]
    ids = torch.from_numpy(order.copy())
    w = torch.stack([s[t, ids[t]] for t in range(l.shape[0])])
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    T, E = l.shape
    f = torch.tensor([(order == e).sum() / (T * k) for e in range(E)], dtype=torch.float64)
    lb = E * (f * p.mean(0)).sum()
    z = (torch.logsumexp(l, -1) ** 2).mean()
    return w, ids, lb, z


def grouped_matmul(x, w, group_sizes, transpose_w=False):
    """Per-expert loop over Python slices."""
    out, start = [], 0
    for e, g in enumerate(group_sizes.tolist()):
        we = w[e].double().T if transpose_w else w[e].double()
        out.append(x[start:start + g].double() @ we)
        start += g
    return torch.cat(out)


def grouped_matmul_dw(x, dy, group_sizes):
    dw, start = [], 0
    for g in group_sizes.tolist():
        dw.append(x[start:start + g].double().T @ dy[start:start + g].double())
        start += g
    return torch.stack(dw)


def moe_mlp(x, weights, ids, w_gate_up, w_down):
    """sum_j w[t, j] * SwiGLU expert ids[t, j] applied to x[t]; per-expert loop."""
    T, d = x.shape
    E, f = w_down.shape[0], w_down.shape[1]
    out = torch.zeros(T, d, dtype=torch.float64)
    for e in range(E):
        tok, slot = (ids.long() == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok].double() @ w_gate_up[e].double()
        a = F.silu(h[:, :f]) * h[:, f:]
        scatter = torch.zeros(T, tok.numel(), dtype=torch.float64)
        scatter[tok, torch.arange(tok.numel())] = 1.0
        out = out + scatter @ (weights[tok, slot].double()[:, None] * (a @ w_down[e].double()))
    return out


def random_group_sizes(gen: np.random.Generator, M: int, E: int, kind: str = "random") -> torch.Tensor:
    if kind == "one":        # every row on one expert
        gs = np.zeros(E, dtype=np.int64)
        gs[gen.integers(E)] = M
    elif kind == "sparse":   # most experts empty
        gs = np.zeros(E, dtype=np.int64)
        hot = gen.choice(E, size=max(1, E // 4), replace=False)
        gs[hot] = gen.multinomial(M, np.ones(len(hot)) / len(hot))
    else:
        gs = gen.multinomial(M, gen.dirichlet(np.ones(E)))
    return torch.from_numpy(gs.astype(np.int32))
