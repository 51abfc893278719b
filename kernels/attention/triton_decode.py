"""Triton ``beam_decode_attention``: W beams of a user over the user's prefix KV,
read once, plus each beam's own suffix KV.

Two kernels, then the launcher:

1. ``beam_decode_prefix_kernel`` — grid ``(num_splits, Hkv * row_blocks, B)``.
   The ``R = W * G`` query rows that share KV head ``h`` (every beam ``w`` and
   every query head ``h * G + g`` of the group, row ``r = w * G + g``) form one
   ``[BLOCK_R, D]`` matrix, so each key block is loaded once and multiplied by
   all of them with ``tl.dot`` (tensor cores; BLOCK_R >= 64). The prefix
   length is split ``num_splits`` ways (split-K) for parallelism; each split
   writes its normalized partial output and log-sum-exp (float32).
2. ``beam_decode_merge_kernel`` — grid ``(W, Hkv, B)``: for the G rows of one
   beam and KV head, merges the prefix partials by log-sum-exp, then runs the
   beam's few suffix keys (``suffix_len`` of them) through the same online
   softmax, and writes the output.

With ``R > 128`` (e.g. W = 64, G = 4) the rows are cut into ``row_blocks``
blocks of 128, which read the same key blocks at the same time (served from
L2, not HBM).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from plum_kernels.attention.triton_common import _check_block, mma, needs_upcast
from plum_kernels.attention.triton_fwd import LOG2E, input_precision
from plum_kernels.hopper import compiled_blocks_per_sm

# Multiprocessors assumed off-GPU (the interpreter): an H100 / H200's 132, one
# block each; on a GPU the wave is read from the device and the compiled kernel.
DEFAULT_WAVE = 132
_waves: dict = {}


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tiles of the two decode kernels (``block_r`` >= 64: wgmma rows)."""

    block_r: int     # query rows (beams x heads of a group) per program
    block_n: int     # prefix keys per step
    block_s: int     # suffix keys per step of the merge kernel
    num_warps: int
    num_stages: int

    def __post_init__(self):
        _check_block("block_r", self.block_r, 64)
        _check_block("block_n", self.block_n)
        _check_block("block_s", self.block_s, 1)
        if self.num_warps not in (4, 8):
            raise ValueError(f"num_warps must be 4 or 8, got {self.num_warps}")


# Shipped configurations, keyed by (head_dim, element size, 64 when the W x G
# query rows of a KV head are <= 64, else 128). Each is compiled for sm_90 in
# tests/kernels/attention/test_aot.py from a recorded launch: no spills, shared memory
# within the limit, wgmma for 16-bit inputs. fp32 at D = 128 steps over 16 keys,
# unpipelined (its tf32x3 products spill with 32 keys or a second stage). The merge kernel's 8 suffix keys per step
# cover PLUM's SID lengths in one step (16 spilled at D = 128).
DECODE_CONFIGS: dict[tuple[int, int, int], DecodeConfig] = {
    (64, 2, 64): DecodeConfig(64, 128, 8, num_warps=4, num_stages=3),
    (64, 2, 128): DecodeConfig(128, 64, 8, num_warps=8, num_stages=3),
    (128, 2, 64): DecodeConfig(64, 64, 8, num_warps=4, num_stages=3),
    (128, 2, 128): DecodeConfig(128, 64, 8, num_warps=8, num_stages=3),
    (64, 4, 64): DecodeConfig(64, 64, 8, num_warps=4, num_stages=2),
    (64, 4, 128): DecodeConfig(128, 32, 8, num_warps=8, num_stages=2),
    (128, 4, 64): DecodeConfig(64, 16, 8, num_warps=4, num_stages=1),
    (128, 4, 128): DecodeConfig(64, 16, 8, num_warps=4, num_stages=1),
}


def decode_config(head_dim: int, element_size: int, rows: int) -> DecodeConfig:
    return DECODE_CONFIGS[(head_dim, element_size, 64 if rows <= 64 else 128)]


@triton.jit
def beam_decode_prefix_kernel(
    Q, K, V, prefix_lens, O_PART, L_PART, num_rows, num_row_blocks, split_size, num_splits, prefix_capacity,
    stride_qb, stride_qw, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    split = tl.program_id(0)
    kv_head = tl.program_id(1) // num_row_blocks
    row_block = tl.program_id(1) % num_row_blocks
    b = tl.program_id(2).to(tl.int64)
    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    beam = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + beam[:, None] * stride_qw + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)

    # clamped to the cache capacity: keys are addressed in [0, S) whatever prefix_lens holds
    plen = tl.minimum(tl.maximum(tl.load(prefix_lens + b), 0), prefix_capacity)
    start = split * split_size
    end = tl.minimum(start + split_size, plen)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < end
        kT = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_ks + offs_d[:, None], mask=kv_ok[None, :],
                     other=0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=kv_ok[:, None],
                    other=0.0)
        qk = mma(q, kT, INPUT_PRECISION, UPCAST) * qk_scale
        qk = tl.where(kv_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, INPUT_PRECISION, UPCAST)
        m_i = m_new

    has = l_i > 0.0
    acc = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    num_kv_heads = tl.num_programs(1) // num_row_blocks
    part = ((b * num_kv_heads + kv_head) * num_splits + split) * num_rows + rows
    tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(L_PART + part, lse, mask=row_ok)


@triton.jit
def beam_decode_merge_kernel(
    Q, KS, VS, O_PART, L_PART, OUT, suffix_len, num_kv_heads, num_splits, scale,
    stride_qb, stride_qw, stride_qh, stride_ksb, stride_ksw, stride_kss, stride_ksh,
    stride_vsb, stride_vsw, stride_vss, stride_vsh, stride_ob, stride_ow, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    beam = tl.program_id(0)
    kv_head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    head = kv_head * GROUP + g
    offs_d = tl.arange(0, HEAD_DIM)
    num_rows = tl.num_programs(0) * GROUP
    rows = beam * GROUP + g

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    for split in range(num_splits):
        part = ((b * num_kv_heads + kv_head) * num_splits + split) * num_rows + rows
        lse_s = tl.load(L_PART + part, mask=g_ok, other=float("-inf"))
        o_s = tl.load(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=g_ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        w_s = tl.exp(lse_s - m_safe)
        acc = acc * alpha[:, None] + w_s[:, None] * o_s
        l_i = l_i * alpha + w_s
        m_i = m_new

    q = tl.load(Q + b * stride_qb + beam * stride_qw + head[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0).to(tl.float32)
    ks_base = KS + b * stride_ksb + beam * stride_ksw + kv_head * stride_ksh
    vs_base = VS + b * stride_vsb + beam * stride_vsw + kv_head * stride_vsh
    for start_s in range(0, suffix_len, BLOCK_S):
        offs_s = start_s + tl.arange(0, BLOCK_S)
        s_ok = offs_s < suffix_len
        ks = tl.load(ks_base + offs_s[:, None] * stride_kss + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        vs = tl.load(vs_base + offs_s[:, None] * stride_vss + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        scores = tl.sum(q[:, None, :] * ks.to(tl.float32)[None, :, :], axis=2) * scale   # [BLOCK_G, BLOCK_S]
        scores = tl.where(s_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vs.to(tl.float32)[None, :, :], axis=1)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(OUT + b * stride_ob + beam * stride_ow + head[:, None] * stride_oh + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=g_ok[:, None])


def choose_splits(batch: int, kv_heads: int, row_blocks: int, prefix_capacity: int, block_n: int,
                  wave: int = DEFAULT_WAVE) -> tuple[int, int]:
    """``(num_splits, split_size)``: enough prefix splits that the grid fills
    at least one ``wave`` (programs resident at once on the whole GPU), each
    split a multiple of ``block_n`` keys."""
    progs = max(batch * kv_heads * row_blocks, 1)
    max_splits = max(triton.cdiv(prefix_capacity, block_n), 1)
    splits = max(1, min(max_splits, triton.cdiv(wave, progs)))
    split_size = triton.cdiv(triton.cdiv(max(prefix_capacity, 1), splits), block_n) * block_n
    return triton.cdiv(max(prefix_capacity, 1), split_size), split_size


def prefix_wave(device: torch.device, cfg: DecodeConfig, args: tuple, meta: dict) -> int:
    """Programs of ``beam_decode_prefix_kernel`` resident at once: multiprocessors
    x blocks per multiprocessor of the kernel as compiled (its registers and
    shared memory; one compile per configuration and process). ``DEFAULT_WAVE``
    off-GPU."""
    if device.type != "cuda":
        return DEFAULT_WAVE
    key = (device.index, cfg, tuple(sorted(meta.items())))
    if key not in _waves:
        compiled = beam_decode_prefix_kernel.warmup(*args, grid=(1,), **meta, num_warps=cfg.num_warps,
                                                    num_stages=cfg.num_stages)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        _waves[key] = sms * compiled_blocks_per_sm(compiled, cfg.num_warps)
    return _waves[key]


def beam_decode_attention_fwd(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
                              prefix_lens: torch.Tensor, k_suffix: torch.Tensor, v_suffix: torch.Tensor,
                              suffix_len: int, *, scale: float, config: DecodeConfig | None = None,
                              num_splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch both kernels (inputs validated by ops_torch; last dims
    contiguous). Returns ``out [B, W, Hq, D]`` in q.dtype (written into
    ``out`` when given). ``num_splits`` overrides the split-K heuristic."""
    B, W, Hq, D = q.shape
    S, Hkv = k_prefix.shape[1], k_prefix.shape[2]
    group = Hq // Hkv
    rows = W * group
    cfg = config or decode_config(D, q.element_size(), rows)
    row_blocks = triton.cdiv(rows, cfg.block_r)
    meta = dict(GROUP=group, HEAD_DIM=D, BLOCK_R=cfg.block_r, BLOCK_N=cfg.block_n,
                INPUT_PRECISION=input_precision(q.dtype), UPCAST=needs_upcast(q))

    def prefix_args(splits: int, split_size: int, o_part, l_part) -> tuple:
        return (q, k_prefix, v_prefix, prefix_lens, o_part, l_part, rows, row_blocks, split_size, splits, S,
                q.stride(0), q.stride(1), q.stride(2), k_prefix.stride(0), k_prefix.stride(1), k_prefix.stride(2),
                v_prefix.stride(0), v_prefix.stride(1), v_prefix.stride(2), float(scale) * LOG2E)

    if num_splits is not None:
        split_size = triton.cdiv(triton.cdiv(max(S, 1), num_splits), cfg.block_n) * cfg.block_n
        splits = triton.cdiv(max(S, 1), split_size)
    else:
        splits, split_size = choose_splits(B, Hkv, row_blocks, S, cfg.block_n)
        if q.device.type == "cuda":
            probe = torch.empty(1, device=q.device, dtype=torch.float32)
            wave = prefix_wave(q.device, cfg, prefix_args(splits, split_size, probe, probe), meta)
            splits, split_size = choose_splits(B, Hkv, row_blocks, S, cfg.block_n, wave)
    out = torch.empty_like(q) if out is None else out
    o_part = torch.empty((B, Hkv, splits, rows, D), device=q.device, dtype=torch.float32)
    l_part = torch.empty((B, Hkv, splits, rows), device=q.device, dtype=torch.float32)
    beam_decode_prefix_kernel[(splits, Hkv * row_blocks, B)](
        *prefix_args(splits, split_size, o_part, l_part), **meta,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    beam_decode_merge_kernel[(W, Hkv, B)](
        q, k_suffix, v_suffix, o_part, l_part, out, int(suffix_len), Hkv, splits, float(scale),
        q.stride(0), q.stride(1), q.stride(2),
        k_suffix.stride(0), k_suffix.stride(1), k_suffix.stride(2), k_suffix.stride(3),
        v_suffix.stride(0), v_suffix.stride(1), v_suffix.stride(2), v_suffix.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=group, BLOCK_G=max(triton.next_power_of_2(group), 2), HEAD_DIM=D, BLOCK_S=cfg.block_s,
        num_warps=4)
    return out
