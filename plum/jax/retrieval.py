"""Generative retrieval in JAX: the twin of :class:`plumrec.retrieval.GenerativeRetriever`.

For a batch of users:

1. **Prefill**: every prompt (``<|bos|> <|hist|> <sid> ...``, :func:`plumrec.sequences.history_tokens`)
   runs packed through :func:`plumrec.jax.model.forward` (``return_kv``); each layer's keys and values are
   scattered into a prefix cache ``[B, S, Hkv, D]`` stored once per user, and the level-0 logits are read
   at each prompt's last token.
2. **Constrained beam search** (``plum_kernels.jax.constrained_beam_search``) over the L SID levels with W
   beams per user: the step function reorders the per-beam suffix cache by the beams' parents, feeds each
   beam's newest code through :func:`plumrec.jax.model.decode_step` (``beam_decode_attention``) and returns
   the next level's codebook logits.
3. **Items**: each beam's SID maps to its items through the trie (colliding items all kept, in trie
   order), optionally without the user's history items, cut to K.

Both stages run under ``jax.jit`` with static shapes: a batch is always ``batch_size`` users (the last one
filled with one-token dummy prompts) and its packed length is rounded up to a bucket (:func:`token_bucket`)
by padding tokens appended after the prompts, each sequence at most ``prompt_len`` long (causal attention:
a prompt's tokens never read the padding behind them, and the decoding reads the prefix cache only below
each prompt's length). The search compiles once per shape (batch, beams, cache, trie) and the prefill once
per bucket, shared by every retriever of the same shapes.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import plum_kernels.jax as KJ
from plumrec.jax.model import decode_step, forward, lm_logits
from plumrec.model.config import ModelConfig
from plumrec.model.vocab import SIDVocab
from plumrec.retrieval.generative import Recommendations, collect_recommendations, evaluate_recommendations
from plumrec.sequences import check_histories, history_tokens
from plumrec.sid.trie import SIDTrie

__all__ = ["JaxRetriever", "Recommendations", "token_bucket"]

def token_bucket(n: int) -> int:
    """The packed length a batch of ``n`` tokens is padded to: the next multiple of 64 up to 512, then of
    a quarter of the power of two below ``n`` (at most 25% padding, 4 buckets per doubling)."""
    if n <= 512:
        return max(64, -(-n // 64) * 64)
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


@functools.partial(jax.jit, static_argnames=("cfg", "num_users", "max_seqlen", "level0", "impl", "interpret"))
def _prefill(params, ids, cu, lens, *, cfg, num_users, max_seqlen, level0, impl, interpret):
    """Packed prompts -> ``(level-0 logits [B, V_0] float32, k_prefix, v_prefix)`` (per layer ``[B, S, Hkv,
    D]``, ``S = max_seqlen``); ``cu [B+1]`` delimits the padded sequences, ``lens [B]`` the prompts."""
    hidden, _, _, kv = forward(params, cfg, ids, cu, max_seqlen, logits=False, return_kv=True, impl=impl,
                               interpret=interpret)
    first = lm_logits(params, hidden[cu[:-1] + lens - 1], slice(*level0)).astype(jnp.float32)
    t = jnp.arange(ids.shape[0], dtype=jnp.int32)
    seq = jnp.searchsorted(cu, t, side="right").astype(jnp.int32) - 1
    pos = t - cu[seq]
    kp, vp = [], []  # padding rows (pos >= lens) are written too: beam_decode_attention never reads them
    for k, v in kv:
        for src, dst in ((k, kp), (v, vp)):
            dst.append(jnp.zeros((num_users, max_seqlen, *src.shape[1:]), src.dtype).at[seq, pos].set(src))
    return first, kp, vp


@functools.partial(jax.jit, static_argnames=("cfg", "offsets", "slices", "beam_width", "impl", "interpret"))
def _search(params, first, kp, vp, lens, trie, *, cfg, offsets, slices, beam_width, impl, interpret):
    """The constrained beam search from a prefill: ``(codes [B, W, L] int32, scores [B, W] float32)``."""
    B, W, L = first.shape[0], beam_width, len(offsets)
    s = max(L - 1, 1)
    state = {"ks": [jnp.zeros((B, W, s, *k.shape[2:]), k.dtype) for k in kp],
             "vs": [jnp.zeros((B, W, s, *v.shape[2:]), v.dtype) for v in vp]}

    def step_fn(level, tokens, parent):
        if level == 0:
            return jnp.broadcast_to(first[:, None, :], (B, W, first.shape[-1]))
        if level > 1:  # the beams continue from their parents: reorder their generated keys / values
            idx = parent[:, :, None, None, None]
            state["ks"] = [jnp.take_along_axis(c, idx, axis=1) for c in state["ks"]]
            state["vs"] = [jnp.take_along_axis(c, idx, axis=1) for c in state["vs"]]
        newest = tokens[:, :, level - 1]
        # dead beams carry code -1: feed any valid token, their logits are ignored
        tok = jnp.where(newest >= 0, newest, 0) + offsets[level - 1]
        h, state["ks"], state["vs"] = decode_step(params, cfg, tok, kp, vp, lens, state["ks"], state["vs"],
                                                  level - 1, impl=impl, interpret=interpret)
        return lm_logits(params, h, slice(*slices[level])).astype(jnp.float32)

    return KJ.constrained_beam_search(step_fn, trie, batch_size=B, beam_width=W, impl=impl, interpret=interpret)


def _check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


class JaxRetriever:
    """Recommend with the JAX PLUM LM over SID tokens and a trie of the catalogue's SIDs.

    Args:
        params: the model's parameters (:func:`plumrec.jax.model.params_from_torch_state`, ...).
        cfg: its :class:`~plumrec.model.config.ModelConfig` (``vocab_size`` must be ``vocab.size``).
        vocab: token layout; its codebooks must be the trie's.
        trie: SIDs of the catalogue (:func:`plumrec.sid.build_trie` over ``codes``).
        codes: int ``[num_items, L]`` SIDs of the items (build the prompts).
        beam_width: W beams per user (>= the largest K asked for).
        batch_size: users per beam search (every search runs this many, padded with dummy users).
        max_items: prompt history window (the last ``max_items`` items); ``2 + max_items * L + L - 1``
            positions must fit ``cfg.max_position_embeddings``.
        impl, interpret: ``plum_kernels.jax`` implementation of every op (attention, MoE, beam step):
            None (Pallas on a TPU, the jnp reference elsewhere), ``"reference"`` or ``"pallas"``
            (``interpret=None``: interpret mode off a TPU).
    """

    def __init__(self, params: dict, cfg: ModelConfig, vocab: SIDVocab, trie: SIDTrie, codes: np.ndarray, *,
                 beam_width: int = 10, batch_size: int = 64, max_items: int = 50, impl: str | None = None,
                 interpret: bool | None = None):
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        vocab.check_model(cfg.vocab_size)
        vocab.check_codebooks(trie.codebook_sizes)
        self.beam_width = _check_int("beam_width", beam_width)
        self.batch_size = _check_int("batch_size", batch_size)
        self.max_items = _check_int("max_items", max_items)
        if impl not in (None, "reference", "pallas"):
            raise ValueError(f"impl must be None, 'reference' or 'pallas', got {impl!r}")
        L = vocab.num_levels
        self.prompt_len = 2 + self.max_items * L
        if self.prompt_len + L - 1 > cfg.max_position_embeddings:
            raise ValueError(f"max_items={self.max_items} needs {self.prompt_len + L - 1} positions, more than "
                             f"cfg.max_position_embeddings={cfg.max_position_embeddings}")
        self.params, self.cfg, self.vocab, self.trie = params, cfg, vocab, trie
        self.sid_tokens = vocab.sid_to_tokens(codes)
        self.num_items = len(self.sid_tokens)
        self.impl, self.interpret = impl, interpret
        self._slices = tuple((vocab.level_slice(l).start, vocab.level_slice(l).stop) for l in range(L))
        self._offsets = tuple(vocab.level_offset(l) for l in range(L))
        self._trie_arrays = trie.to_jax()

    def _pack(self, histories: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids [T] int32, cu [B+1] int32, lens [B] int32)`` of ``batch_size`` padded sequences: the
        prompts, then one-token dummies, with padding tokens appended to sequences below ``prompt_len``."""
        B, S = self.batch_size, self.prompt_len
        prompts = [history_tokens(self.vocab, self.sid_tokens, np.asarray(h, np.int64)[-self.max_items:])
                   for h in histories]
        prompts += [prompts[0][:1]] * (B - len(prompts))
        lens = np.array([len(p) for p in prompts], np.int64)
        total = min(token_bucket(int(lens.sum())), B * S)
        room = np.cumsum(S - lens)  # fill the padding greedily into the room left below S
        extra = np.diff(np.minimum(room, total - lens.sum()), prepend=0)
        padded = lens + extra
        ids = np.zeros(total, np.int32)
        cu = np.concatenate([[0], np.cumsum(padded)]).astype(np.int32)
        for p, start in zip(prompts, cu[:-1]):
            ids[start:start + len(p)] = p
        return ids, cu, lens.astype(np.int32)

    def search(self, histories: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One constrained beam search over at most ``batch_size`` histories: ``(codes [n, W, L] int64,
        scores [n, W] float32)``, beams best first (codes -1 and scores ``-inf`` in dead slots)."""
        n = len(histories)
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"histories must hold 1 to batch_size={self.batch_size} histories, got {n}")
        ids, cu, lens = self._pack(histories)
        first, kp, vp = _prefill(self.params, jnp.asarray(ids), jnp.asarray(cu), jnp.asarray(lens), cfg=self.cfg,
                                 num_users=self.batch_size, max_seqlen=self.prompt_len, level0=self._slices[0],
                                 impl=self.impl, interpret=self.interpret)
        codes, scores = _search(self.params, first, kp, vp, jnp.asarray(lens), self._trie_arrays, cfg=self.cfg,
                                offsets=self._offsets, slices=self._slices, beam_width=self.beam_width,
                                impl=self.impl, interpret=self.interpret)
        return np.asarray(codes, np.int64)[:n], np.asarray(scores, np.float32)[:n]

    def recommend(self, histories: Sequence[np.ndarray], k: int = 10, *, exclude_history: bool = False,
                  on_nonfinite: str = "raise") -> Recommendations:
        """Top-``k`` items for each history (item indices of the catalogue), as
        :meth:`plumrec.retrieval.GenerativeRetriever.recommend` without exploration: each beam's items in
        trie order, best beam first; ``exclude_history`` drops the history's items before the cut to
        ``k``. A user whose scores hold a NaN or ``inf`` raises a ``ValueError`` (``on_nonfinite="raise"``)
        or gets an empty list and is listed in ``nonfinite`` (``"skip"``)."""
        check_histories(histories, self.num_items, "histories")
        if any(len(h) == 0 for h in histories):
            raise ValueError("histories: every history needs at least one item")
        k = _check_int("k", k)

        def search(users: np.ndarray, batch: list) -> tuple[np.ndarray, np.ndarray, None]:
            return (*self.search(batch), None)

        return collect_recommendations(histories, self.batch_size, search, self.trie, k, beam_width=self.beam_width,
                                       exclude_history=exclude_history, on_nonfinite=on_nonfinite)

    def evaluate(self, histories: Sequence[np.ndarray], targets, ks: Sequence[int] = (5, 10), *,
                 exclude_history: bool = False, return_ranks: bool = False, on_nonfinite: str = "raise",
                 popularity=None):
        """Recall/NDCG/coverage@K, the exposure measures (``popularity [M]``: training item counts) and the
        invalid-SID rate: the dict of :meth:`plumrec.retrieval.GenerativeRetriever.evaluate`
        (:func:`plumrec.metrics.evaluate_lists`); ``return_ranks``: ``(metrics, ranks)``."""
        if not len(ks) or max(ks) > self.beam_width:
            raise ValueError(f"ks must be non-empty with max(ks) <= beam_width ({self.beam_width}), got {ks!r}")
        rec = self.recommend(histories, max(ks), exclude_history=exclude_history, on_nonfinite=on_nonfinite)
        return evaluate_recommendations(rec, targets, self.num_items, ks, return_ranks=return_ranks,
                                        popularity=popularity)
