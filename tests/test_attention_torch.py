"""history_attention / beam_decode_attention (PyTorch): torch reference and
Triton kernels (Triton interpreter on CPU) against the float64 reference;
bad inputs; torch.library.opcheck; torch.compile(fullgraph=True)."""
from __future__ import annotations

import pytest
import torch

import kernels.torch as K
from kernels.attention.reference import beam_decode_attention_reference, history_attention_reference
from kernels.attention.triton_bwd import history_attention_bwd
from kernels.attention.triton_decode import beam_decode_attention_fwd
from kernels.attention.triton_fwd import history_attention_fwd

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative (Frobenius-norm) error budgets of the project standards.
BUDGET = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite values (poisoned output left unwritten?)"
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def jagged(lens, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    t = int(cu[-1])
    q, k, v = (torch.randn(t, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    return q, k, v, cu


def ref64(q, k, v, cu, causal, do=None, dlse=None):
    qq, kk, vv = (x.double().requires_grad_() for x in (q, k, v))
    out, lse = history_attention_reference(qq, kk, vv, cu, causal=causal)
    if do is None:
        return out.detach(), lse.detach()
    grads = torch.autograd.grad([out, lse], [qq, kk, vv], [do.double(), dlse.double()])
    return out.detach(), lse.detach(), grads


# Lengths: length-1 sequences, an empty one, none a multiple of any block.
LENS = [1, 131, 0, 6]


@pytest.mark.parametrize("dtype, causal", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True),
                                           (torch.float16, False)])
def test_triton_history_attention_kernels(dtype, causal):
    """Forward (out, lse) and backward (dq, dk, dv, with a gradient into lse)
    of the Triton kernels into NaN-poisoned buffers, GQA 2 -> 1."""
    q, k, v, cu = jagged(LENS, 2, 1, 64, dtype)
    g = torch.Generator().manual_seed(1)
    do = torch.randn(q.shape, generator=g).to(dtype)
    dlse = torch.randn(q.shape[1], q.shape[0], generator=g)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((q.shape[1], q.shape[0]), float("nan"))
    history_attention_fwd(q, k, v, cu, causal=causal, scale=0.125, out=out, lse=lse)
    grads = tuple(torch.full_like(x, float("nan")) for x in (q, k, v))
    history_attention_bwd(do, q, k, v, out, lse, dlse, cu, causal=causal, scale=0.125, grads=grads)
    o64, l64, g64 = ref64(q, k, v, cu, causal, do, dlse)
    assert rel_err(out, o64) < BUDGET[dtype]
    assert rel_err(lse, l64) < 1e-5
    for name, got, want in zip("qkv", grads, g64):
        assert rel_err(got, want) < BUDGET[dtype], f"d{name}"
    if dtype == torch.float32:
        # Deterministic backward: a second run is bitwise identical.
        again = history_attention_bwd(do, q, k, v, out, lse, dlse, cu, causal=causal, scale=0.125)
        assert all(torch.equal(a, b) for a, b in zip(grads, again))


def test_triton_history_attention_head_dim_128_and_mha():
    q, k, v, cu = jagged([1, 129, 7], 1, 1, 128, torch.bfloat16)
    do = torch.randn_like(q)
    out, lse = history_attention_fwd(q, k, v, cu, causal=True, scale=128 ** -0.5)
    dq, dk, dv = history_attention_bwd(do, q, k, v, out, lse, None, cu, causal=True, scale=128 ** -0.5)
    o64, l64, g64 = ref64(q, k, v, cu, True, do, torch.zeros_like(lse))
    assert rel_err(out, o64) < 1e-2 and rel_err(lse, l64) < 1e-5
    for got, want in zip((dq, dk, dv), g64):
        assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_public_op_forward_backward(impl):
    """kernels.torch.history_attention through torch.library + autograd,
    return_lse with a loss on both outputs."""
    q, k, v, cu = jagged([3, 1, 66], 2, 1, 64, torch.float32, seed=3)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = K.history_attention(q, k, v, cu, 66, return_lse=True, impl=impl)
    g = torch.Generator().manual_seed(4)
    do, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    (out * do).sum().backward(inputs=[q, k, v], retain_graph=True)
    (lse * dlse).sum().backward(inputs=[q, k, v])
    o64, l64, g64 = ref64(q.detach(), k.detach(), v.detach(), cu, True, do, dlse)
    assert rel_err(out.detach(), o64) < 1e-4 and rel_err(lse.detach(), l64) < 1e-5
    for x, want in zip((q, k, v), g64):
        assert rel_err(x.grad, want) < 1e-4


def test_reference_float64_matches_dense_masked_softmax():
    """The reference itself against a dense [T, T] masked softmax (independent
    formulation: segment ids + causal mask over the whole packed batch)."""
    q, k, v, cu = jagged([4, 1, 9], 4, 2, 16, torch.float64)
    out, lse = history_attention_reference(q, k, v, cu, causal=True, scale=0.3)
    seg = torch.repeat_interleave(torch.arange(3), cu.diff().long())
    t = torch.arange(q.shape[0])
    keep = (seg[:, None] == seg[None, :]) & (t[None, :] <= t[:, None])
    s = torch.einsum("thd,jhd->htj", q, k.repeat_interleave(2, 1)) * 0.3
    s = s.masked_fill(~keep, float("-inf"))
    want = torch.einsum("htj,jhd->thd", s.softmax(-1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, s.logsumexp(-1), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- decode

def decode_inputs(dtype, b=3, w=4, hq=4, hkv=2, d=64, s_cap=150, s=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    return (mk(b, w, hq, d), mk(b, s_cap, hkv, d), mk(b, s_cap, hkv, d),
            mk(b, w, s, hkv, d), mk(b, w, s, hkv, d))


def full_attention_decode(q, kp, vp, plens, ks, vs, sl):
    """The same quantity through history_attention: one causal sequence per
    (user, beam) = its prefix then its suffix, the beam's query at the end."""
    B, W, Hq, D = q.shape
    qs, kk, vv, lens = [], [], [], []
    for b in range(B):
        for w in range(W):
            kseq = torch.cat([kp[b, :plens[b]], ks[b, w, :sl]])
            vseq = torch.cat([vp[b, :plens[b]], vs[b, w, :sl]])
            qseq = torch.randn(kseq.shape[0], Hq, D, dtype=q.dtype)
            qseq[-1] = q[b, w]
            qs.append(qseq), kk.append(kseq), vv.append(vseq), lens.append(kseq.shape[0])
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    out, _ = history_attention_reference(torch.cat(qs), torch.cat(kk), torch.cat(vv), cu, causal=True)
    return out[cu[1:].long() - 1].reshape(B, W, Hq, D)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_beam_decode(dtype):
    q, kp, vp, ks, vs = decode_inputs(dtype, b=2, w=2, s_cap=70)
    plens = torch.tensor([70, 1], dtype=torch.int32)
    for sl, splits in [(3, None), (0, 3)]:
        out = torch.full_like(q, float("nan"))
        beam_decode_attention_fwd(q, kp, vp, plens, ks, vs, sl, scale=64 ** -0.5, num_splits=splits, out=out)
        want = full_attention_decode(*(x.double() for x in (q, kp, vp)), plens.tolist(), ks.double(), vs.double(), sl)
        assert rel_err(out, want) < BUDGET[dtype], (sl, splits)


def test_triton_beam_decode_two_row_blocks():
    """W * G = 132 query rows per KV head: two 128-row blocks."""
    q, kp, vp, ks, vs = decode_inputs(torch.float16, b=1, w=33, hq=8, hkv=2, s_cap=70, s=3, seed=7)
    plens = torch.tensor([65], dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    beam_decode_attention_fwd(q, kp, vp, plens, ks, vs, 2, scale=0.125, out=out)
    want = beam_decode_attention_reference(*(x.double() for x in (q, kp, vp)), plens, ks.double(), vs.double(), 2,
                                           scale=0.125)
    assert rel_err(out, want) < 1e-2


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_public_beam_decode(impl):
    q, kp, vp, ks, vs = decode_inputs(torch.float32, b=2, w=3, hq=6, hkv=2, s_cap=40, s=4, seed=5)
    plens = torch.tensor([0, 40], dtype=torch.int32)
    out = K.beam_decode_attention(q, kp, vp, plens, ks, vs, 4, impl=impl)
    want = beam_decode_attention_reference(*(x.double() for x in (q, kp, vp)), plens, ks.double(), vs.double(), 4)
    assert out.shape == q.shape and rel_err(out, want) < 1e-4
    want2 = full_attention_decode(*(x.double() for x in (q, kp, vp)), plens.tolist(), ks.double(), vs.double(), 4)
    assert rel_err(want, want2) < 1e-12


# ----------------------------------------------------------------------------- bad input

def _hist_args(**over):
    q, k, v, cu = jagged([3, 5], 4, 2, 64, torch.float32)
    args = dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=5)
    args.update(over)
    return args


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("over, exc, match", [
    (dict(cu_seqlens=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, "start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 6, 5, 8], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError, "end at T"),
    (dict(cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int64)), TypeError, "int32"),
    (dict(cu_seqlens=torch.tensor([0], dtype=torch.int32)), ValueError, "B >= 1"),
    (dict(max_seqlen=4), ValueError, "max_seqlen"),
    (dict(k=torch.randn(8, 3, 64), v=torch.randn(8, 3, 64)), ValueError, "multiple of Hkv"),
    (dict(k=torch.randn(8, 2, 64, dtype=torch.float16)), TypeError, "dtype of q"),
    (dict(q=torch.randn(8, 4, 64, dtype=torch.float64), k=torch.randn(8, 2, 64, dtype=torch.float64)), TypeError,
     "q must be one of"),
    (dict(q=torch.randn(8, 64)), ValueError, r"\[T, Hq, D\]"),
    (dict(v=torch.randn(8, 2, 32)), ValueError, "k and v must have shape"),
])
def test_history_attention_bad_input(impl, over, exc, match):
    if impl == "reference" and "float64" in str(over.get("q", torch.empty(0)).dtype):
        pytest.skip("the reference accepts float64")
    with pytest.raises(exc, match=match):
        K.history_attention(**_hist_args(**over), impl=impl)


def test_history_attention_kernel_head_dim_and_meta():
    q, k, v, cu = jagged([3, 5], 2, 1, 48, torch.float32)
    with pytest.raises(ValueError, match="head dim D must be one of"):
        K.history_attention(q, k, v, cu, 5, impl="triton")
    K.history_attention(q, k, v, cu, 5, impl="reference")   # any D
    with pytest.raises(ValueError, match="impl must be"):
        K.history_attention(q, k, v, cu, 5, impl="cuda")
    with pytest.raises(ValueError, match="scale"):
        K.history_attention(q, k, v, cu, 5, scale=-1.0)


@pytest.mark.parametrize("case, exc, match", [
    ("plens_range", ValueError, r"prefix_lens must lie in \[0, S="),
    ("no_keys", ValueError, "at least one key"),
    ("suffix_len", ValueError, "suffix_len must be an int"),
    ("plens_dtype", TypeError, "prefix_lens must be int32"),
    ("suffix_shape", ValueError, "k_suffix and v_suffix must have shape"),
    ("gqa", ValueError, "multiple of Hkv"),
    ("rank", ValueError, r"\[B, W, Hq, D\]"),
])
def test_beam_decode_bad_input(case, exc, match):
    q, kp, vp, ks, vs = decode_inputs(torch.float32, b=2, s_cap=10, s=3)
    plens, sl = torch.tensor([10, 4], dtype=torch.int32), 2
    if case == "plens_range":
        plens = torch.tensor([11, 4], dtype=torch.int32)
    elif case == "no_keys":
        plens, sl = torch.tensor([0, 4], dtype=torch.int32), 0
    elif case == "suffix_len":
        sl = 4
    elif case == "plens_dtype":
        plens = plens.long()
    elif case == "suffix_shape":
        ks = ks[:, :2]
    elif case == "gqa":
        kp, vp = kp[:, :, :1].expand(-1, -1, 3, -1), vp[:, :, :1].expand(-1, -1, 3, -1)
    elif case == "rank":
        q = q[0]
    with pytest.raises(exc, match=match):
        K.beam_decode_attention(q, kp, vp, plens, ks, vs, sl)


# ----------------------------------------------------------------------------- torch.library integration

def test_opcheck():
    q, k, v, cu = jagged([3, 1, 6], 4, 2, 16, torch.float32)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu, 6, True, 0.25, "reference", True)
    torch.library.opcheck(torch.ops.plum.history_attention_fwd.default, args)
    qd, kp, vp, ks, vs = decode_inputs(torch.float32, b=2, w=2, d=16, s_cap=8, s=3)
    torch.library.opcheck(torch.ops.plum.beam_decode_attention.default,
                          (qd, kp, vp, torch.tensor([8, 2], dtype=torch.int32), ks, vs, 2, 0.25, "reference", True))


def test_torch_compile_fullgraph():
    q, k, v, cu = jagged([3, 1, 6], 4, 2, 16, torch.float32)

    # aot_eager: Dynamo capture of the whole graph (fullgraph) plus AOTAutograd
    # with the fake impls and the registered autograd; inductor's C++ codegen of
    # the surrounding ops adds a minute on 2 cores and nothing about our ops.
    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(q, k, v, cu):
        out, lse = K.history_attention(q, k, v, cu, 6, return_lse=True)
        return (out.square()).sum() + lse.sum()

    q2, k2, v2 = (x.clone().requires_grad_() for x in (q, k, v))
    loss = loss_fn(q2, k2, v2, cu)
    loss.backward()
    q3, k3, v3 = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = K.history_attention(q3, k3, v3, cu, 6, return_lse=True)
    (out.square().sum() + lse.sum()).backward()
    torch.testing.assert_close(loss, out.square().sum() + lse.sum())
    for a, b in ((q2, q3), (k2, k3), (v2, v3)):
        torch.testing.assert_close(a.grad, b.grad)

    qd, kp, vp, ks, vs = decode_inputs(torch.float32, b=2, w=2, d=16, s_cap=8, s=3)
    plens = torch.tensor([8, 2], dtype=torch.int32)
    dec = torch.compile(lambda *a: K.beam_decode_attention(*a, 2) * 2.0, fullgraph=True, backend="aot_eager")
    want = 2.0 * K.beam_decode_attention(qd, kp, vp, plens, ks, vs, 2)
    torch.testing.assert_close(dec(qd, kp, vp, plens, ks, vs), want)
