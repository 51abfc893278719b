"""Triton forward of ``history_attention``: FlashAttention-2 over packed jagged
sequences, GQA, optional causal mask; writes the output and the log-sum-exp.

Kernel, then launcher. One program computes BLOCK_M query rows of one query
head; ``grid = (cdiv(T, BLOCK_M) + B, Hq)`` over the longest-first (sequence,
q-block) schedule of ``triton_common`` (a causal sequence's last query block,
the most expensive, first). Key blocks strictly below the diagonal
(and inside the sequence) run without masks; only the diagonal / ragged tail
blocks pay for the mask; blocks above the diagonal are never visited. Query
head ``h`` reads key/value head ``h // (Hq // Hkv)``. Softmax runs in base 2
(``exp2``) with ``qk_scale = scale * log2(e)``; the stored log-sum-exp is in
natural-log units, shape ``[Hq, T]`` float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from plum_kernels.attention.triton_common import (
    FWD_SPACES,
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

LOG2E = 1.4426950408889634


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
               lo, hi, seqlen, qk_scale,
               BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        if MASK:
            kv_ok = offs_n < seqlen
            kT = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kv_ok[None, :], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
        else:
            kT = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None])
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :])
        qk = mma(q, kT, INPUT_PRECISION, UPCAST) * qk_scale
        if MASK:
            keep = kv_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, INPUT_PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["num_seqs", "total_tokens", "tune_len"])
def history_attention_fwd_kernel(
    Q, K, V, O, LSE, cu_seqlens, blk_cu, seq_order, num_seqs, total_tokens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    qk_scale, tune_len,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    seq, blk = find_block(blk_cu, seq_order, pid, num_seqs, True)
    if seq < 0:
        return
    seq_start, seqlen = seq_bounds(cu_seqlens, seq, total_tokens)
    kv_head = head // GROUP
    start_m = blk * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen

    tok0 = seq_start.to(tl.int64)
    q_base = Q + tok0 * stride_qt + head * stride_qh
    k_base = K + tok0 * stride_kt + kv_head * stride_kh
    v_base = V + tok0 * stride_vt + kv_head * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, seqlen)
        full_end = (tl.minimum(start_m + 1, seqlen) // BLOCK_N) * BLOCK_N
    else:
        hi = seqlen
        full_end = (seqlen // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                               0, full_end, seqlen, qk_scale,
                               BLOCK_N, CAUSAL, False, INPUT_PRECISION, UPCAST)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                               full_end, hi, seqlen, qk_scale,
                               BLOCK_N, CAUSAL, True, INPUT_PRECISION, UPCAST)

    acc = acc / l_i[:, None]
    o_base = O + tok0 * stride_ot + head * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + head.to(tl.int64) * total_tokens + seq_start + offs_m, lse, mask=row_ok)


def input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use "tf32x3" (three tf32 tensor-core products, about fp32
    accuracy) rather than plain tf32 to meet the fp32 error budget; "ieee"
    compiles to scalar FMA loops that take ptxas ~10x longer and run far
    slower. bf16/fp16 use the tensor cores directly."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def history_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                          *, causal: bool, scale: float, max_seqlen: int | None = None,
                          config: TileConfig | None = None, out: torch.Tensor | None = None,
                          lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Inputs are validated by the caller (ops_torch);
    q/k/v must have a contiguous last dim. Returns ``(out [T, Hq, D],
    lse [Hq, T] float32)``, written into ``out`` / ``lse`` when given
    (contiguous buffers; the tests pass NaN-poisoned ones).

    ``config`` fixes the tiles; otherwise they are autotuned on a GPU (keyed
    by ``max_seqlen`` rounded up to a power of two, the head dims, causality
    and dtype) or the default runs (``triton_common``)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty((Hq, T), device=q.device, dtype=torch.float32) if lse is None else lse
    if T == 0:
        return out, lse
    num_seqs = cu_seqlens.shape[0] - 1
    blk_cu, seq_order = schedule_buffers(cu_seqlens)
    launch(history_attention_fwd_kernel, name=f"history_attention_fwd{config_key(q)}",
           space=FWD_SPACES[config_key(q)], config=config, schedule_on="BLOCK_M",
           cu_seqlens=cu_seqlens,
           grid=lambda block: (num_programs(T, num_seqs, block), Hq),
           args=(q, k, v, out, lse, cu_seqlens, blk_cu, seq_order, num_seqs, T,
                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                 out.stride(0), out.stride(1), float(scale) * LOG2E, tune_bucket(max_seqlen or T)),
           meta=dict(GROUP=Hq // Hkv, HEAD_DIM=D, CAUSAL=bool(causal), INPUT_PRECISION=input_precision(q.dtype),
                     UPCAST=needs_upcast(q)),
           tune_key=("tune_len", "GROUP", "HEAD_DIM", "CAUSAL"))
    return out, lse
