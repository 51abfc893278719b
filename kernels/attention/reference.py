"""PyTorch reference for the attention op family (the contract).

Plain torch ops, readable before fast. Computation runs in float32 (float64 when
the inputs are float64, which is how the tests build their ground truth); the
outputs come back in the input dtype, the log-sum-exp in float32 (float64 for
float64 inputs).

``history_attention_reference`` — packed jagged ("varlen") attention:

    q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int32 [B+1]
    sequence b owns tokens cu_seqlens[b] : cu_seqlens[b+1]
    out[t, h] = softmax_j(scale * q[t, h] . k[j, h // G]) @ v[j, h // G]
    over the keys j of t's own sequence (j <= t when causal), G = Hq // Hkv
    lse[h, t] = log sum_j exp(scale * q[t, h] . k[j, h // G])   (natural log)

``beam_decode_attention_reference`` — one query per beam over the user's
prefix (shared by the W beams) followed by the beam's own suffix:

    q [B, W, Hq, D], k/v_prefix [B, S, Hkv, D], prefix_lens int [B],
    k/v_suffix [B, W, s, Hkv, D], suffix_len int (0 <= suffix_len <= s)
    keys of beam (b, w): k_prefix[b, :prefix_lens[b]] then
    k_suffix[b, w, :suffix_len]; no causal mask (the query is the newest token).

Memory is O(L^2) per sequence: this is the contract, not a fast path.
"""
from __future__ import annotations

import math

import torch

__all__ = ["history_attention_reference", "history_attention_reference_bwd", "beam_decode_attention_reference"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def history_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                cu_seqlens: torch.Tensor, *, causal: bool = True,
                                scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [T, Hq, D] in q.dtype, lse [Hq, T] float32/float64)``.

    Differentiable with torch autograd (the reference backward is autograd
    through this function)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = _acc_dtype(q.dtype)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    outs, lses = [], []
    bounds = cu_seqlens.tolist()
    for b in range(len(bounds) - 1):
        s, e = bounds[b], bounds[b + 1]
        n = e - s
        if n == 0:
            continue
        qs = qf[s:e].transpose(0, 1)                                   # [Hq, n, D]
        ks = kf[s:e].transpose(0, 1).repeat_interleave(group, dim=0)   # [Hq, n, D]
        vs = vf[s:e].transpose(0, 1).repeat_interleave(group, dim=0)
        scores = torch.matmul(qs, ks.transpose(1, 2)) * scale          # [Hq, n, n]
        if causal:
            keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)                          # [Hq, n]
        probs = torch.exp(scores - lse[..., None])
        outs.append(torch.matmul(probs, vs).transpose(0, 1))           # [n, Hq, D]
        lses.append(lse)
    out = torch.cat(outs, dim=0) if outs else qf.new_zeros((0, Hq, D))
    lse = torch.cat(lses, dim=1) if lses else qf.new_zeros((Hq, 0))
    return out.to(q.dtype), lse


def history_attention_reference_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    dlse: torch.Tensor | None, cu_seqlens: torch.Tensor, *, causal: bool = True,
                                    scale: float | None = None
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of ``history_attention_reference`` for the
    output gradient ``do [T, Hq, D]`` and the log-sum-exp gradient
    ``dlse [Hq, T]`` (or None), written out (no autograd) so that it also runs
    inside a custom op:

        p = softmax(s), dv = p^T do, dp = do v^T,
        ds = p * (dp - rowsum(do * o) + dlse), dq = scale ds k, dk = scale ds^T q
    summed over the query heads of each KV head for dk, dv.
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = _acc_dtype(q.dtype)
    qf, kf, vf, dof = q.to(acc), k.to(acc), v.to(acc), do.to(acc)
    dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
    bounds = cu_seqlens.tolist()
    for b in range(len(bounds) - 1):
        s, e = bounds[b], bounds[b + 1]
        n = e - s
        if n == 0:
            continue
        qs = qf[s:e].transpose(0, 1)                                   # [Hq, n, D]
        ks = kf[s:e].transpose(0, 1).repeat_interleave(group, dim=0)
        vs = vf[s:e].transpose(0, 1).repeat_interleave(group, dim=0)
        dos = dof[s:e].transpose(0, 1)
        scores = torch.matmul(qs, ks.transpose(1, 2)) * scale
        if causal:
            keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1)                          # [Hq, n, n]
        out = torch.matmul(probs, vs)
        dvs = torch.matmul(probs.transpose(1, 2), dos)                 # [Hq, n, D]
        dp = torch.matmul(dos, vs.transpose(1, 2))
        delta = (dos * out).sum(-1, keepdim=True)
        if dlse is not None:
            delta = delta - dlse[:, s:e, None].to(acc)
        ds = probs * (dp - delta)
        dq[s:e] = (torch.matmul(ds, ks) * scale).transpose(0, 1)
        dks = torch.matmul(ds.transpose(1, 2), qs) * scale
        dk[s:e] = dks.reshape(Hkv, group, n, D).sum(1).transpose(0, 1)
        dv[s:e] = dvs.reshape(Hkv, group, n, D).sum(1).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def beam_decode_attention_reference(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
                                    prefix_lens: torch.Tensor, k_suffix: torch.Tensor,
                                    v_suffix: torch.Tensor, suffix_len: int, *,
                                    scale: float | None = None) -> torch.Tensor:
    """Returns ``out [B, W, Hq, D]`` in q.dtype (see the module docstring)."""
    B, W, Hq, D = q.shape
    Hkv = k_prefix.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = _acc_dtype(q.dtype)
    out = q.new_empty((B, W, Hq, D), dtype=acc)
    lens = prefix_lens.tolist()
    for b in range(B):
        p = lens[b]
        kp = k_prefix[b, :p].to(acc).unsqueeze(0).expand(W, p, Hkv, D)
        vp = v_prefix[b, :p].to(acc).unsqueeze(0).expand(W, p, Hkv, D)
        ks = torch.cat([kp, k_suffix[b, :, :suffix_len].to(acc)], dim=1)   # [W, n, Hkv, D]
        vs = torch.cat([vp, v_suffix[b, :, :suffix_len].to(acc)], dim=1)
        ks = ks.repeat_interleave(group, dim=2)                             # [W, n, Hq, D]
        vs = vs.repeat_interleave(group, dim=2)
        scores = torch.einsum("whd,wnhd->whn", q[b].to(acc), ks) * scale
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("whn,wnhd->whd", probs, vs)
    return out.to(q.dtype)
