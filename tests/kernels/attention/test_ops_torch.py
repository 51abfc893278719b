"""history_attention / beam_decode_attention (PyTorch): torch reference and
Triton kernels (Triton interpreter on CPU) against the float64 reference;
bad inputs; torch.library.opcheck; torch.compile(fullgraph=True)."""
from __future__ import annotations

import functools

import pytest
import torch
import triton
import triton.language as tl

import plum_kernels.torch as K
from plum_kernels.attention.reference import beam_decode_attention_reference, history_attention_reference
from plum_kernels.attention.triton_bwd import history_attention_bwd
from plum_kernels.attention.triton_common import find_block
from plum_kernels.attention.triton_decode import beam_decode_attention_fwd
from plum_kernels.attention.triton_fwd import history_attention_fwd

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
    """plum_kernels.torch.history_attention through torch.library + autograd,
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


@pytest.mark.parametrize("dtype, d, causal, hq, hkv", [
    (torch.float32, 64, True, 4, 2), (torch.bfloat16, 64, True, 2, 1), (torch.float16, 128, False, 3, 1),
    (torch.float32, 128, True, 2, 2)])
def test_atomic_dq_backward_matches_float64(dtype, d, causal, hq, hkv):
    """``deterministic=False``: dQ accumulated with float32 atomics inside the
    dK/dV kernel (no dQ kernel), into NaN-poisoned gradients, against float64."""
    q, k, v, cu = jagged(LENS, hq, hkv, d, dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    do = torch.randn(q.shape, generator=g).to(dtype)
    dlse = torch.randn(q.shape[1], q.shape[0], generator=g)
    out, lse = history_attention_fwd(q, k, v, cu, causal=causal, scale=d ** -0.5)
    grads = tuple(torch.full_like(x, float("nan")) for x in (q, k, v))
    history_attention_bwd(do, q, k, v, out, lse, dlse, cu, causal=causal, scale=d ** -0.5, deterministic=False,
                          grads=grads)
    _, _, g64 = ref64(q, k, v, cu, causal, do, dlse)
    for name, got, want in zip("qkv", grads, g64):
        assert rel_err(got, want) < BUDGET[dtype], f"d{name}"


def test_public_op_atomic_dq():
    q, k, v, cu = jagged([5, 70, 1], 4, 2, 64, torch.float32, seed=13)
    do = torch.randn_like(q)
    got = []
    for det in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = K.history_attention(*leaves, cu, 70, impl="triton", deterministic=det)
        got.append(torch.autograd.grad(out, leaves, do))
    _, _, g64 = ref64(q, k, v, cu, True, do, torch.zeros(q.shape[1], q.shape[0]))
    for grads in got:
        for a, want in zip(grads, g64):
            assert rel_err(a, want) < 1e-4
    with pytest.raises(TypeError, match="deterministic"):
        K.history_attention(q, k, v, cu, 70, deterministic="no")


def _spaces():
    from plum_kernels.attention.triton_common import DKDV_ATOMIC_SPACES, DKDV_SPACES, DQ_SPACES, FWD_SPACES

    for kind, spaces in (("fwd", FWD_SPACES), ("dkdv", DKDV_SPACES), ("dkdv-atomic", DKDV_ATOMIC_SPACES),
                         ("dq", DQ_SPACES)):
        for d in (64, 128):
            for i, cfg in enumerate(spaces[(d, 2)]):
                yield pytest.param(kind, d, cfg, id=f"{kind}-d{d}-{i}")


@functools.lru_cache(maxsize=None)
def _config_case(d: int):
    """bf16 inputs (jagged: an empty and a length-1 sequence, one longer than
    every tile; GQA 2 -> 1), the default forward, and the float64 reference."""
    q, k, v, cu = jagged([1, 130, 0, 21], 2, 1, d, torch.bfloat16, seed=14)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(15)).to(torch.bfloat16)
    out, lse = history_attention_fwd(q, k, v, cu, causal=True, scale=d ** -0.5)
    o64, _, g64 = ref64(q, k, v, cu, True, do, torch.zeros(q.shape[1], q.shape[0]))
    return (q, k, v, cu, do), (out, lse), (o64, g64)


@pytest.mark.parametrize("kind, d, cfg", list(_spaces()))
def test_every_autotune_config_matches_float64(kind, d, cfg):
    """Each configuration of the autotuning spaces (bf16), forced in turn,
    computes the same function as the float64 reference."""
    (q, k, v, cu, do), (out, lse), (o64, g64) = _config_case(d)
    if kind == "fwd":
        out = history_attention_fwd(q, k, v, cu, causal=True, scale=d ** -0.5, config=cfg)[0]
        assert rel_err(out, o64) < 1e-2
        return
    grads = history_attention_bwd(do, q, k, v, out, lse, None, cu, causal=True, scale=d ** -0.5,
                                  deterministic=kind != "dkdv-atomic", **{f"{kind.split('-')[0]}_config": cfg})
    for name, got, want in zip("qkv", grads, g64):
        assert rel_err(got, want) < 1e-2, f"d{name}"


def test_autotune_path_refills_the_schedule_per_config(last_config_wins):
    """The GPU path (``triton.autotune`` over a space, the longest-first
    schedule rebuilt for each config's block by a pre-hook), run through the
    interpreter with a fake timer that makes the last config of each space
    win: the results still match float64 and ``chosen_configs`` reports it."""
    q, k, v, cu = jagged([1, 150, 0, 37], 4, 2, 64, torch.bfloat16, seed=16)
    do = torch.randn_like(q)
    out, lse = history_attention_fwd(q, k, v, cu, causal=True, scale=0.125, max_seqlen=150)
    grads = history_attention_bwd(do, q, k, v, out, lse, None, cu, causal=True, scale=0.125, max_seqlen=150)
    o64, _, g64 = ref64(q, k, v, cu, True, do, torch.zeros(q.shape[1], q.shape[0]))
    assert rel_err(out, o64) < 1e-2
    for got, want in zip(grads, g64):
        assert rel_err(got, want) < 1e-2
    chosen = last_config_wins.chosen_configs()
    from plum_kernels.attention.triton_common import DKDV_SPACES, DQ_SPACES, FWD_SPACES

    for name, space in (("history_attention_fwd(64, 2)", FWD_SPACES),
                        ("history_attention_bwd_dkdv(64, 2)", DKDV_SPACES),
                        ("history_attention_bwd_dq(64, 2)", DQ_SPACES)):
        last = space[(64, 2)][-1]
        (cfg,) = chosen[name].values()
        assert f"BLOCK_M: {last.block_m}" in cfg and f"BLOCK_N: {last.block_n}" in cfg, (name, cfg)


@triton.jit
def _schedule_probe(blk_cu, order, out, num_seqs, REVERSE: tl.constexpr):
    pid = tl.program_id(0)
    seq, blk = find_block(blk_cu, order, pid, num_seqs, REVERSE)
    tl.store(out + 2 * pid, seq)
    tl.store(out + 2 * pid + 1, blk)


def test_schedule_runs_longest_sequences_and_costliest_blocks_first():
    """Program ``pid`` of the varlen grid -> (sequence, block): every block of
    every sequence exactly once, sequences longest first, and inside a
    sequence the last block first when ``REVERSE``."""
    from plum_kernels.attention.triton_common import fill_schedule, num_programs, schedule_buffers

    lens = [5, 0, 130, 64, 1, 200]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    block = 64
    for reverse in (True, False):
        blk_cu, order = schedule_buffers(cu)
        fill_schedule(cu, block, blk_cu, order)
        n = num_programs(int(cu[-1]), len(lens), block)
        out = torch.full((n, 2), -7, dtype=torch.int32)
        _schedule_probe[(n,)](blk_cu, order, out, len(lens), REVERSE=reverse)
        pairs = [tuple(r) for r in out.tolist() if r[0] >= 0]
        want = {(s, b) for s, n_ in enumerate(lens) for b in range(-(-n_ // block))}
        assert sorted(pairs) == sorted(want) and len(pairs) == len(want)
        seqs = [s for s, _ in pairs]
        assert seqs == sorted(seqs, key=lambda s: -lens[s])          # longest first, contiguous
        first = {s: b for s, b in reversed(pairs)}
        assert all(first[s] == ((-(-lens[s] // block)) - 1 if reverse else 0) for s in first)


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
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu, 6, True, 0.25, "reference", True,
            True)
    torch.library.opcheck(torch.ops.plum_kernels.history_attention_fwd.default, args)
    out, lse = torch.ops.plum_kernels.history_attention_fwd.default(*(a.detach() if torch.is_tensor(a) else a
                                                                      for a in args))
    for dlse in (None, torch.randn_like(lse)):
        # the backward op has no autograd of its own: no inputs that require grad
        bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, dlse, cu, 6,
                    True, 0.25, "reference", True)
        torch.library.opcheck(torch.ops.plum_kernels.history_attention_bwd.default, bwd_args)
    qd, kp, vp, ks, vs = decode_inputs(torch.float32, b=2, w=2, d=16, s_cap=8, s=3)
    torch.library.opcheck(torch.ops.plum_kernels.beam_decode_attention.default,
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


# ----------------------------------------------------------------------------- unchecked values (check_values=False)

def _guarded(t: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    """``t`` as a view into a buffer padded with ``pad`` NaN slices after it along ``dim``: a kernel that
    addresses past ``t`` reads NaN."""
    shape = list(t.shape)
    shape[dim] += pad
    buf = torch.full(shape, float("nan"), dtype=t.dtype)
    buf.narrow(dim, 0, t.shape[dim]).copy_(t)
    return buf.narrow(dim, 0, t.shape[dim])


def test_unchecked_bad_cu_seqlens_stay_inside_the_tokens():
    """``check_values=False`` with ``cu_seqlens`` past T, negative or decreasing: undefined values, but the
    Triton kernels clamp every token index into [0, T): nothing past q/k/v is read (NaN guard rows), and
    ``cu_seqlens`` past T give exactly the result of the clamped ones."""
    q, k, v, cu = jagged([3, 5], 4, 2, 64, torch.float32)
    q, k, v = (_guarded(x, 0, 16).requires_grad_() for x in (q, k, v))
    for bad, clamped in (([0, 3, 20], [0, 3, 8]), ([-4, 3, 8], [0, 3, 8]), ([0, 6, 5, 8], None)):
        bad = torch.tensor(bad, dtype=torch.int32)
        out = K.history_attention(q, k, v, bad, 8, impl="triton", check_values=False)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v), allow_unused=True)
        assert out.shape == q.shape and [g.shape for g in grads] == [x.shape for x in (q, k, v)]
        if clamped is not None:
            want = K.history_attention(q.detach(), k.detach(), v.detach(), torch.tensor(clamped, dtype=torch.int32),
                                       8, impl="reference")
            assert rel_err(out.detach(), want) < 1e-4


def test_unchecked_prefix_lens_stay_inside_the_cache():
    """``prefix_lens`` above S (or negative) with ``check_values=False``: the kernels clamp them to [0, S]
    when they address keys (NaN guard slots past S are never read)."""
    q, kp, vp, ks, vs = decode_inputs(torch.float32, b=2, s_cap=10, s=3)
    kp, vp = _guarded(kp, 1, 6), _guarded(vp, 1, 6)
    out = K.beam_decode_attention(q, kp, vp, torch.tensor([15, -3], dtype=torch.int32), ks, vs, 2, impl="triton",
                                  check_values=False)
    want = K.beam_decode_attention(q, kp, vp, torch.tensor([10, 0], dtype=torch.int32), ks, vs, 2, impl="reference")
    assert out.shape == q.shape and rel_err(out, want) < 1e-4
