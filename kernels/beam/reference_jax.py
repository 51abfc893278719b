"""jnp reference of the trie-constrained beam step (semantics: ``reference.py``).

Same contract as the torch reference, with JAX's static shapes: every beam's
children are gathered into a ``[B, W_in, C]`` table where ``C`` is a static
bound on the child count at ``level`` (``children_bound``), then ranked with a
three-key ``lax.sort`` (numbers before NaN before the dropped ``-inf``, see
``reference.py``, semantics 5; score descending; then flat index
``w * C + p`` ascending, i.e. parent then token). Integer outputs are int32
(JAX without ``jax_enable_x64``). XLA clamps every gather, so unchecked bad
states give undefined results, never an out-of-range access.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def children_bounds(trie) -> tuple[int, ...]:
    """Largest child count of any state at each level (at least 1), read
    from the trie arrays on the host (one transfer of ``child_ptr``).
    Requires concrete (non-traced) arrays."""
    child_ptr = np.asarray(trie.child_ptr, dtype=np.int64)
    level_ptr = np.asarray(trie.level_ptr, dtype=np.int64)
    counts = np.diff(child_ptr)
    out = []
    for l in range(trie.num_levels):
        lo, hi = int(level_ptr[l]), int(level_ptr[l + 1])
        c = int(counts[lo:hi].max()) if hi > lo else 0
        out.append(max(c, 1))
    return tuple(out)


def expand_children(nodes, trie, level: int, C: int):
    """``(token, next_state, valid)`` each ``[..., C]`` (int32, int32, bool)
    for every state of ``nodes``; see ``reference.expand_children``."""
    I = int(trie.num_internal)
    E = int(trie.num_edges)
    nodes = nodes.astype(jnp.int32)
    alive = nodes >= 0
    internal = alive & (nodes < I)
    chain = nodes >= I
    child_ptr = trie.child_ptr
    s_int = jnp.where(internal, nodes, 0)
    lo = child_ptr[s_int].astype(jnp.int32)
    cnt = jnp.where(internal, (child_ptr[s_int + 1] - child_ptr[s_int]).astype(jnp.int32), chain.astype(jnp.int32))
    p = jnp.arange(C, dtype=jnp.int32)
    valid = p < cnt[..., None]
    e = jnp.where(valid & internal[..., None], jnp.minimum(lo[..., None] + p, max(E - 1, 0)), 0)
    tok_int = trie.child_token[e].astype(jnp.int32)
    w = trie.edge_word[e].astype(jnp.int32)
    nxt_int = jnp.where(w < 0, ~w, I + e)
    word = trie.edge_word[jnp.where(chain, nodes - I, 0)].astype(jnp.int32)
    tok_chain = (word >> trie.shift[level].astype(jnp.int32)) & trie.mask[level].astype(jnp.int32)
    token = jnp.where(chain[..., None], tok_chain[..., None], tok_int)
    nxt = jnp.where(chain[..., None], nodes[..., None], nxt_int)
    return jnp.where(valid, token, 0), jnp.where(valid, nxt, -1), valid


def candidate_logits(logits, beam_scores, nodes, trie, level: int, C: int, vocab_offset: int = 0):
    """Shared front end of the jnp reference and the Pallas path: the level's
    logits ``x [B, W_in, V]`` (a slice at ``vocab_offset``), and per beam the
    children ``token``/``next`` tables and their logits ``[B, W_in, C]``
    (``-inf`` where there is no child or the beam is dead)."""
    V = int(trie.codebook_sizes[level])
    x = logits[..., vocab_offset:vocab_offset + V]
    alive = (nodes >= 0) & (beam_scores != -jnp.inf)   # a NaN beam is live (reference.py, semantics 5)
    token, nxt, valid = expand_children(jnp.where(alive, nodes, -1), trie, level, C)
    cl = jnp.take_along_axis(x, token, axis=2).astype(jnp.float32)
    cl = jnp.where(valid, cl, -jnp.inf)
    return x, token, nxt, valid, cl


def decode(flat, top, token, nxt, C: int):
    """Outputs from the flat candidate index ``w * C + p`` of each kept slot."""
    B = flat.shape[0]
    ok = top != -jnp.inf   # NaN slots are kept
    flat = jnp.where(ok, flat, 0)
    new_token = jnp.take_along_axis(token.reshape(B, -1), flat, axis=1)
    new_nodes = jnp.take_along_axis(nxt.reshape(B, -1), flat, axis=1)
    return (jnp.where(ok, top, -jnp.inf), jnp.where(ok, new_nodes, -1),
            jnp.where(ok, flat // C, 0).astype(jnp.int32), jnp.where(ok, new_token, -1))


def candidate_bias(nodes, beam_scores, trie, edge_bias, C: int, bias_row=None):
    """float32 ``[B, W_in, C]``: ``edge_bias[child_ptr[s] + p]`` (``[E]``) or
    ``edge_bias[bias_row[b], child_ptr[s] + p]`` (``[T, E]`` with ``bias_row
    [B]``, rows clamped into ``[0, T)``) for child ``p`` of a live internal
    state ``s``, ``0`` elsewhere (chain states, dead beams; see
    ``reference.candidate_bias``)."""
    I, E = int(trie.num_internal), int(trie.num_edges)
    internal = (nodes >= 0) & (nodes < I) & (beam_scores != -jnp.inf)
    lo = trie.child_ptr[jnp.where(internal, nodes, 0)].astype(jnp.int32)
    e = jnp.clip(lo[..., None] + jnp.arange(C, dtype=jnp.int32), 0, max(E - 1, 0))
    table = edge_bias.astype(jnp.float32)
    if bias_row is None:
        bias = table[e]
    else:
        row = jnp.clip(bias_row.astype(jnp.int32), 0, table.shape[0] - 1)
        bias = table[row[:, None, None], e]
    return jnp.where(internal[..., None], bias, 0.0)


def constrained_beam_step(logits, beam_scores, nodes, trie, level: int, W: int, *, normalize: str = "codebook",
                          vocab_offset: int | None = None, max_children: int | None = None, edge_bias=None,
                          bias_row=None):
    """Reference step: ``(scores [B, W] f32, nodes, parent, token [B, W] int32)``.

    ``max_children``: static bound on the child count at ``level``
    (``children_bounds(trie)[level]``); ``None`` uses the codebook size,
    always safe. ``edge_bias``: optional float32 ``[E]``, or ``[T, E]`` with
    ``bias_row`` int ``[B]``, added after the normalisation (``reference.py``,
    semantics 3)."""
    B, W_in = nodes.shape
    V = int(trie.codebook_sizes[level])
    C = int(max_children or V)
    x, token, nxt, valid, cl = candidate_logits(logits, beam_scores, nodes, trie, level, C, int(vocab_offset or 0))
    if normalize == "codebook":
        lse = jax.nn.logsumexp(x.astype(jnp.float32), axis=-1, keepdims=True)
    else:
        any_child = valid.any(-1, keepdims=True)
        lse = jnp.where(any_child, jax.nn.logsumexp(jnp.where(any_child, cl, 0.0), axis=-1, keepdims=True), 0.0)
    score = beam_scores.astype(jnp.float32)[..., None] + (cl - lse)
    if edge_bias is not None:
        score = score + candidate_bias(nodes, beam_scores, trie, edge_bias, C, bias_row)
    score = jnp.where(valid, score, -jnp.inf).reshape(B, W_in * C)
    flat = jnp.broadcast_to(jnp.arange(W_in * C, dtype=jnp.int32), score.shape)
    # three keys: numbers first, then NaN, then the dropped -inf; score descending; flat index ascending
    nan = jnp.isnan(score)
    cls = jnp.where(nan, 1, jnp.where(score == -jnp.inf, 2, 0)).astype(jnp.int32)
    _, _, idx = jax.lax.sort((cls, jnp.where(nan, 0.0, -score), flat), dimension=1, num_keys=3)
    idx = idx[:, :W]
    top = jnp.take_along_axis(score, idx, axis=1)
    if top.shape[1] < W:
        pad = W - top.shape[1]
        top = jnp.concatenate([top, jnp.full((B, pad), -jnp.inf, top.dtype)], 1)
        idx = jnp.concatenate([idx, jnp.zeros((B, pad), idx.dtype)], 1)
    return decode(idx, top, token, nxt, C)


# ----------------------------------------------------------------------------- trie_aggregate


def parent_of_edges(child_ptr, num_edges: int):
    """int32 ``[E]``: the internal node each edge leaves."""
    return (jnp.searchsorted(child_ptr, jnp.arange(num_edges, dtype=child_ptr.dtype), side="right") - 1
            ).astype(jnp.int32)


def sid_mass(item_mass, edge_item, dup_ptr, dup_items):
    """float32 ``[E]``: each chain edge's SID mass, ``0`` on internal edges (``reference.sid_mass``)."""
    m = item_mass.astype(jnp.float32)
    N, G, D = m.shape[0], dup_ptr.shape[0] - 1, dup_items.shape[0]
    ei = edge_item.astype(jnp.int32)
    out = jnp.where(ei >= 0, m[jnp.clip(ei, 0, N - 1)], 0.0)
    if G > 0 and D > 0:
        group = jnp.searchsorted(dup_ptr, jnp.arange(D, dtype=dup_ptr.dtype), side="right") - 1
        gsum = jax.ops.segment_sum(m[jnp.clip(dup_items, 0, N - 1)], group, num_segments=G, indices_are_sorted=True)
        out = jnp.where(ei <= -2, gsum[jnp.clip(-ei - 2, 0, G - 1)], out)
    return out


def aggregate_masses(item_mass, trie, edge_item, dup_ptr, dup_items):
    """``(node_mass [I], node_count [I], edge_mass [E], edge_count [E], parent [E])``:
    raw masses and SID counts (float32) below every node and edge, and each
    edge's parent node. ``L`` rounds of one segmented sum over every edge:
    after round ``k`` the nodes at depth ``>= L - k`` are exact, so the
    arrays may be traced (no host read of the level bounds)."""
    I, E, L = int(trie.num_internal), int(trie.num_edges), len(trie.codebook_sizes)
    leaf = sid_mass(item_mass, edge_item, dup_ptr, dup_items)
    w = trie.edge_word.astype(jnp.int32)
    internal = w < 0
    child = jnp.clip(~w, 0, I - 1)
    parent = parent_of_edges(trie.child_ptr, E)
    node_mass = node_count = jnp.zeros(I, jnp.float32)
    for _ in range(L + 1):   # the last round only reads the edges' masses
        edge_mass = jnp.where(internal, node_mass[child], leaf)
        edge_count = jnp.where(internal, node_count[child], 1.0)
        node_mass = jax.ops.segment_sum(edge_mass, parent, num_segments=I, indices_are_sorted=True)
        node_count = jax.ops.segment_sum(edge_count, parent, num_segments=I, indices_are_sorted=True)
    return node_mass, node_count, edge_mass, edge_count, parent


def log_ratio(edge_mass, edge_count, parent_mass, parent_count, eps: float):
    """``log(edge_mass + eps * edge_count) - log(parent_mass + eps * parent_count)`` float32."""
    eps = jnp.float32(eps)
    return jnp.log(edge_mass + eps * edge_count) - jnp.log(parent_mass + eps * parent_count)


def trie_aggregate(item_mass, trie, edge_item, dup_ptr, dup_items, eps: float):
    """jnp reference of ``trie_aggregate`` (``reference.trie_aggregate``):
    ``(node_mass [I], edge_mass [E], edge_bias [E])`` float32."""
    node_mass, node_count, edge_mass, edge_count, parent = aggregate_masses(item_mass, trie, edge_item, dup_ptr,
                                                                            dup_items)
    return node_mass, edge_mass, log_ratio(edge_mass, edge_count, node_mass[parent], node_count[parent], eps)
