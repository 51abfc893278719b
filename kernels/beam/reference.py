"""PyTorch reference of the trie-constrained beam step (docs/design.md, 'constrained_beam_step').

Semantics (every implementation follows them exactly)
-----------------------------------------------------
Inputs: ``logits [B, W_in, V_total]`` (float16/bfloat16/float32), the level's
codes being ``logits[..., off : off + V]`` with ``V = codebook_sizes[level]``
and ``off = vocab_offset or 0``; ``beam_scores [B, W_in]`` float32;
``nodes [B, W_in]`` int64 trie *states* (docs/design.md, 'States', and
``plum/sid/trie.py``: ``0 <= s < I`` internal node, ``s >= I`` the compressed
chain entered through edge ``s - I``, ``-1`` absent).

1. A beam is *live* iff ``nodes >= 0`` and ``beam_scores != -inf`` (a NaN
   score is live); a dead beam contributes nothing (its logits are not read).
2. Children of a live beam at ``level``: for an internal node ``s`` the edges
   ``child_ptr[s] : child_ptr[s + 1]`` (tokens ``child_token[e]``, next state
   ``~edge_word[e]`` if ``edge_word[e] < 0`` else ``I + e``); for a chain state
   the single token ``(edge_word[s - I] >> shift[level]) & mask[level]``,
   next state ``s``.
3. Log-probabilities in float32: ``x = logits.float()``;
   ``lse = logsumexp(x[off : off + V])`` for ``normalize="codebook"`` or
   ``logsumexp`` of the children's logits for ``normalize="children"``; the
   candidate score is ``beam_score + (x[token] - lse)``, evaluated in exactly
   that order in float32. With ``edge_bias`` (float32 ``[E]``, one value per
   edge of the trie's edge arrays, e.g. ``trie_aggregate``'s log-ratios) the
   score is ``(beam_score + (x[token] - lse)) + edge_bias[e]``, ``e`` the edge
   of the candidate: after the normalisation, which the bias does not enter.
   A ``[T, E]`` table with ``bias_row [B]`` adds ``edge_bias[bias_row[b], e]``.
   A chain state's candidate (inside a chain, below its entry edge) adds
   ``0``. A ``-inf`` bias drops the edge's candidates; a NaN bias makes
   them NaN (semantics 5).
4. Candidates whose score is ``-inf`` are dropped. The remaining
   ``(score, parent, token)`` triples of a user are ranked by **higher score
   first, then lower parent beam, then lower token**, and the first ``W`` are
   returned. Slots beyond a user's number of candidates hold score ``-inf``,
   node ``-1``, parent ``0`` and token ``-1``.
5. Non-finite values. A NaN candidate score (a NaN logit or beam score; with
   ``normalize="codebook"`` one NaN anywhere in a live beam's row makes the
   log-sum-exp, hence every candidate of that beam, NaN; ``+inf`` logits give
   ``inf - inf = NaN`` too) is *kept*: it ranks after every non-NaN candidate
   and before the dropped ones, NaNs among themselves by parent, then token,
   and its slot holds score NaN with its real node, parent and token. So NaN
   propagates to the end of a search and is never mistaken for an empty slot;
   callers detect it with ``isnan(scores)``.

Outputs: ``scores [B, W]`` float32, ``nodes [B, W]`` int64, ``parent [B, W]``
int64 (index into the input beams), ``token [B, W]`` int64 (the code at
``level``, in ``[0, V)``).

This reference gathers every beam's children into a padded ``[B, W_in, C]``
table (``C`` = largest child count among the live beams) and sorts it; it is
meant to be read, not to be fast. Logits are never masked densely. Indices
read from ``nodes`` or the trie are clamped into their arrays before they are
used as addresses, so unchecked bad states (``validate=False``) give
undefined results, never an out-of-range access.
"""
from __future__ import annotations

import torch
from torch import Tensor

NAN_RANK = -3.5e38   # float64, between -inf and the lowest float32 (-3.4028e38): where a NaN score ranks


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
    e = (lo[..., None] + p).clamp(0, max(E - 1, 0))
    e = torch.where(valid & internal[..., None], e, torch.zeros_like(e))
    child_token = trie.child_token.to(dev).long()
    edge_word = trie.edge_word.to(dev).long()
    tok_int = child_token[e]
    w = edge_word[e]
    nxt_int = torch.where(w < 0, ~w, I + e)
    # chain: one child, decoded from the packed word
    ce = torch.where(chain, nodes - I, torch.zeros_like(nodes)).clamp(0, max(E - 1, 0))
    word = edge_word[ce]
    shift = int(trie.shift[level])
    mask = int(trie.mask[level])
    tok_chain = (word >> shift) & mask
    token = torch.where(chain[..., None], tok_chain[..., None].expand_as(tok_int), tok_int)
    nxt = torch.where(chain[..., None], nodes[..., None].expand_as(nxt_int), nxt_int)
    token = torch.where(valid, token, torch.zeros_like(token))
    nxt = torch.where(valid, nxt, torch.full_like(nxt, -1))
    return token, nxt, valid


def candidate_bias(nodes: Tensor, trie, edge_bias: Tensor, C: int, bias_row: Tensor | None = None) -> Tensor:
    """``edge_bias[e]`` (``[E]``) or ``edge_bias[bias_row[b], e]`` (``[T, E]``
    with ``bias_row [B]``), float32 ``[B, W_in, C]`` for child ``p < C`` of
    every state of ``nodes [B, W_in]``: edge ``e = child_ptr[s] + p`` of an
    internal node ``s``; ``0`` for a chain state (its child lies inside the
    chain) and for ``-1`` (the caller masks the missing children). Rows are
    clamped into ``[0, T)``."""
    I, E = int(trie.num_internal), int(trie.num_edges)
    internal = (nodes >= 0) & (nodes < I)
    s = torch.where(internal, nodes, torch.zeros_like(nodes)).long()
    lo = trie.child_ptr.to(nodes.device).long()[s]
    e = (lo[..., None] + torch.arange(C, device=nodes.device)).clamp(0, max(E - 1, 0))
    if bias_row is None:
        bias = edge_bias.float()[e]
    else:
        row = bias_row.to(nodes.device).long().clamp(0, edge_bias.shape[0] - 1)
        bias = edge_bias.float()[row[:, None, None], e]
    return torch.where(internal[..., None], bias, torch.zeros_like(bias))


def constrained_beam_step(logits: Tensor, beam_scores: Tensor, nodes: Tensor, trie, level: int, W: int, *,
                          normalize: str = "codebook", vocab_offset: int | None = None,
                          edge_bias: Tensor | None = None, bias_row: Tensor | None = None
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference step; see the module docstring. Inputs are assumed valid
    (``plum_kernels.beam.ops_torch`` validates them). ``edge_bias``: optional
    float32 ``[E]``, or ``[T, E]`` with ``bias_row`` int ``[B]`` (user ``b``
    reads row ``bias_row[b]``; semantics 3)."""
    B, W_in = nodes.shape
    V = int(trie.codebook_sizes[level])
    off = int(vocab_offset or 0)
    x = logits[..., off:off + V].float()
    alive = (nodes >= 0) & (beam_scores != float("-inf"))
    token, nxt, valid = expand_children(torch.where(alive, nodes, torch.full_like(nodes, -1)), trie, level)
    C = token.shape[-1]
    child_logit = torch.gather(x, 2, token.clamp(0, V - 1))
    child_logit = torch.where(valid, child_logit, torch.full_like(child_logit, float("-inf")))
    if normalize == "codebook":
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
    else:
        lse = torch.logsumexp(child_logit, dim=-1, keepdim=True)
        lse = torch.where(valid.any(-1, keepdim=True), lse, torch.zeros_like(lse))
    score = beam_scores.float()[..., None] + (child_logit - lse)
    if edge_bias is not None:
        score = score + candidate_bias(torch.where(alive, nodes, torch.full_like(nodes, -1)), trie, edge_bias, C,
                                       bias_row)
    score = torch.where(valid, score, torch.full_like(score, float("-inf")))
    # Flat index w * C + p orders candidates by (parent, token): children are
    # token-sorted. A stable descending sort keeps that order among ties. NaN
    # ranks below every float32 number and above -inf (NAN_RANK, in float64).
    flat = score.reshape(B, W_in * C)
    key = torch.where(torch.isnan(flat), torch.full_like(flat, NAN_RANK, dtype=torch.float64), flat.double())
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :W]
    top = torch.gather(flat, 1, order)
    if top.shape[1] < W:
        pad = W - top.shape[1]
        top = torch.cat([top, top.new_full((B, pad), float("-inf"))], 1)
        order = torch.cat([order, order.new_zeros((B, pad))], 1)
    ok = top != float("-inf")   # NaN slots are kept (semantics 5)
    parent = torch.where(ok, order // C, torch.zeros_like(order))
    new_token = torch.where(ok, torch.gather(token.reshape(B, -1), 1, order), torch.full_like(order, -1))
    new_nodes = torch.where(ok, torch.gather(nxt.reshape(B, -1), 1, order), torch.full_like(order, -1))
    return top, new_nodes, parent, new_token



# ----------------------------------------------------------------------------- trie_aggregate


def parent_of_edges(child_ptr: Tensor, num_edges: int) -> Tensor:
    """int64 ``[E]``: the internal node each edge leaves (``child_ptr`` is sorted)."""
    counts = (child_ptr[1:] - child_ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=child_ptr.device), counts, output_size=num_edges)


def sid_mass(item_mass: Tensor, edge_item: Tensor, dup_ptr: Tensor, dup_items: Tensor) -> Tensor:
    """``[E]`` in ``item_mass``'s accumulation dtype (float32, or float64 for
    float64): on a chain edge the mass of its SID (its one item's mass, or the
    sum over its collision group's items, in group order); ``0`` on internal
    edges. Item ids are clamped into ``[0, N)`` as addresses."""
    acc = torch.float64 if item_mass.dtype == torch.float64 else torch.float32
    m = item_mass.to(acc)
    N, G = m.shape[0], dup_ptr.shape[0] - 1
    ei = edge_item.long()
    out = torch.where(ei >= 0, m[ei.clamp(0, N - 1)], torch.zeros((), dtype=acc, device=m.device))
    if G > 0 and dup_items.numel():
        group = torch.repeat_interleave(torch.arange(G, device=m.device), (dup_ptr[1:] - dup_ptr[:-1]).long(),
                                        output_size=dup_items.numel())
        gsum = torch.zeros(G, dtype=acc, device=m.device).index_add_(0, group, m[dup_items.long().clamp(0, N - 1)])
        out = torch.where(ei <= -2, gsum[(-ei - 2).clamp(0, G - 1)], out)
    return out


def trie_aggregate(item_mass: Tensor, trie, edge_item: Tensor, dup_ptr: Tensor, dup_items: Tensor,
                   eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of ``trie_aggregate`` (docs/design.md, 'trie_aggregate').

    ``item_mass [N]`` float32 / float64, indexed by item id; the item arrays
    of ``SIDTrie`` (``edge_item [E]``, ``dup_ptr [C + 1]``, ``dup_items [D]``).
    Returns ``(node_mass [I], edge_mass [E], edge_bias [E])``: raw masses in
    the accumulation dtype (float32, float64 for float64) and
    ``edge_bias[e] = log(edge_mass[e] + eps * leaves(e)) - log(node_mass[p] + eps * leaves(p))``,
    ``p`` the node edge ``e`` leaves and ``leaves`` the number of SIDs below.
    Levels are summed bottom-up; the host reads ``level_ptr`` and
    ``child_ptr`` (reference only)."""
    I, E = int(trie.num_internal), int(trie.num_edges)
    edge_mass = sid_mass(item_mass, edge_item, dup_ptr, dup_items)
    acc = edge_mass.dtype
    child_ptr = trie.child_ptr.long()
    word = trie.edge_word.long()
    internal = word < 0
    child = torch.where(internal, ~word, torch.zeros_like(word)).clamp(0, I - 1)
    edge_count = (~internal).to(acc)
    node_mass = torch.zeros(I, dtype=acc, device=edge_mass.device)
    node_count = torch.zeros(I, dtype=acc, device=edge_mass.device)
    parent = parent_of_edges(child_ptr, E)
    level_ptr = [int(v) for v in trie.level_ptr.tolist()]
    for d in reversed(range(len(level_ptr) - 1)):
        lo, hi = int(child_ptr[level_ptr[d]]), int(child_ptr[level_ptr[d + 1]])
        sl = slice(lo, hi)
        edge_mass[sl] = torch.where(internal[sl], node_mass[child[sl]], edge_mass[sl])
        edge_count[sl] = torch.where(internal[sl], node_count[child[sl]], edge_count[sl])
        node_mass.index_add_(0, parent[sl], edge_mass[sl])
        node_count.index_add_(0, parent[sl], edge_count[sl])
    smooth_edge = edge_mass + eps * edge_count
    smooth_node = node_mass + eps * node_count
    bias = torch.log(smooth_edge) - torch.log(smooth_node[parent])
    return node_mass, edge_mass, bias
