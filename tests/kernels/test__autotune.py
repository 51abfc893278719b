"""``plum_kernels._autotune``'s op registration: every registered op has an
opcheck; the ops whose Triton branch ``triton_visible_op`` exposes appear in
the traced graph as Triton kernel wrapper nodes (traced in a subprocess without
the interpreter, whose kernels ``wrap_triton`` cannot trace; the graph is
captured, not run); every op compiles with Inductor (reference impl) and
matches eager."""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import torch

import plum_kernels.torch as K
from plum_kernels._autotune import registered_ops

TESTS = pathlib.Path(__file__).resolve().parent
VISIBLE = {"moe_route", "moe_route_backward", "moe_permute", "moe_combine", "moe_unpermute", "moe_unpermute_backward",
           "constrained_beam_step"}


def _opchecked() -> set[str]:
    """Ops named as ``torch.ops.plum_kernels.<op>`` inside a ``test_opcheck*`` function of tests/kernels."""
    names = set()
    for path in TESTS.rglob("test_*.py"):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_opcheck"):
                for node in ast.walk(fn):
                    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                            and node.value.attr == "plum_kernels"):
                        names.add(node.attr)
    return names


def test_every_registered_op_has_an_opcheck():
    ops = registered_ops()
    assert len(ops) == 13 and VISIBLE <= set(ops), ops
    missing = sorted(set(ops) - _opchecked())
    assert not missing, f"registered ops without a torch.library.opcheck test: {missing}"


CAPTURE = r'''
import numpy as np, torch
import plum_kernels.torch as K
from plumrec.sid import build_trie

graphs = []

class Stop(Exception):
    pass

def backend(gm, example):
    from torch._functorch.aot_autograd import aot_module_simplified

    def fw(g, _):
        graphs.append(g.graph)
        raise Stop
    return aot_module_simplified(gm, example, fw_compiler=fw)

ops = torch.ops.plum_kernels
rng = np.random.default_rng(0)
trie = build_trie(np.stack([rng.integers(0, v, 30) for v in (4, 3, 5)], 1), (4, 3, 5)).to_torch()

def f(logits, x, gw, grad_out):
    w, ids, lb, z, lse = ops.moe_route(logits, 2, "softmax", None, True, "triton")
    dl = ops.moe_route_backward(logits, ids, lse, None, 2, "softmax", True, gw, lb, z, "triton")
    xs, gs, perm, inv = ops.moe_permute(x, ids, 4, "triton")
    back = ops.moe_combine(xs, None, inv, 2, "triton")
    out = ops.moe_unpermute(xs, w, perm, inv, "triton")
    dy, dw = ops.moe_unpermute_backward(grad_out, xs, w, perm, "triton")
    nodes = torch.zeros(2, 1, dtype=torch.int64)
    step = ops.constrained_beam_step(logits[:2, None, :4].contiguous(), torch.zeros(2, 1), nodes, trie.child_ptr,
                                     trie.child_token, trie.edge_word, [4, 3, 5], int(trie.num_internal), 0, 3,
                                     "codebook", 0, "triton")
    return dl, back, out, dy, dw, step

try:
    torch.compile(f, fullgraph=True, backend=backend)(torch.randn(8, 4), torch.randn(8, 16), torch.randn(8, 2),
                                                      torch.randn(8, 16))
except Exception as e:
    if "Stop" not in str(e):
        raise
g = graphs[0]
print("HOPS", sum("triton_kernel_wrapper" in str(n.target) for n in g.nodes))
print("OPAQUE", sorted({str(n.target) for n in g.nodes if "plum_kernels" in str(n.target)}))
'''


def test_triton_branches_trace_into_kernel_wrapper_nodes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", CAPTURE], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if line.startswith(("HOPS", "OPAQUE")))
    # route fwd + bwd, gather, combine (twice: moe_combine and moe_unpermute), unpermute bwd, expand + select
    assert int(lines["HOPS"]) == 8, run.stdout
    assert lines["OPAQUE"] == "[]", run.stdout


def _attention_and_moe(q, k, v, cu, x, logits, wg, wd):
    out = K.history_attention(q, k, v, cu, 6, impl="reference")
    r = K.moe_mlp(x, logits, wg, wd, 2, impl="reference")
    return out.square().sum() + r.out.square().sum() + r.load_balance_loss + r.z_loss


def test_every_op_compiles_with_inductor_and_matches_eager():
    g = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 3, 4, 10], dtype=torch.int32)
    leaves = [torch.randn(*s, generator=g) for s in ((10, 4, 16), (10, 2, 16), (10, 2, 16), (6, 8), (6, 4),
                                                       (4, 8, 10), (4, 5, 8))]
    args = lambda: [t.clone().requires_grad_() for t in leaves]  # noqa: E731
    got, want = args(), args()

    def loss(q, k, v, x, logits, wg, wd):
        return _attention_and_moe(q, k, v, cu, x, logits, wg, wd)

    compiled = torch.compile(loss, fullgraph=True)
    lc, le = compiled(*got), loss(*want)
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(lc, got), torch.autograd.grad(le, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    from plumrec.sid import build_trie
    rng = np.random.default_rng(1)
    sid = build_trie(np.stack([rng.integers(0, v, 30) for v in (4, 3, 5)], 1), (4, 3, 5))
    tr = sid.to_torch()
    items = SimpleNamespace(**{n: torch.as_tensor(np.asarray(getattr(sid, n))) for n in ("edge_item", "dup_ptr",
                                                                                         "dup_items")})

    def infer(qd, kp, vp, lens, ks, vs, logits, mass):
        att = K.beam_decode_attention(qd, kp, vp, lens, ks, vs, 2, impl="reference")
        step = K.constrained_beam_step(logits, torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.int64), tr, 0, 3,
                                       impl="reference")
        agg = K.trie_aggregate(mass, tr, items, impl="reference")
        return att, tuple(step), tuple(agg)

    ins = (torch.randn(2, 2, 4, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16),
           torch.tensor([8, 3], dtype=torch.int32), torch.randn(2, 2, 3, 2, 16), torch.randn(2, 2, 3, 2, 16),
           torch.randn(2, 1, 4), torch.rand(30))
    for c, e in zip(torch.utils._pytree.tree_leaves(torch.compile(infer, fullgraph=True)(*ins)),
                    torch.utils._pytree.tree_leaves(infer(*ins))):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
