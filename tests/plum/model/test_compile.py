"""PlumLM's training step under ``torch.compile(fullgraph=True)`` with Inductor, and its host syncs.

Compile. ``torch._dynamo.explain`` finds no graph break in the trainer's loss (:func:`plumrec.train.losses.lm_loss`:
packed forward with ``logits_index``, weighted cross-entropy, router aux losses) nor in a full-logits step, for a
one-layer dense and a one-layer MoE model. Inductor compiles the loss's body (:func:`train_step`, which also returns
the logits) once with ``fullgraph=True, dynamic=True``, and three jagged batches of different B, T, M and
``max_seqlen`` run through that one compile: loss, logged parts, logits and every parameter gradient equal eager
``lm_loss`` in float32 to ``rtol = atol = 1e-5`` (observed differences are ~5e-7). Without ``dynamic`` the second
batch shape recompiles once, then no more.

Syncs. :class:`sync_audit.SyncAudit` records every device-to-host read of an eager forward + backward. Outside our
custom ops the step reads the host exactly once, in ``PlumLM._check_batch_values`` (the once-per-batch value check at
the model's entry), with one layer as with three, MoE or dense, and nothing inside ``DecoderLayer.forward``. The
bodies of the ``plum_kernels`` ops are opaque to that count. Audited inside, the Triton bodies (run by the
interpreter here; their host code is the GPU path's) read nothing back, while the CPU reference bodies read
``cu_seqlens`` (attention) and ``group_sizes`` (grouped matmul) per layer by design (a host loop over sequences or
experts), every such read attributed to its op.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sync_audit import SyncAudit
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import plum_kernels.torch as K
from plumrec.model.config import preset
from plumrec.model.model import PlumLM, cu_seqlens_from_lengths
from plumrec.sequences import Example, pack
from plumrec.train.losses import lm_loss, weighted_loss

VOCAB = 128
KINDS = ("moe", "dense")
LENGTHS = ([5, 9, 3], [7, 4], [12, 2, 6, 3])   # three batches: B, T, M and max_seqlen all change
TOL = dict(rtol=1e-5, atol=1e-5)


def make_model(kind: str, layers: int, seed: int = 0, **config) -> PlumLM:
    """The ``tiny`` preset with ``layers`` layers, all MoE or all dense (tiny itself has a dense layer 0);
    ``config`` replaces more fields."""
    dense = tuple(range(layers)) if kind == "dense" else ()
    torch.manual_seed(seed)
    return PlumLM(preset("tiny", vocab_size=VOCAB, num_hidden_layers=layers, mlp_only_layers=dense, **config))


def make_batch(lengths, seed: int):
    """Packed random examples; about a third of the tokens carry no loss (jagged ``loss_index``)."""
    rng = np.random.default_rng(seed)
    return pack([Example(rng.integers(0, VOCAB, n), (rng.random(n) < 0.7).astype(np.float32)) for n in lengths])


def train_step(model, batch):
    """:func:`lm_loss`'s body, also returning the logits at ``batch.loss_index``."""
    out = model(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, logits_index=batch.loss_index)
    ce = F.cross_entropy(out.logits.float(), batch.targets, reduction="none")
    loss, parts = weighted_loss((ce * batch.weights).sum(), batch, out)
    return loss, parts, out.logits


def full_logits_step(model, input_ids, cu_seqlens, targets):
    """Forward with logits at every token, cross-entropy and router aux losses."""
    out = model(input_ids, cu_seqlens)
    return F.cross_entropy(out.logits.float(), targets) + out.aux_loss


def _grads(model, loss) -> dict:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def compiled_runs():
    """Eager ``lm_loss`` and the one Inductor compile of :func:`train_step` on the batches of ``LENGTHS``:
    per batch ``(eager, compiled)`` dicts of loss, parts, logits and gradients, the frame count after each batch
    and the number of non-empty graphs (Inductor's compile also passes one empty frame through the backend)."""
    model = make_model("moe", 1)
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(train_step, backend=counter, fullgraph=True, dynamic=True)
    runs, frames = [], []
    for i, lengths in enumerate(LENGTHS):
        batch = make_batch(lengths, seed=i)
        loss, parts = lm_loss(model, batch)
        with torch.no_grad():
            out = model(batch.input_ids, batch.cu_seqlens)
        eager = dict(loss=loss.detach(), parts=parts, logits=out.logits.detach()[batch.loss_index],
                     grads=_grads(model, loss))
        c_loss, c_parts, c_logits = step(model, batch)
        frames.append(counter.frame_count)
        runs.append((eager, dict(loss=c_loss.detach(), parts=c_parts, logits=c_logits.detach(),
                                 grads=_grads(model, c_loss))))
    graphs = [g for g in counter.graphs if any(n.op.startswith("call") for n in g.graph.nodes)]
    return runs, frames, len(graphs)


@pytest.mark.parametrize("kind", KINDS)
def test_training_steps_trace_without_graph_break(kind):
    model, batch = make_model(kind, 1), make_batch(LENGTHS[0], seed=0)
    assert any(type(l.mlp).__name__ == "MoEMLP" for l in model.layers) == (kind == "moe")
    targets = torch.roll(batch.input_ids, -1)
    full_args = (model, batch.input_ids, batch.cu_seqlens, targets)
    for fn, args in ((lm_loss, (model, batch)), (full_logits_step, full_args)):
        explained = torch._dynamo.explain(fn)(*args)
        assert explained.graph_break_count == 0, (fn.__name__, explained.break_reasons)
        assert explained.graph_count == 1, fn.__name__


@pytest.mark.parametrize("i", range(len(LENGTHS)))
def test_inductor_step_matches_eager(compiled_runs, i):
    eager, comp = compiled_runs[0][i]
    torch.testing.assert_close(comp["loss"], eager["loss"], **TOL)
    for key in ("ce", "aux"):
        torch.testing.assert_close(comp["parts"][key], eager["parts"][key], **TOL)
    assert comp["parts"]["tokens"] == eager["parts"]["tokens"] == sum(LENGTHS[i])
    assert comp["logits"].shape == eager["logits"].shape
    torch.testing.assert_close(comp["logits"], eager["logits"], **TOL)
    assert comp["grads"].keys() == eager["grads"].keys()
    for name, g in eager["grads"].items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(comp["grads"][name], g, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_new_batch_shapes_reuse_the_compile(compiled_runs):
    _, frames, graphs = compiled_runs
    assert graphs == 1
    assert frames[1:] == [frames[0]] * (len(LENGTHS) - 1), f"recompiled on new lengths: frame counts {frames}"


def test_default_compile_recompiles_once_for_new_shapes():
    """``torch.compile`` without ``dynamic``: the second batch shape recompiles once with dynamic sizes
    (Dynamo's automatic dynamic shapes), later shapes reuse it (Dynamo only: the ``eager`` backend)."""
    model, counter = make_model("moe", 1), CompileCounter()
    step = torch.compile(lm_loss, backend=counter, fullgraph=True)
    frames = []
    for i, lengths in enumerate(LENGTHS + ([3, 3], [20, 2, 2, 2])):
        step(model, make_batch(lengths, seed=i))
        frames.append(counter.frame_count)
    # [1, 2, 2, 2, 2] in a fresh process; [1, 1, ...] where Dynamo already saw lm_loss with other shapes.
    assert frames[1] <= frames[0] + 1 and frames[2:] == [frames[1]] * 3, frames


# ----------------------------------------------------------------------------- host syncs

def test_audit_records_every_kind_of_host_read():
    x = torch.arange(6)
    with SyncAudit() as audit:
        x[2].item(), int(x[3]), x.tolist(), x[x > 2], x.nonzero(), torch.repeat_interleave(x, x), x.unique()
        torch.repeat_interleave(x, x, output_size=15), x[torch.tensor([0, 2])], x.sum() * 2
        y = x.clone()
        y[x > 4] = 0
        y[torch.tensor([1])] = 0
    ops = [s.op for s in audit.syncs]
    assert ops[:3] == ["aten._local_scalar_dense.default"] * 2 + ["Tensor.tolist"], ops
    assert ops[3:] == ["aten.index.Tensor", "aten.nonzero.default", "aten.repeat_interleave.Tensor",
                       "aten._unique2.default", "aten.index_put_.default"], ops
    assert all(s.where == "<outside the repository>" for s in audit.syncs)


def test_audit_sees_the_value_check_of_an_op_wrapper():
    q, k, v = torch.randn(8, 2, 16), torch.randn(8, 1, 16), torch.randn(8, 1, 16)
    cu = cu_seqlens_from_lengths([3, 5])
    for check in (True, False):
        with SyncAudit() as audit:
            K.history_attention(q, k, v, cu, 5, causal=True, impl="reference", check_values=check)
        assert len(audit.syncs) == int(check), audit.report()
        assert all(s.where.startswith("kernels/attention/") for s in audit.syncs), audit.report()
        assert audit.custom_ops["plum_kernels::history_attention_fwd"] == 1


def _audited_step(kind: str, layers: int, inside_custom_ops: bool, **config) -> SyncAudit:
    model, batch = make_model(kind, layers, **config), make_batch(LENGTHS[0], seed=0)
    with SyncAudit(inside_custom_ops=inside_custom_ops) as audit:
        loss, _ = lm_loss(model, batch)
        loss.backward()
    return audit


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_reads_the_host_once_per_batch(kind):
    syncs = {}
    for layers in (1, 3):
        audit = _audited_step(kind, layers, inside_custom_ops=False)
        assert audit.custom_ops["plum_kernels::history_attention_fwd"] == layers
        assert audit.custom_ops["plum_kernels::moe_route"] == (layers if kind == "moe" else 0)
        assert not audit.within("DecoderLayer.forward"), audit.report()
        syncs[layers] = [(s.op, s.where) for s in audit.syncs]
    assert len(syncs[1]) == 1 and "PlumLM._check_batch_values" in syncs[1][0][1], syncs[1]
    assert syncs[3] == syncs[1]


def test_reference_bodies_read_the_host_per_layer_by_design():
    """The CPU reference bodies loop over sequences / experts on the host; every read is theirs."""
    per_layer = {}
    for layers in (1, 3):
        audit = _audited_step("moe", layers, inside_custom_ops=True)
        outside = audit.outside_custom_ops()
        assert len(outside) == 1 and "PlumLM._check_batch_values" in outside[0].where, audit.report()
        inside = [s for s in audit.syncs if s.in_custom_op]
        assert not audit.unaudited_ops
        assert {s.in_custom_op for s in inside} == {
            "plum_kernels::history_attention_fwd", "plum_kernels::history_attention_bwd",
            "plum_kernels::grouped_matmul", "plum_kernels::grouped_matmul_dw"}, audit.report()
        assert all(s.where.startswith(("kernels/attention/reference.py", "kernels/moe/reference.py"))
                   for s in inside), audit.report()
        per_layer[layers] = len(inside) / layers
    assert per_layer[3] == per_layer[1]


def test_triton_bodies_read_nothing_back():
    """With ``kernel_impl="triton"`` (the interpreter here, the GPU path's host code) the op bodies read nothing:
    the entry check is the step's only host read, with two layers as with one."""
    for layers in (1, 2):
        audit = _audited_step("moe", layers, inside_custom_ops=True, kernel_impl="triton")
        assert not audit.unaudited_ops
        assert audit.custom_ops["plum_kernels::grouped_matmul"] == 4 * layers
        assert len(audit.syncs) == 1 and "PlumLM._check_batch_values" in audit.syncs[0].where, audit.report()
