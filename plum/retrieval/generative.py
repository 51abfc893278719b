"""Generative retrieval: the LM generates the SIDs of the items to recommend.

For a batch of B users:

1. **Prefill** every prompt (``<|bos|> <|hist|> <sid> ...``) once, packed
   without padding, through ``history_attention``; keep each layer's keys and
   values as a prefix cache ``[B, S, Hkv, D]`` stored once per user, and the
   level-0 logits at each prompt's last token.
2. **Constrained beam search** (``plum_kernels.torch.constrained_beam_search``) over
   the L SID levels with W beams per user: the step function reorders the
   per-beam suffix cache by the beams' parents, feeds each beam's newest code
   through :meth:`PlumLM.decode_step` (``beam_decode_attention``: the W beams
   of a user read the shared prefix once) and returns the logits of the next
   level's codebook only (a slice of the LM head). Only SIDs of the trie can
   come out.
3. **Items**: beams best first, each SID's items from the trie (collisions
   keep all their items, in trie order), without the user's history items if
   ``exclude_history`` (then the W beams must leave K others: W > K), cut to K.
4. **Non-finite scores**: a user whose beams score NaN or ``inf`` (the model produced a
   non-finite logit for it; the search keeps such beams, it never empties them) raises a
   ``ValueError`` naming the users, or with ``on_nonfinite="skip"`` gets an empty list and is
   counted in ``nonfinite`` (``evaluate`` reports that count).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

import plum_kernels.torch as K
from plumrec.metrics import drop_history, evaluate_lists
from plumrec.model.model import BeamCache, PlumLM, cu_seqlens_from_lengths
from plumrec.model.vocab import SIDVocab
from plumrec.sequences import check_histories, history_tokens
from plumrec.sid.trie import SIDTrie

__all__ = ["GenerativeRetriever", "Recommendations", "collect_recommendations", "evaluate_recommendations",
           "nonfinite_users"]


NONFINITE = ("raise", "skip")


@dataclass
class Recommendations:
    items: list[np.ndarray]   # per user, ranked item indices (<= k); empty for a skipped non-finite user
    codes: np.ndarray         # [U, W, L] generated SIDs, best first (-1 in dead slots)
    scores: np.ndarray        # [U, W] log-probabilities (-inf in dead slots, NaN where the model's scores were)
    invalid: int              # finite-score beams whose SID is not in the trie
    beams: int                # finite-score beams of the users with finite scores
    nonfinite: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # users with non-finite scores


def nonfinite_users(scores: np.ndarray) -> np.ndarray:
    """Rows of ``scores [U, W]`` holding a NaN or ``+inf`` (``-inf`` marks an empty slot)."""
    bad = np.isnan(scores) | np.isposinf(scores)
    return np.flatnonzero(bad.any(axis=1)).astype(np.int64)


def _nonfinite_error(users: np.ndarray, first: int) -> ValueError:
    shown = ", ".join(str(int(u)) for u in users[:10]) + (", ..." if len(users) > 10 else "")
    return ValueError(f"the model's scores are not finite (NaN or inf) for {len(users)} user(s) of the batch starting "
                      f"at history {first}: histories [{shown}] (indices into histories; the search stops at the "
                      "first such batch). A NaN weight or activation in the model is the usual cause. Pass "
                      "on_nonfinite='skip' to give these users empty lists and count them in nonfinite")


def collect_recommendations(histories: Sequence[np.ndarray], batch_size: int, search, trie: SIDTrie, k: int, *,
                            beam_width: int, exclude_history: bool, on_nonfinite: str) -> Recommendations:
    """Run ``search`` over the histories in batches of ``batch_size`` and turn its beams into item lists.

    ``search(users [n] int64, batch: list of n histories) -> (codes [n, W, L], scores [n, W], explored)``
    returns numpy beams, best first; ``explored`` is None (each beam's items ranked by the trie,
    :meth:`~plumrec.sid.trie.SIDTrie.beam_items`) or one ranked item array per user. Users with non-finite
    scores raise or are skipped (``on_nonfinite``, see :meth:`GenerativeRetriever.recommend`). Shared by the
    torch and JAX retrievers."""
    if on_nonfinite not in NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE}, got {on_nonfinite!r}")
    all_codes, all_scores, items, skipped = [], [], [], []
    invalid = beams = 0
    for s in range(0, len(histories), batch_size):
        users = np.arange(s, min(s + batch_size, len(histories)))
        batch = [histories[i] for i in users]
        codes, scores, explored = search(users, batch)
        bad = nonfinite_users(scores)
        if len(bad) and on_nonfinite == "raise":
            raise _nonfinite_error(users[bad], int(users[0]))
        skipped.extend(users[bad].tolist())
        all_codes.append(codes)
        all_scores.append(scores)
        for u, (c, sc, h) in enumerate(zip(codes, scores, batch)):
            if u in bad:
                items.append(np.zeros(0, np.int64))
                continue
            ranked, n_live, n_invalid = trie.beam_items(c, sc)
            ranked = ranked if explored is None else explored[u]
            beams += n_live
            invalid += n_invalid
            items.append((drop_history(ranked, h) if exclude_history else ranked)[:k])
    if not all_codes:
        all_codes = [np.zeros((0, beam_width, len(trie.codebook_sizes)), np.int64)]
        all_scores = [np.zeros((0, beam_width), np.float32)]
    return Recommendations(items, np.concatenate(all_codes), np.concatenate(all_scores), invalid, beams,
                           np.asarray(skipped, np.int64))


def evaluate_recommendations(rec: Recommendations, targets, num_items: int, ks: Sequence[int], *,
                             return_ranks: bool = False, popularity=None):
    """:func:`plumrec.metrics.evaluate_lists` of ``rec``'s lists with its invalid-SID rate (over the beams of
    the users with finite scores; NaN when every user was skipped) and its count of non-finite users."""
    invalid_rate = rec.invalid / rec.beams if rec.beams else (float("nan") if len(rec.nonfinite) else 0.0)
    return evaluate_lists(rec.items, targets, num_items, ks, invalid_rate=invalid_rate,
                          nonfinite=len(rec.nonfinite), return_ranks=return_ranks, popularity=popularity)


class GenerativeRetriever:
    """Recommend with an LM over SID tokens and a trie of the catalogue's SIDs.

    Args:
        model: the LM (its vocabulary must be ``vocab``).
        vocab: token layout; its codebooks must be the trie's.
        trie: SIDs of the catalogue (:func:`plumrec.sid.build_trie` over ``codes``).
        codes: ``[num_items, L]`` SIDs of the items (builds the prompts).
        beam_width: W beams per user (>= the largest K asked for).
        batch_size: users per beam search.
        max_items: prompt history window (the last ``max_items`` items).
        impl: ``plum_kernels.torch`` implementation of the constrained beam search
            (None, ``"reference"`` or ``"triton"``); default the model's
            ``config.kernel_impl``, so a model set to the reference ops decodes
            with them too.
        explore: an exploration policy (:class:`plumrec.retrieval.explore.ExplorationPolicy`,
            fitted on this trie) or None: :meth:`recommend` then runs, for each user, one beam
            search biased by a component of the policy drawn per (seed, user index).
    """

    def __init__(self, model: PlumLM, vocab: SIDVocab, trie: SIDTrie, codes: np.ndarray, *, beam_width: int = 10,
                 batch_size: int = 64, max_items: int = 50, impl: str | None = None, explore=None):
        vocab.check_model(model.config.vocab_size)
        vocab.check_codebooks(trie.codebook_sizes)
        if beam_width < 1 or batch_size < 1 or max_items < 1:
            raise ValueError("beam_width, batch_size and max_items must be >= 1")
        self.model, self.vocab, self.trie = model, vocab, trie
        self.sid_tokens = vocab.sid_to_tokens(codes)
        self.num_items = len(self.sid_tokens)
        self.beam_width, self.batch_size, self.max_items = beam_width, batch_size, max_items
        self.impl = impl if impl is not None else model.config.kernel_impl
        self._trie_arrays = None
        self.explore = explore

    @property
    def explore(self):
        """The exploration policy :meth:`recommend` serves with (None: plain beam search)."""
        return self._explore

    @explore.setter
    def explore(self, policy) -> None:
        if policy is not None:
            policy.check_trie(self.trie)  # ValueError for a policy fitted on another trie
        self._explore = policy

    def _device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _search(self, histories: Sequence[np.ndarray], edge_bias: torch.Tensor | None = None,
                bias_row: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One constrained beam search over ``histories``: ``(codes [B, W, L] int64, scores [B, W] float32)``;
        ``edge_bias``: optional float32 per-edge bias on the model's device (the scores include it), ``[E]``
        for every user or ``[T, E]`` with ``bias_row [B]`` int64 (each user's row)."""
        return self._decode(*self._prefill(histories), edge_bias=edge_bias, bias_row=bias_row)

    @torch.no_grad()
    def _prefill(self, histories: Sequence[np.ndarray]) -> tuple[torch.Tensor, BeamCache]:
        """The prompts' forward: ``(level-0 logits [B, V_0] float32, the prompts' BeamCache)``. :meth:`_decode`
        leaves the prefix part of the cache untouched, so one prefill serves several searches."""
        model, vocab, W = self.model, self.vocab, self.beam_width
        dev = self._device()
        L = vocab.num_levels
        prompts = [history_tokens(vocab, self.sid_tokens, np.asarray(h, np.int64)[-self.max_items:])
                   for h in histories]
        lens = [len(p) for p in prompts]
        ids = torch.from_numpy(np.concatenate(prompts)).to(dev)
        cu = cu_seqlens_from_lengths(lens, device=dev)
        last = (cu[1:] - 1).long()
        out = model(ids, cu, max(lens), logits=False, return_kv=True)
        first = model.lm_logits(out.hidden[last], vocab.level_slice(0)).float()        # [B, V_0]
        return first, model.prefix_cache(out.kv, cu, W, max(L - 1, 1))

    @torch.no_grad()
    def _decode(self, first: torch.Tensor, cache: BeamCache, edge_bias: torch.Tensor | None = None,
                bias_row: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The constrained beam search from a :meth:`_prefill` (its generated part is reset first)."""
        model, vocab, W, dev = self.model, self.vocab, self.beam_width, self._device()
        L, B = vocab.num_levels, first.shape[0]
        cache.suffix_len = 0
        offsets = [vocab.level_offset(l) for l in range(L)]

        def step_fn(level: int, tokens: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
            if level == 0:
                return first[:, None, :].expand(B, W, first.shape[-1])
            cache.reorder(parent)
            newest = tokens[:, :, level - 1]
            # dead beams carry code -1: feed any valid token, their logits are ignored
            tok = torch.where(newest >= 0, newest + offsets[level - 1], torch.full_like(newest, offsets[level - 1]))
            h = model.decode_step(tok, cache)
            return model.lm_logits(h, vocab.level_slice(level)).float()

        if self._trie_arrays is None or self._trie_arrays.child_ptr.device != dev:
            self._trie_arrays = self.trie.to_torch(dev)
        return K.constrained_beam_search(step_fn, self._trie_arrays, batch_size=B, beam_width=W, impl=self.impl,
                                         edge_bias=edge_bias, bias_row=bias_row)

    def recommend(self, histories: Sequence[np.ndarray], k: int = 10, *, exclude_history: bool = False,
                  on_nonfinite: str = "raise", seed: int = 0) -> Recommendations:
        """Top-``k`` items for each history (item indices of the catalogue).

        With ``exclude_history`` the items of the history are dropped from the beams' items before
        the cut to ``k`` (see :mod:`plumrec.metrics`); a list is shorter than ``k`` only if
        the ``beam_width`` beams hold fewer than ``k`` other items. ``codes`` / ``scores`` are the
        beams either way.

        Non-finite scores (NaN or ``inf`` in a user's beams: the model produced a NaN or an
        infinite logit for that user) are never taken for empty slots. ``on_nonfinite="raise"``
        (the default) raises a ``ValueError`` naming the users of the first batch that has any;
        ``"skip"`` gives those users empty lists, leaves their beams out of ``invalid`` / ``beams``
        and lists them in ``nonfinite``.

        With an exploration policy (``explore``) each user ``u`` (its index in ``histories``) gets the
        beams of one search biased by the policy's component drawn for ``(seed, u)``
        (:meth:`~plumrec.retrieval.explore.ExplorationPolicy.components`), its items ranked under that
        bias; ``scores`` are then the beams' model log-probabilities without the bias, ``codes`` in the
        biased order. Each batch of ``batch_size`` users is one search, each user reading its component's
        row of the policy's ``[T, E]`` tables.
        """
        check_histories(histories, self.num_items, "histories")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if any(len(h) == 0 for h in histories):
            raise ValueError("every history needs at least one item")
        if not 1 <= k:
            raise ValueError(f"k must be >= 1, got {k}")
        was_training = self.model.training
        self.model.eval()
        try:
            return collect_recommendations(histories, self.batch_size, self._search_batch(seed), self.trie, k,
                                           beam_width=self.beam_width, exclude_history=exclude_history,
                                           on_nonfinite=on_nonfinite)
        finally:
            self.model.train(was_training)

    def _search_batch(self, seed: int):
        def search(users: np.ndarray, batch: list) -> tuple[np.ndarray, np.ndarray, list | None]:
            codes, scores, explored = ((*self._search(batch), None) if self.explore is None
                                       else self.explore.search(self, batch, users, seed))
            return codes.cpu().numpy(), scores.cpu().numpy(), explored
        return search

    def evaluate(self, histories: Sequence[np.ndarray], targets, ks: Sequence[int] = (5, 10), *,
                 exclude_history: bool = False, return_ranks: bool = False, on_nonfinite: str = "raise",
                 popularity=None):
        """Recall/NDCG/coverage@K over all items plus the invalid-SID rate (``exclude_history``: see
        :meth:`recommend`) and the exposure measures (``popularity [M]``: training item counts, for
        tail exposure and novelty; see :func:`~plumrec.metrics.exposure_metrics`). ``return_ranks``:
        also each user's target rank in its top ``max(ks)`` (``(metrics, ranks)``, see
        :func:`~plumrec.metrics.target_ranks`).

        ``nonfinite`` counts the users whose scores are not finite. With ``on_nonfinite="raise"``
        (the default) any such user raises (see :meth:`recommend`), so it is 0; with ``"skip"`` they
        count as misses in every metric, and ``invalid_rate`` is over the other users' beams (NaN
        when no user is left)."""
        if max(ks) > self.beam_width:
            raise ValueError(f"beam_width ({self.beam_width}) must be >= the largest K ({max(ks)})")
        rec = self.recommend(histories, max(ks), exclude_history=exclude_history, on_nonfinite=on_nonfinite)
        return evaluate_recommendations(rec, targets, self.num_items, ks, return_ranks=return_ranks,
                                        popularity=popularity)
