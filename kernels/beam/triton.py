"""Triton kernels of the trie-constrained beam step (semantics: ``reference.py``).

Two launches, no ``[B, W, V]`` mask:

1. ``_expand_kernel``, one program per (user, beam): the row log-sum-exp over
   the level's codebook (online, ``BLOCK_V`` at a time; skipped for
   ``normalize="children"``, which takes it over the children), then the
   beam's best ``KP`` children (a beam never needs more than ``W``). Each
   candidate is one int64 *key*; the beam's keys are written sorted, best first,
   to a ``[B, W_in, KP]`` scratch. Internal nodes read their CSR edges
   ``KP`` at a time (``tl.sort`` of the block, then a bitonic merge into the
   running best); a compressed chain has exactly one child (no CSR read).
2. ``_select_kernel``, one program per user: merges the ``W_in`` sorted lists
   into the best ``KP`` with bitonic merges (``GROUP`` lists at a time as a
   tree in registers, then into the running result), decodes the first ``W``
   keys into (score, node, parent, token).

Keys. ``key = (ord(score) << 32) + (2**32 - 1 - (parent << 23 | p))`` with
``ord`` the order-preserving int32 view of a float32 and ``p`` the child's
position among its node's token-sorted edges, so a larger key is exactly
"higher score, then lower parent, then lower token" (the documented order).
``SENTINEL = -2**63`` marks no candidate. Hence ``W_in <= 512`` and
``V <= 2**23``, validated by the caller. A NaN score is kept with the key
``_NAN_ORD``, below every number (reference.py, semantics 5).

Memory safety: every edge index and code read from ``nodes`` or the trie is
clamped into its array (``_edge``, ``_code``) before it forms an address, so
unchecked bad states (``validate=False``) give undefined results but never an
out-of-range access.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .._autotune import wrapped
from .checks import MAX_BEAM  # noqa: F401  (parent index takes 9 bits of the key)

POS_BITS = 23         # child position takes the other 23
MAX_CHILDREN = 1 << POS_BITS
SENTINEL = -(2**63)
_SENT = tl.constexpr(SENTINEL)   # the same, usable inside kernels
# Ordered value of every NaN score: ord(-inf) - 1, below every number (-inf
# candidates are dropped, so nothing kept ranks lower); it decodes back to a
# NaN (bits 0xFF800001).
_NAN_ORD = tl.constexpr(-2139095042)


@dataclasses.dataclass(frozen=True)
class BeamBlocks:
    """Launch configuration of the two kernels.

    ``block_v``: logits read per iteration of the row log-sum-exp (1024 bf16
    = 2 KiB per load; the row is 2048 wide for PLUM's first level).
    ``group``: sorted lists merged per iteration of the select kernel;
    ``None`` picks ``max(2, min(16, 4096 // KP))`` (at most 4096 keys, 32 KiB,
    in registers). ``num_warps``: ``None`` picks 4 up to ``KP = 128`` and 8
    above.

    The defaults at every shipped ``KP`` (``SHIPPED_KP``) are compiled for
    sm_90 from recorded launches by ``tests/kernels/beam/test_aot.py``: no
    register spills (at most 74 registers per thread) and shared memory
    within the limit. They are chosen to fit, not by timing.
    """

    block_v: int = 1024
    group: int | None = None
    num_warps: int | None = None

    def __post_init__(self):
        if self.block_v < 16 or self.block_v & (self.block_v - 1):
            raise ValueError(f"block_v must be a power of two >= 16, got {self.block_v}")
        if self.group is not None and (self.group < 2 or self.group & (self.group - 1)):
            raise ValueError(f"group must be a power of two >= 2, got {self.group}")
        if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps}")

    def kp(self, W: int) -> int:
        return max(16, triton.next_power_of_2(W))

    def group_for(self, kp: int) -> int:
        return self.group if self.group is not None else max(2, min(16, 4096 // kp))

    def warps_for(self, kp: int) -> int:
        return self.num_warps if self.num_warps is not None else (4 if kp <= 128 else 8)


DEFAULT_BLOCKS = BeamBlocks()
# Every per-beam list length the op can launch with (W <= 512).
SHIPPED_KP = (16, 32, 64, 128, 256, 512)


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _make_key(score, parent, pos):
    """int64 key, larger = better (score desc, parent asc, pos asc); every
    NaN gets ``_NAN_ORD``, below every number (reference.py, semantics 5)."""
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    ordered = tl.where(score != score, _NAN_ORD, ordered)
    idx = parent.to(tl.int64) * (1 << 23) + pos.to(tl.int64)
    return (ordered.to(tl.int64) << 32) + (0xFFFFFFFF - idx)


@triton.jit
def _edge(e, num_edges):
    """Edge index clamped into ``[0, E)``: an address in the edge arrays
    whatever an unchecked state or a damaged trie holds."""
    return tl.maximum(tl.minimum(e, num_edges - 1), 0)


@triton.jit
def _code(tok, V):
    """Code clamped into ``[0, V)``: an address in the level's logits."""
    return tl.maximum(tl.minimum(tok, V - 1), 0)


@triton.jit
def _key_score(key):
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _key_index(key):
    return 0xFFFFFFFF - (key & 0xFFFFFFFF)


@triton.jit
def _compare_exchange(x, R: tl.constexpr, N: tl.constexpr, I: tl.constexpr, MODE: tl.constexpr):
    """Stage ``I`` of a bitonic merge of each row of ``x [R, N]``: elements
    ``N >> (I + 1)`` apart are compared and exchanged."""
    a, b = tl.split(tl.permute(tl.reshape(x, [R << I, 2, N >> (I + 1)]), [0, 2, 1]))
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    if MODE == 2:
        desc = (((tl.arange(0, R << I) >> I) % 2) == 0)[:, None]
        first = tl.where(desc, hi, lo)
        second = tl.where(desc, lo, hi)
    elif MODE == 1:
        first = lo
        second = hi
    else:
        first = hi
        second = lo
    return tl.reshape(tl.permute(tl.join(first, second), [0, 2, 1]), [R, N])


@triton.jit
def _bitonic_merge(x, R: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr, MODE: tl.constexpr):
    """Sort each row of ``x [R, N]``, a bitonic sequence, with log2(N)
    compare-exchange stages. ``MODE``: 0 every row descending, 1 every row
    ascending, 2 even rows descending and odd rows ascending."""
    for i in tl.static_range(LOG_N):
        x = _compare_exchange(x, R, N, i, MODE)
    return x


@triton.jit
def _merge_into(best, blk, KP: tl.constexpr, LOG_KP: tl.constexpr, MODE: tl.constexpr):
    """Best ``KP`` of two sorted ``[KP]`` lists in opposite orders, sorted
    descending (``MODE=0``) or ascending (``MODE=1``): the element-wise max is
    a bitonic sequence holding exactly them."""
    x = tl.reshape(tl.maximum(best, blk), [1, KP])
    return tl.reshape(_bitonic_merge(x, 1, KP, LOG_KP, MODE), [KP])


@triton.jit
def _tree_level(t, GROUP: tl.constexpr, KP: tl.constexpr, LOG_KP: tl.constexpr, LVL: tl.constexpr):
    """Pairs rows ``2r`` (descending) and ``2r + 1`` (ascending) of ``t`` into
    row ``r`` holding their best ``KP``: ``[GROUP >> LVL, KP] -> [GROUP >> (LVL + 1), KP]``,
    rows alternating descending / ascending again."""
    a, c = tl.split(tl.permute(tl.reshape(t, [GROUP >> (LVL + 1), 2, KP]), [0, 2, 1]))
    return _bitonic_merge(tl.maximum(a, c), GROUP >> (LVL + 1), KP, LOG_KP, 2)


@triton.jit
def _row_lse(row_ptr, V, BLOCK_V: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    m_i = -float("inf")
    l_i = 0.0
    for start in range(0, V, BLOCK_V):
        x = tl.load(row_ptr + start + offs, mask=start + offs < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(x, 0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
        m_i = m_new
    return m_i + tl.log(l_i)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _expand_kernel(logits_ptr, stride_lb, stride_lw, scores_ptr, nodes_ptr,
                   child_ptr_ptr, child_token_ptr, edge_word_ptr, bias_ptr, bias_row_ptr, keys_ptr,
                   W_in, V, vocab_offset, num_internal, num_edges, num_rows, shift, mask,
                   KP: tl.constexpr, LOG_KP: tl.constexpr, BLOCK_V: tl.constexpr,
                   CHILDREN_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_ROWS: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // W_in
    w = pid % W_in
    s = tl.load(nodes_ptr + pid)
    beam = tl.load(scores_ptr + pid).to(tl.float32)
    row = logits_ptr + b.to(tl.int64) * stride_lb + w.to(tl.int64) * stride_lw + vocab_offset
    j = tl.arange(0, KP)
    best = tl.full([KP], _SENT, tl.int64)
    bias_base = bias_ptr
    if BIAS_ROWS:   # the user's row of the [T, E] table, clamped into [0, T)
        bias_row = tl.minimum(tl.maximum(tl.load(bias_row_ptr + b).to(tl.int64), 0), num_rows - 1)
        bias_base = bias_ptr + bias_row * num_edges
    if (s >= 0) & (beam != -float("inf")):   # a NaN beam is live
        if s >= num_internal:
            # compressed chain: exactly one child, decoded from the packed word
            word = tl.load(edge_word_ptr + _edge(s - num_internal, num_edges))
            tok = (word >> shift) & mask
            x = tl.load(row + _code(tok, V)).to(tl.float32)
            if CHILDREN_NORM:
                lse = x
            else:
                lse = _row_lse(row, V, BLOCK_V)
            sc = beam + (x - lse)
            key = tl.where(j == 0, _make_key(sc, w, j), _SENT)
            best = tl.where(sc != -float("inf"), key, _SENT)
        else:
            lo = tl.load(child_ptr_ptr + s)
            n = tl.load(child_ptr_ptr + s + 1) - lo
            if CHILDREN_NORM:
                m_i = -float("inf")
                l_i = 0.0
                for start in range(0, n, KP):
                    p = start + j
                    ok = p < n
                    tok = tl.load(child_token_ptr + _edge(lo + p, num_edges), mask=ok, other=0).to(tl.int32)
                    x = tl.load(row + _code(tok, V), mask=ok, other=-float("inf")).to(tl.float32)
                    m_new = tl.maximum(m_i, tl.max(x, 0))
                    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
                    l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
                    m_i = m_new
                lse = m_i + tl.log(l_i)
            else:
                lse = _row_lse(row, V, BLOCK_V)
            for start in range(0, n, KP):
                p = start + j
                ok = p < n
                tok = tl.load(child_token_ptr + _edge(lo + p, num_edges), mask=ok, other=0).to(tl.int32)
                x = tl.load(row + _code(tok, V), mask=ok, other=-float("inf")).to(tl.float32)
                sc = beam + (x - lse)
                if HAS_BIAS:   # one gather per candidate, after the normalisation
                    sc = sc + tl.load(bias_base + _edge(lo + p, num_edges), mask=ok, other=0.0)
                key = tl.where(ok & (sc != -float("inf")), _make_key(sc, w, p), _SENT)
                best = _merge_into(best, tl.sort(key), KP, LOG_KP, 0)
    tl.store(keys_ptr + pid.to(tl.int64) * KP + j, best)


@triton.jit
def _select_kernel(keys_ptr, nodes_ptr, child_ptr_ptr, child_token_ptr, edge_word_ptr,
                   out_score_ptr, out_node_ptr, out_parent_ptr, out_token_ptr,
                   W_in, W, num_internal, num_edges, shift, mask,
                   KP: tl.constexpr, LOG_KP: tl.constexpr, GROUP: tl.constexpr, LOG_GROUP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, KP)
    rows = tl.arange(0, GROUP)
    # odd rows are read back to front (ascending) so that pairs form bitonic sequences
    col = tl.where((rows % 2 == 1)[:, None], KP - 1 - cols[None, :], cols[None, :])
    best = tl.full([KP], _SENT, tl.int64)
    for g0 in range(0, W_in, GROUP):
        r = g0 + rows
        t = tl.load(keys_ptr + (b * W_in + r)[:, None] * KP + col, mask=(r < W_in)[:, None], other=_SENT)
        for lvl in tl.static_range(LOG_GROUP):
            t = _tree_level(t, GROUP, KP, LOG_KP, lvl)
        # one row left, descending; ``best`` is kept ascending
        best = _merge_into(best, tl.reshape(t, [KP]), KP, LOG_KP, 1)
    rank = KP - 1 - cols          # best[KP - 1] is the winner
    out = b * W + rank
    keep = rank < W
    ok = best != _SENT
    idx = _key_index(best)
    parent = (idx >> 23).to(tl.int32)
    pos = idx & ((1 << 23) - 1)
    s = tl.load(nodes_ptr + b * W_in + parent, mask=ok, other=0)
    chain = s >= num_internal
    word_c = tl.load(edge_word_ptr + _edge(s - num_internal, num_edges), mask=ok & chain, other=0)
    e = _edge(tl.load(child_ptr_ptr + s, mask=ok & ~chain, other=0) + pos, num_edges)
    tok_i = tl.load(child_token_ptr + e, mask=ok & ~chain, other=0).to(tl.int64)
    word_i = tl.load(edge_word_ptr + e, mask=ok & ~chain, other=0)
    tok = tl.where(chain, ((word_c >> shift) & mask).to(tl.int64), tok_i)
    nxt = tl.where(chain, s, tl.where(word_i < 0, (~word_i).to(tl.int64), num_internal + e))
    tl.store(out_score_ptr + out, tl.where(ok, _key_score(best), -float("inf")), mask=keep)
    tl.store(out_node_ptr + out, tl.where(ok, nxt, -1), mask=keep)
    tl.store(out_parent_ptr + out, tl.where(ok, parent.to(tl.int64), 0), mask=keep)
    tl.store(out_token_ptr + out, tl.where(ok, tok, -1), mask=keep)


# ----------------------------------------------------------------------------- launcher


def beam_step(logits: torch.Tensor, beam_scores: torch.Tensor, nodes: torch.Tensor, trie, level: int, W: int,
              normalize: str, vocab_offset: int, blocks: BeamBlocks = DEFAULT_BLOCKS, out=None,
              edge_bias: torch.Tensor | None = None, bias_row: torch.Tensor | None = None):
    """Launch both kernels. Inputs are validated by ``ops_torch``; ``logits``
    must have a unit stride on its last dim. ``out``: optional preallocated
    ``(scores, nodes, parent, token)``, every element of which is written.
    ``edge_bias``: optional float32 ``[E]`` added to each candidate of an
    internal node (``HAS_BIAS``; without it the kernel has no extra load), or
    ``[T, E]`` with ``bias_row`` int32/int64 ``[B]``: user ``b`` reads row
    ``bias_row[b]`` (``BIAS_ROWS``: one more scalar load per program)."""
    B, W_in = nodes.shape
    dev = logits.device
    V = int(trie.codebook_sizes[level])
    KP = blocks.kp(W)
    LOG_KP = KP.bit_length() - 1
    G = blocks.group_for(KP)
    warps = blocks.warps_for(KP)
    keys = torch.empty(B * W_in * KP, dtype=torch.int64, device=dev)
    if out is None:
        out = (torch.empty(B, W, dtype=torch.float32, device=dev), torch.empty(B, W, dtype=torch.int64, device=dev),
               torch.empty(B, W, dtype=torch.int64, device=dev), torch.empty(B, W, dtype=torch.int64, device=dev))
    scores, new_nodes, parent, token = out
    if B == 0:
        return scores, new_nodes, parent, token
    if int(trie.num_edges) == 0:   # a trie without edges has no candidates (and nothing to address)
        scores.fill_(float("-inf")), new_nodes.fill_(-1), parent.fill_(0), token.fill_(-1)
        return scores, new_nodes, parent, token
    nodes = nodes.contiguous()
    beam_scores = beam_scores.contiguous()
    shift, mask = int(trie.shift[level]), int(trie.mask[level])   # host ints: no device sync
    I, E = int(trie.num_internal), int(trie.num_edges)
    wrapped(_expand_kernel)[(B * W_in,)](
        logits, logits.stride(0), logits.stride(1), beam_scores, nodes,
        trie.child_ptr, trie.child_token, trie.edge_word, beam_scores if edge_bias is None else edge_bias,
        nodes if bias_row is None else bias_row, keys,
        W_in, V, int(vocab_offset), I, E, 1 if bias_row is None else int(edge_bias.shape[0]), shift, mask,
        KP=KP, LOG_KP=LOG_KP, BLOCK_V=blocks.block_v, CHILDREN_NORM=normalize == "children",
        HAS_BIAS=edge_bias is not None, BIAS_ROWS=bias_row is not None, num_warps=warps)
    wrapped(_select_kernel)[(B,)](
        keys, nodes, trie.child_ptr, trie.child_token, trie.edge_word,
        scores, new_nodes, parent, token,
        W_in, W, I, E, shift, mask,
        KP=KP, LOG_KP=LOG_KP, GROUP=G, LOG_GROUP=G.bit_length() - 1, num_warps=warps)
    return scores, new_nodes, parent, token


# ----------------------------------------------------------------------------- trie_aggregate
# Bottom-up, no atomics: ``_sid_mass_kernel`` gives every chain edge its SID's mass (one item, or the sum
# over its collision group), then ``_level_kernel`` runs once per depth, deepest first, one lane per
# internal node: it sums its children's masses and SID counts in edge order (an internal child's from the
# level below, a chain child's from the first kernel), then writes its internal edges' masses and every
# child edge's log-ratio. Deterministic; one host read of ``level_ptr`` / ``child_ptr`` at the level bounds.

AGG_BLOCK = 128       # edges or nodes per program


@triton.jit
def _sid_mass_kernel(item_mass_ptr, edge_word_ptr, edge_item_ptr, dup_ptr_ptr, dup_items_ptr, edge_mass_ptr,
                     E, N, G, D, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = e < E
    w = tl.load(edge_word_ptr + e, mask=ok, other=-1)
    it = tl.load(edge_item_ptr + e, mask=ok, other=-1).to(tl.int64)
    single = ok & (w >= 0) & (it >= 0)
    grp = ok & (w >= 0) & (it <= -2)
    m = tl.load(item_mass_ptr + tl.maximum(tl.minimum(it, N - 1), 0), mask=single, other=0.0).to(tl.float32)
    g = tl.maximum(tl.minimum(-it - 2, G - 1), 0)
    lo = tl.load(dup_ptr_ptr + g, mask=grp, other=0)
    n = tl.where(grp, tl.load(dup_ptr_ptr + g + 1, mask=grp, other=0) - lo, 0)
    acc = tl.zeros([BLOCK], tl.float32)
    for k in range(0, tl.max(n, 0)):   # a collision group's items, in group order
        take = k < n
        item = tl.load(dup_items_ptr + tl.maximum(tl.minimum(lo + k, D - 1), 0), mask=take, other=0).to(tl.int64)
        acc += tl.load(item_mass_ptr + tl.maximum(tl.minimum(item, N - 1), 0), mask=take, other=0.0)
    tl.store(edge_mass_ptr + e, tl.where(grp, acc, m), mask=ok)


@triton.jit
def _child_mass(edge_word_ptr, edge_mass_ptr, node_mass_ptr, node_count_ptr, e, take, I):
    """(mass, SID count) of the subtree edge ``e`` leads into, where ``take``."""
    w = tl.load(edge_word_ptr + e, mask=take, other=0)
    inner = take & (w < 0)
    child = tl.maximum(tl.minimum(~w, I - 1), 0)
    m = tl.where(inner, tl.load(node_mass_ptr + child, mask=inner, other=0.0),
                 tl.load(edge_mass_ptr + e, mask=take & ~inner, other=0.0))
    c = tl.where(inner, tl.load(node_count_ptr + child, mask=inner, other=0), 1)
    return tl.where(take, m, 0.0), tl.where(take, c, 0), inner


@triton.jit
def _level_kernel(child_ptr_ptr, edge_word_ptr, edge_mass_ptr, node_mass_ptr, node_count_ptr, bias_ptr,
                  node_lo, node_hi, I, E, eps, BLOCK: tl.constexpr):
    n = node_lo + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = n < node_hi
    lo = tl.load(child_ptr_ptr + n, mask=ok, other=0)
    cnt = tl.where(ok, tl.load(child_ptr_ptr + n + 1, mask=ok, other=0) - lo, 0)
    m = tl.zeros([BLOCK], tl.float32)
    c = tl.zeros([BLOCK], tl.int32)
    for j in range(0, tl.max(cnt, 0)):
        cm, cc, _ = _child_mass(edge_word_ptr, edge_mass_ptr, node_mass_ptr, node_count_ptr,
                                _edge(lo + j, E), j < cnt, I)
        m += cm
        c += cc
    tl.store(node_mass_ptr + n, m, mask=ok)
    tl.store(node_count_ptr + n, c, mask=ok)
    log_parent = tl.log(tl.where(ok, m + eps * c.to(tl.float32), 1.0))
    for j in range(0, tl.max(cnt, 0)):   # the node's edges: internal edges' masses, every edge's log-ratio
        take = j < cnt
        e = _edge(lo + j, E)
        cm, cc, inner = _child_mass(edge_word_ptr, edge_mass_ptr, node_mass_ptr, node_count_ptr, e, take, I)
        tl.store(edge_mass_ptr + e, cm, mask=inner)
        tl.store(bias_ptr + e, tl.log(tl.where(take, cm + eps * cc.to(tl.float32), 1.0)) - log_parent, mask=take)


def trie_aggregate(item_mass: torch.Tensor, trie, edge_item: torch.Tensor, dup_ptr: torch.Tensor,
                   dup_items: torch.Tensor, eps: float):
    """Launch the aggregation (semantics: ``reference.trie_aggregate``); inputs
    validated by ``ops_torch``. Returns ``(node_mass [I], edge_mass [E],
    edge_bias [E])`` float32."""
    dev = item_mass.device
    I, E = int(trie.num_internal), int(trie.num_edges)
    node_mass = torch.empty(I, dtype=torch.float32, device=dev)
    node_count = torch.empty(I, dtype=torch.int32, device=dev)
    edge_mass = torch.empty(E, dtype=torch.float32, device=dev)
    bias = torch.empty(E, dtype=torch.float32, device=dev)
    if dup_items.numel() == 0:   # a valid address for the (never taken) group loads
        dup_items = torch.zeros(1, dtype=torch.int64, device=dev)
    _sid_mass_kernel[(triton.cdiv(E, AGG_BLOCK),)](
        item_mass.contiguous(), trie.edge_word, edge_item.contiguous(), dup_ptr.contiguous(), dup_items.contiguous(),
        edge_mass, E, item_mass.shape[0], max(dup_ptr.shape[0] - 1, 1), dup_items.shape[0], BLOCK=AGG_BLOCK)
    bounds = [int(v) for v in trie.level_ptr.tolist()]   # one host read
    for d in reversed(range(len(bounds) - 1)):
        lo, hi = bounds[d], bounds[d + 1]
        if hi > lo:
            _level_kernel[(triton.cdiv(hi - lo, AGG_BLOCK),)](
                trie.child_ptr, trie.edge_word, edge_mass, node_mass, node_count, bias, lo, hi, I, E, float(eps),
                BLOCK=AGG_BLOCK)
    return node_mass, edge_mass, bias
