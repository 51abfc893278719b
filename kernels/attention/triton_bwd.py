"""Triton backward of ``history_attention`` (FlashAttention-2 style).

Three kernels, then the launcher:

1. ``_bwd_preprocess_kernel``: ``delta[h, t] = sum_d dO[t, h, d] * O[t, h, d]
   - dLSE[h, t]`` (float32 ``[Hq, T]``; the ``dLSE`` term is the gradient
   flowing into the returned log-sum-exp, zero when it is not used).
2. ``history_attention_bwd_dkdv_kernel``: one program owns BLOCK_N keys of one
   KV head and loops over the ``Hq / Hkv`` query heads of its group and over
   the query blocks that can see those keys (from the diagonal down when
   causal), accumulating dK and dV in registers: the GQA reduction happens
   inside the program, so dK/dV need no atomics.
3. ``history_attention_bwd_dq_kernel``: one program owns BLOCK_M queries of one
   query head and loops over their keys like the forward, accumulating dQ.

Two ways to get dQ:

- deterministic (the default): kernel 3, which recomputes ``Q K^T`` and
  ``dO V^T`` for its blocks: 7 block products per (query block, key block)
  pair, 4 in kernel 2 (``K Q^T``, ``P^T dO``, ``V dO^T``, ``dS^T Q``) and 3 in
  kernel 3 (``Q K^T``, ``dO V^T``, ``dS K``); bitwise reproducible;
- ``deterministic=False``: kernel 2 also forms ``dS K`` for each pair and adds
  it into a float32 ``[T, Hq, D]`` buffer with atomics, and kernel 3 does not
  run: 5 products per pair instead of 7, but the order of the float32
  additions, hence the last bits of dQ, varies from run to run.

Products run as ``s^T = K Q^T`` in the dK/dV kernel so that its matrices have
BLOCK_N (>= 64) rows, which is what Hopper's wgmma needs. Both loops use the
longest-first (sequence, block) schedule of ``triton_common``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from plum_kernels.attention.triton_common import (
    DKDV_ATOMIC_SPACES,
    DKDV_SPACES,
    DQ_SPACES,
    TileConfig,
    config_key,
    find_block,
    launch,
    mma,
    needs_upcast,
    num_programs,
    schedule_buffers,
    seq_bounds,
    tune_bucket,
)
from plum_kernels.attention.triton_fwd import LOG2E, input_precision


@triton.jit
def _bwd_preprocess_kernel(O, DO, DLSE, DELTA, total_tokens, num_heads,
                           stride_ot, stride_oh, stride_dot, stride_doh,
                           HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, HAS_DLSE: tl.constexpr):
    head = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_t < total_tokens
    rows = offs_t.to(tl.int64)
    o = tl.load(O + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    lse_offs = head.to(tl.int64) * total_tokens + offs_t
    if HAS_DLSE:
        delta -= tl.load(DLSE + lse_offs, mask=ok, other=0.0)
    tl.store(DELTA + lse_offs, delta, mask=ok)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot, stride_dqt,
                offs_n, offs_d, lo, hi, seqlen, qk_scale, sm_scale,
                BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        if MASK:
            q_ok = offs_m < seqlen
            qT = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None], mask=q_ok[None, :], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=q_ok[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=q_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=q_ok, other=0.0)
        else:
            qT = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None])
            do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :])
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # pT[n, m] = exp(scale * k_n . q_m - lse_m), in base 2.
        pT = tl.math.exp2(mma(k, qT, INPUT_PRECISION, UPCAST) * qk_scale - lse[None, :] * 1.4426950408889634)
        if MASK:
            keep = q_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            pT = tl.where(keep, pT, 0.0)
        dv += mma(pT.to(do.dtype), do, INPUT_PRECISION, UPCAST)
        dpT = mma(v, tl.trans(do), INPUT_PRECISION, UPCAST)
        dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
        dk += mma(dsT, tl.trans(qT), INPUT_PRECISION, UPCAST)
        if ATOMIC_DQ:
            # dQ[m] += scale * sum_n dS[m, n] K[n]: this block pair's share, added in float32
            dq = mma(tl.trans(dsT), k, INPUT_PRECISION, UPCAST) * sm_scale
            dq_ptrs = dq_base + offs_m[:, None].to(tl.int64) * stride_dqt + offs_d[None, :]
            if MASK:
                tl.atomic_add(dq_ptrs, dq, mask=q_ok[:, None], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["num_seqs", "total_tokens", "tune_len"])
def history_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, cu_seqlens, blk_cu, seq_order, num_seqs, total_tokens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
    qk_scale, sm_scale, tune_len,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """dK, dV of BLOCK_N keys of one KV head (and, with ``ATOMIC_DQ``, their
    share of dQ added into the float32 ``DQ_ACC [T, Hq, D]``)."""
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq, blk = find_block(blk_cu, seq_order, pid, num_seqs, False)
    if seq < 0:
        return
    seq_start, seqlen = seq_bounds(cu_seqlens, seq, total_tokens)
    tok0 = seq_start.to(tl.int64)
    start_n = blk * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_ok = offs_n < seqlen
    k = tl.load(K + tok0 * stride_kt + kv_head * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=kv_ok[:, None], other=0.0)
    v = tl.load(V + tok0 * stride_vt + kv_head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=kv_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Query blocks [lo, a_hi) and [c_lo, seqlen) need masks (diagonal, ragged
    # tail); [b_lo, b_hi) does not.
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        full_start = lo + ((start_n + BLOCK_N - 1 - lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    else:
        lo = 0
        full_start = 0
    full_end = (seqlen // BLOCK_M) * BLOCK_M
    a_hi = tl.where(full_start < full_end, full_start, seqlen)
    b_hi = tl.maximum(full_end, a_hi)

    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_base = Q + tok0 * stride_qt + head * stride_qh
        do_base = DO + tok0 * stride_dot + head * stride_doh
        lse_base = LSE + head.to(tl.int64) * total_tokens + seq_start
        delta_base = DELTA + head.to(tl.int64) * total_tokens + seq_start
        dq_base = DQ_ACC + tok0 * stride_dqt + head * stride_dqh
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot,
                             stride_dqt, offs_n, offs_d, lo, a_hi, seqlen, qk_scale, sm_scale,
                             BLOCK_M, CAUSAL, True, INPUT_PRECISION, UPCAST, ATOMIC_DQ)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot,
                             stride_dqt, offs_n, offs_d, a_hi, b_hi, seqlen, qk_scale, sm_scale,
                             BLOCK_M, CAUSAL, False, INPUT_PRECISION, UPCAST, ATOMIC_DQ)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot,
                             stride_dqt, offs_n, offs_d, b_hi, seqlen, seqlen, qk_scale, sm_scale,
                             BLOCK_M, CAUSAL, True, INPUT_PRECISION, UPCAST, ATOMIC_DQ)

    dk *= sm_scale
    tl.store(DK + tok0 * stride_dkt + kv_head * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_ok[:, None])
    tl.store(DV + tok0 * stride_dvt + kv_head * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_ok[:, None])


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
              lo, hi, seqlen, qk_scale,
              BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        if MASK:
            kv_ok = offs_n < seqlen
            kT = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kv_ok[None, :], other=0.0)
            vT = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None], mask=kv_ok[None, :], other=0.0)
        else:
            kT = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None])
            vT = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None])
        p = tl.math.exp2(mma(q, kT, INPUT_PRECISION, UPCAST) * qk_scale - lse[:, None])
        if MASK:
            keep = kv_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        dp = mma(do, vT, INPUT_PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += mma(ds.to(kT.dtype), tl.trans(kT), INPUT_PRECISION, UPCAST)
    return dq


@triton.jit(do_not_specialize=["num_seqs", "total_tokens", "tune_len"])
def history_attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, cu_seqlens, blk_cu, seq_order, num_seqs, total_tokens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    qk_scale, sm_scale, tune_len,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    seq, blk = find_block(blk_cu, seq_order, pid, num_seqs, True)
    if seq < 0:
        return
    seq_start, seqlen = seq_bounds(cu_seqlens, seq, total_tokens)
    tok0 = seq_start.to(tl.int64)
    kv_head = head // GROUP
    start_m = blk * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    q = tl.load(Q + tok0 * stride_qt + head * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + tok0 * stride_dot + head * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse_offs = head.to(tl.int64) * total_tokens + seq_start + offs_m
    lse = tl.load(LSE + lse_offs, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + lse_offs, mask=row_ok, other=0.0)
    k_base = K + tok0 * stride_kt + kv_head * stride_kh
    v_base = V + tok0 * stride_vt + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, seqlen)
        full_end = (tl.minimum(start_m + 1, seqlen) // BLOCK_N) * BLOCK_N
    else:
        hi = seqlen
        full_end = (seqlen // BLOCK_N) * BLOCK_N
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                   0, full_end, seqlen, qk_scale, BLOCK_N, CAUSAL, False, INPUT_PRECISION, UPCAST)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                   full_end, hi, seqlen, qk_scale, BLOCK_N, CAUSAL, True, INPUT_PRECISION, UPCAST)
    dq *= sm_scale
    tl.store(DQ + tok0 * stride_dqt + head * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


def history_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None,
                          cu_seqlens: torch.Tensor, *, causal: bool, scale: float, max_seqlen: int | None = None,
                          deterministic: bool = True, dkdv_config: TileConfig | None = None,
                          dq_config: TileConfig | None = None,
                          grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward. ``lse`` is the forward's ``[Hq, T]`` float32
    log-sum-exp, ``dlse`` its incoming gradient or None. Returns
    ``(dq, dk, dv)`` in the input dtype, written into ``grads`` when given.
    ``deterministic=False`` accumulates dQ with float32 atomics in the dK/dV
    kernel instead of running the dQ kernel (see the module docstring).
    ``dkdv_config`` / ``dq_config`` fix the tiles (else autotuned on a GPU,
    the defaults elsewhere)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    dq, dk, dv = grads if grads is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    if T == 0:
        return dq, dk, dv
    num_seqs = cu_seqlens.shape[0] - 1
    delta = torch.empty((Hq, T), device=q.device, dtype=torch.float32)
    block_t = 64
    _bwd_preprocess_kernel[(triton.cdiv(T, block_t), Hq)](
        out, do, dlse if dlse is not None else lse, delta, T, Hq,
        out.stride(0), out.stride(1), do.stride(0), do.stride(1),
        HEAD_DIM=D, BLOCK_T=block_t, HAS_DLSE=dlse is not None)
    key = config_key(q)
    meta = dict(GROUP=Hq // Hkv, HEAD_DIM=D, CAUSAL=bool(causal), INPUT_PRECISION=input_precision(q.dtype),
                UPCAST=needs_upcast(q))
    tune_key = ("tune_len", "GROUP", "HEAD_DIM", "CAUSAL")
    qk_scale, tune_len = float(scale) * LOG2E, tune_bucket(max_seqlen or T)
    blk_cu, seq_order = schedule_buffers(cu_seqlens)
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if not deterministic else dk
    launch(history_attention_bwd_dkdv_kernel,
           name=f"history_attention_bwd_dkdv{key}{'' if deterministic else '-atomic'}",
           space=(DKDV_SPACES if deterministic else DKDV_ATOMIC_SPACES)[key], config=dkdv_config,
           schedule_on="BLOCK_N",
           cu_seqlens=cu_seqlens,
           grid=lambda block: (num_programs(T, num_seqs, block), Hkv),
           args=(q, k, v, do, lse, delta, dk, dv, dq_acc, cu_seqlens, blk_cu, seq_order, num_seqs, T,
                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0),
                 do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dq_acc.stride(0),
                 dq_acc.stride(1), qk_scale, float(scale), tune_len),
           meta=dict(meta, ATOMIC_DQ=not deterministic), tune_key=tune_key,
           reset_to_zero=() if deterministic else ("DQ_ACC",))
    if not deterministic:
        dq.copy_(dq_acc)
        return dq, dk, dv
    launch(history_attention_bwd_dq_kernel, name=f"history_attention_bwd_dq{key}",
           space=DQ_SPACES[key], config=dq_config, schedule_on="BLOCK_M",
           cu_seqlens=cu_seqlens,
           grid=lambda block: (num_programs(T, num_seqs, block), Hq),
           args=(q, k, v, do, lse, delta, dq, cu_seqlens, blk_cu, seq_order, num_seqs, T,
                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0),
                 do.stride(1), dq.stride(0), dq.stride(1), qk_scale, float(scale), tune_len),
           meta=meta, tune_key=tune_key)
    return dq, dk, dv
