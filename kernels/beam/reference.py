"""PyTorch reference of the trie-constrained beam step (contract 4).

Semantics (every implementation follows them exactly)
-----------------------------------------------------
Inputs: ``logits [B, W_in, V_total]`` (float16/bfloat16/float32), the level's
codes being ``logits[..., off : off + V]`` with ``V = codebook_sizes[level]``
and ``off = vocab_offset or 0``; ``beam_scores [B, W_in]`` float32;
``nodes [B, W_in]`` int64 trie *states* (see ``plum/sid/trie.py``: ``0 <= s <
I`` internal node, ``s >= I`` the compressed chain entered through edge
``s - I``, ``-1`` absent).

1. A beam is *live* iff ``nodes >= 0`` and ``beam_scores > -inf``; a dead
   beam contributes nothing (its logits are not read).
2. Children of a live beam at ``level``: for an internal node ``s`` the edges
   ``child_ptr[s] : child_ptr[s + 1]`` (tokens ``child_token[e]``, next state
   ``~edge_word[e]`` if ``edge_word[e] < 0`` else ``I + e``); for a chain state
   the single token ``(edge_word[s - I] >> shift[level]) & mask[level]``,
   next state ``s``.
3. Log-probabilities in float32: ``x = logits.float()``;
   ``lse = logsumexp(x[off : off + V])`` for ``normalize="codebook"`` or
   ``logsumexp`` of the children's logits for ``normalize="children"``; the
   candidate score is ``beam_score + (x[token] - lse)``, evaluated in exactly
   that order in float32.
4. Candidates whose score is ``-inf`` are dropped. The remaining
   ``(score, parent, token)`` triples of a user are ranked by **higher score
   first, then lower parent beam, then lower token**, and the first ``W`` are
   returned. Slots beyond a user's number of candidates hold score ``-inf``,
   node ``-1``, parent ``0`` and token ``-1``.

Outputs: ``scores [B, W]`` float32, ``nodes [B, W]`` int64, ``parent [B, W]``
int64 (index into the input beams), ``token [B, W]`` int64 (the code at
``level``, in ``[0, V)``).

This reference gathers every beam's children into a padded ``[B, W_in, C]``
table (``C`` = largest child count among the live beams) and sorts it; it is
meant to be read, not to be fast. Logits are never masked densely.
"""
from __future__ import annotations

import torch
from torch import Tensor




def expand_children(nodes: Tensor, trie, level: int) -> tuple[Tensor, Tensor, Tensor]:
    """Children of every state in ``nodes [...]`` at ``level``.

    Returns ``(token, next_state, valid)``, each ``[..., C]`` with ``C`` the
    largest child count (at least 1), padded where ``valid`` is False
    (token ``0``, next state ``-1``). Child ``p`` of an internal node is its
    ``p``-th edge (token order); a chain state has one child. ``-1`` states
    have none."""
    I = int(trie.num_internal)
    dev = nodes.device
    nodes = nodes.long()
    alive = nodes >= 0
    internal = alive & (nodes < I)
    chain = nodes >= I
    s_int = torch.where(internal, nodes, torch.zeros_like(nodes))
    child_ptr = trie.child_ptr.to(dev).long()
    lo = child_ptr[s_int]
    cnt = torch.where(internal, child_ptr[s_int + 1] - lo, chain.long())
    C = max(int(cnt.max()) if cnt.numel() else 1, 1)
    p = torch.arange(C, device=dev)
    valid = p < cnt[..., None]
    E = int(trie.num_edges)
    e = (lo[..., None] + p).clamp(max=max(E - 1, 0))
    e = torch.where(valid & internal[..., None], e, torch.zeros_like(e))
    child_token = trie.child_token.to(dev).long()
    edge_word = trie.edge_word.to(dev).long()
    tok_int = child_token[e]
    w = edge_word[e]
    nxt_int = torch.where(w < 0, ~w, I + e)
    # chain: one child, decoded from the packed word
    ce = torch.where(chain, nodes - I, torch.zeros_like(nodes))
    word = edge_word[ce]
    shift = int(trie.shift[level])
    mask = int(trie.mask[level])
    tok_chain = (word >> shift) & mask
    token = torch.where(chain[..., None], tok_chain[..., None].expand_as(tok_int), tok_int)
    nxt = torch.where(chain[..., None], nodes[..., None].expand_as(nxt_int), nxt_int)
    token = torch.where(valid, token, torch.zeros_like(token))
    nxt = torch.where(valid, nxt, torch.full_like(nxt, -1))
    return token, nxt, valid


def constrained_beam_step(logits: Tensor, beam_scores: Tensor, nodes: Tensor, trie, level: int, W: int, *,
                          normalize: str = "codebook", vocab_offset: int | None = None
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference step; see the module docstring. Inputs are assumed valid
    (``kernels.beam.ops_torch`` validates them)."""
    B, W_in = nodes.shape
    V = int(trie.codebook_sizes[level])
    off = int(vocab_offset or 0)
    x = logits[..., off:off + V].float()
    alive = (nodes >= 0) & (beam_scores > float("-inf"))
    token, nxt, valid = expand_children(torch.where(alive, nodes, torch.full_like(nodes, -1)), trie, level)
    C = token.shape[-1]
    child_logit = torch.gather(x, 2, token)
    child_logit = torch.where(valid, child_logit, torch.full_like(child_logit, float("-inf")))
    if normalize == "codebook":
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
    else:
        lse = torch.logsumexp(child_logit, dim=-1, keepdim=True)
        lse = torch.where(valid.any(-1, keepdim=True), lse, torch.zeros_like(lse))
    score = beam_scores.float()[..., None] + (child_logit - lse)
    score = torch.where(valid, score, torch.full_like(score, float("-inf")))
    # Flat index w * C + p orders candidates by (parent, token): children are
    # token-sorted. A stable descending sort keeps that order among ties.
    flat = score.reshape(B, W_in * C)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :W]
    top = torch.gather(flat, 1, order)
    if top.shape[1] < W:
        pad = W - top.shape[1]
        top = torch.cat([top, top.new_full((B, pad), float("-inf"))], 1)
        order = torch.cat([order, order.new_zeros((B, pad))], 1)
    ok = top > float("-inf")
    parent = torch.where(ok, order // C, torch.zeros_like(order))
    new_token = torch.where(ok, torch.gather(token.reshape(B, -1), 1, order), torch.full_like(order, -1))
    new_nodes = torch.where(ok, torch.gather(nxt.reshape(B, -1), 1, order), torch.full_like(order, -1))
    return top, new_nodes, parent, new_token

