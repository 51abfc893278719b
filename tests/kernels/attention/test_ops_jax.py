"""history_attention / beam_decode_attention (JAX): the jnp reference and the
Pallas kernels (TPU interpret mode) against the float64 torch reference, under
jax.jit and jax.grad; bad inputs (TPU lowering: test_aot.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
jnp = jax.numpy

import plum_kernels.jax as KJ  # noqa: E402
from plum_kernels.attention.pallas import BlockSizes  # noqa: E402
from plum_kernels.attention.reference import beam_decode_attention_reference, history_attention_reference  # noqa: E402

BUDGET = {jnp.float32: 1e-4, jnp.bfloat16: 1e-2, jnp.float16: 1e-2}


def rel_err(x, ref) -> float:
    x = np.asarray(jnp.asarray(x, jnp.float32), dtype=np.float64)
    assert np.isfinite(x).all()
    ref = ref.detach().double().numpy()
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _inputs(lens, hq, hkv, d, seed=0):
    rng = np.random.default_rng(seed)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    t = int(cu[-1])
    return [rng.standard_normal((t, h, d)) for h in (hq, hkv, hkv)], cu


# T = 334, max 16: the sequence at 49..64 reaches 15 keys back over the first block boundary (64), the one at
# 127..142 15 keys ahead of the second block's last query (127): the band's edges, both ways
BANDED_LENS = [16, 16, 16, 1, 16, 16, 16, 16, 14, 16, 9, 0, 12, 3, 15, 7, 1, 11, 5, 0, 14, 8, 13, 6, 4, 10, 1, 12, 9,
               3, 7]

# (impl, dtype, causal, lengths, Hq, Hkv, D). Pallas cases: lengths spanning two
# 128-blocks (block skipping and clamped index maps), a length-1 and an empty
# sequence, one case with kv blocks larger than q blocks; kept few because TPU
# interpret mode is slow.
CASES = [
    ("reference", jnp.float32, True, [1, 37, 0, 5, 1], 4, 2, 16),
    ("reference", jnp.bfloat16, False, [1, 37, 0, 5, 1], 4, 2, 16),
    ("reference", jnp.float16, True, [1, 37, 0, 5, 1], 4, 2, 16),
    # many short sequences: the banded reference (blocks of 64 queries, last block partial)
    ("reference", jnp.float32, True, BANDED_LENS, 4, 2, 16),
    ("reference", jnp.float32, False, BANDED_LENS, 4, 1, 16),
    ("reference", jnp.bfloat16, True, BANDED_LENS, 2, 2, 16),
    ("pallas", jnp.float32, True, [1, 130, 0, 5], 2, 1, 64),
    ("pallas", jnp.float32, False, [70, 1, 200], 2, 1, 64),
    ("pallas", jnp.bfloat16, True, [1, 130, 0, 5], 2, 1, 64),
    ("pallas", jnp.float16, False, [3, 1, 60], 2, 2, 128),
]


@pytest.mark.parametrize("impl, dtype, causal, lens, hq, hkv, d", CASES)
def test_history_attention_jit_grad(impl, dtype, causal, lens, hq, hkv, d):
    (q, k, v), cu = _inputs(lens, hq, hkv, d)
    blocks = BlockSizes(128, 256) if sum(lens) > 256 else None
    rng = np.random.default_rng(1)
    do, dlse = rng.standard_normal(q.shape), rng.standard_normal((q.shape[1], q.shape[0]))
    qj, kj, vj = (jnp.asarray(x, dtype) for x in (q, k, v))

    def loss(q, k, v):
        out, lse = KJ.history_attention(q, k, v, jnp.asarray(cu), max(lens), causal=causal, return_lse=True,
                                        impl=impl, block_sizes=blocks)
        return jnp.sum(out.astype(jnp.float32) * do) + jnp.sum(lse * dlse), (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(qj, kj, vj)
    # float64 torch reference on the same (dtype-rounded) inputs
    tq, tk, tv = (torch.tensor(np.asarray(jnp.asarray(x, jnp.float32)), dtype=torch.float64).requires_grad_()
                  for x in (qj, kj, vj))
    o64, l64 = history_attention_reference(tq, tk, tv, torch.tensor(cu), causal=causal)
    g64 = torch.autograd.grad([o64, l64], [tq, tk, tv], [torch.tensor(do), torch.tensor(dlse)])
    assert rel_err(out, o64) < BUDGET[dtype]
    assert rel_err(lse, l64) < 1e-5
    for g, want in zip(grads, g64):
        assert rel_err(g, want) < BUDGET[dtype]


@pytest.mark.parametrize("impl, dtype, D, S", [("reference", jnp.float32, 16, 20), ("reference", jnp.bfloat16, 16, 20),
                                               ("pallas", jnp.float32, 64, 150), ("pallas", jnp.bfloat16, 128, 20)])
def test_beam_decode_jit(impl, dtype, D, S):
    rng = np.random.default_rng(2)
    B, W, Hq, Hkv, s = 2, 3, 4, 2, 4
    arrays = [rng.standard_normal(shape) for shape in
              [(B, W, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D), (B, W, s, Hkv, D), (B, W, s, Hkv, D)]]
    plens = np.array([S, 0], np.int32)
    js = [jnp.asarray(a, dtype) for a in arrays]
    out = jax.jit(lambda *a: KJ.beam_decode_attention(*a[:3], a[3], *a[4:], 3, impl=impl))(
        *js[:3], jnp.asarray(plens), *js[3:])
    ts = [torch.tensor(np.asarray(jnp.asarray(a, jnp.float32)), dtype=torch.float64) for a in js]
    want = beam_decode_attention_reference(*ts[:3], torch.tensor(plens), *ts[3:], 3)
    assert rel_err(out, want) < BUDGET[dtype]


@pytest.mark.parametrize("over, exc, match", [
    (dict(cu=np.array([1, 3, 8], np.int32)), ValueError, "start at 0"),
    (dict(cu=np.array([0, 6, 5, 8], np.int32)), ValueError, "non-decreasing"),
    (dict(cu=np.array([0, 3, 7], np.int32)), ValueError, "end at T"),
    (dict(cu=np.array([0, 3, 8], np.int64)), TypeError, "int32"),
    (dict(k=np.zeros((8, 3, 16), np.float32), v=np.zeros((8, 3, 16), np.float32)), ValueError, "multiple of Hkv"),
    (dict(k=np.zeros((8, 2, 16), np.float16)), TypeError, "dtype of q"),
    (dict(q=np.zeros((8, 16), np.float32)), ValueError, r"\[T, Hq, D\]"),
])
def test_history_attention_bad_input(over, exc, match):
    (q, k, v), cu = _inputs([3, 5], 4, 2, 16)
    args = dict(q=q.astype(np.float32), k=k.astype(np.float32), v=v.astype(np.float32), cu=cu)
    args.update(over)
    if args["cu"].dtype == np.int64:
        cu_arr = np.asarray(args["cu"])  # jnp would downcast int64 without x64; pass numpy as is
    else:
        cu_arr = jnp.asarray(args["cu"])
    with pytest.raises(exc, match=match):
        KJ.history_attention(jnp.asarray(args["q"]), jnp.asarray(args["k"]), jnp.asarray(args["v"]), cu_arr, 5)


def test_pallas_head_dim_must_be_supported():
    (q, k, v), cu = _inputs([3, 5], 2, 1, 48)
    with pytest.raises(ValueError, match="head dim D must be one of"):
        KJ.history_attention(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
                             jnp.asarray(cu), 5, impl="pallas")








@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_jit_gives_nan_for_invalid_values_that_eager_calls_refuse(impl):
    """Under ``jax.jit`` the values are traced and cannot raise: invalid ``cu_seqlens`` make the whole output
    and log-sum-exp NaN, a user with an invalid prefix length gets NaN rows; valid ones are untouched. The
    Pallas kernels clamp their block indices, so nothing is fetched outside the arrays."""
    (q, k, v), cu = _inputs([3, 5], 2, 1, 64)
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    f = jax.jit(lambda cu: KJ.history_attention(q, k, v, cu, 5, return_lse=True, impl=impl, interpret=True))
    out, lse = f(jnp.asarray(cu))
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(lse)).all()
    for bad in ([0, 9, 8], [0, 3, 40], [2, 3, 8], [0, 0, 8]):    # decreasing, past T, not from 0, too long
        out, lse = f(jnp.asarray(np.array(bad, np.int32)))
        assert np.isnan(np.asarray(out)).all() and np.isnan(np.asarray(lse)).all()
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        KJ.history_attention(q, k, v, jnp.asarray(np.array([0, 6, 5], np.int32)), 5, impl=impl, interpret=True)
    rng = np.random.default_rng(1)
    qd, kp, vp = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((3, 2, 2, 64), (3, 10, 1, 64),
                                                                               (3, 10, 1, 64)))
    ks = vs = jnp.zeros((3, 2, 1, 1, 64), jnp.float32)
    g = jax.jit(lambda pl_: KJ.beam_decode_attention(qd, kp, vp, pl_, ks, vs, 0, impl=impl, interpret=True))
    out = np.asarray(g(jnp.asarray(np.array([25, 4, -1], np.int32))))
    assert np.isnan(out[[0, 2]]).all() and np.isfinite(out[1]).all()
