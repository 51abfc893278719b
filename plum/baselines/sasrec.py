"""SASRec-style baseline: a causal transformer over item ids with a full
item-embedding table (the large-embedding-table kind of model PLUM is
compared with), trained with cross-entropy over *all* items at every
position of the training sequences (RecBole's CE variant of SASRec, which
beats the original negative-sampling loss).

Packed like the LM (no padding): a batch is item sequences back to back with
``cu_seqlens``; attention is ``plum_kernels.torch.history_attention``. Scores of a
position are ``h @ item_embedding.T`` (tied input/output table).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import plum_kernels.torch as K
from plumrec.metrics import drop_history, evaluate_lists, topk_from_scores
from plumrec.model.model import cu_seqlens_from_lengths, positions_from_cu_seqlens
from plumrec.sequences import Example, PackedBatch, check_histories

__all__ = ["SASRecConfig", "SASRec", "SequenceDataset", "sasrec_loss"]


@dataclass(frozen=True)
class SASRecConfig:
    num_items: int
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 1
    max_len: int = 50
    dropout: float = 0.1

    def __post_init__(self):
        for name in ("num_items", "hidden_size", "num_layers", "num_heads", "max_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {v!r}")
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")


class _Block(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        d = cfg.hidden_size
        self.h, self.dh = cfg.num_heads, d // cfg.num_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(d, d))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cu: Tensor, max_len: int) -> Tensor:
        T = x.shape[0]
        q, k, v = self.qkv(self.ln1(x)).view(T, 3, self.h, self.dh).unbind(1)
        a = K.history_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu, max_len, causal=True)
        x = x + self.drop(self.out(a.reshape(T, -1)))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.config = cfg
        self.item_embedding = nn.Embedding(cfg.num_items, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_len, cfg.hidden_size)
        self.layers = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, items: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, index: Tensor | None = None) -> Tensor:
        """Scores over all items ``[T or M, num_items]`` at every packed position (or at ``index``)."""
        pos = positions_from_cu_seqlens(cu_seqlens, items.shape[0])
        if int(pos.max()) >= self.config.max_len:
            raise ValueError(f"a sequence is longer than max_len={self.config.max_len}")
        x = self.drop(self.item_embedding(items) * self.config.hidden_size ** 0.5 + self.position_embedding(pos))
        for layer in self.layers:
            x = layer(x, cu_seqlens, max_seqlen)
        h = self.norm(x if index is None else x[index])
        return h @ self.item_embedding.weight.T

    def item_embeddings(self) -> np.ndarray:
        """The trained item table ``[num_items, hidden_size]`` float32, a copy on the CPU: a
        collaborative item embedding (items bought in the same contexts lie close), e.g. a
        second input of the SID tokenizer (:meth:`plumrec.sid.SemanticIdTokenizer.fit`)."""
        return self.item_embedding.weight.detach().float().cpu().numpy().copy()

    @torch.no_grad()
    def recommend(self, histories: Sequence[np.ndarray], k: int, batch_size: int = 256, *,
                  exclude_history: bool = False) -> list[np.ndarray]:
        """Top-``k`` item indices per history (best first, ties: lower index).

        With ``exclude_history`` the items of each (whole, untruncated) history are never returned:
        their scores are set to -inf before the top-k (see :mod:`plumrec.metrics`).
        """
        check_histories(histories, self.config.num_items, "histories")
        was = self.training
        self.eval()
        dev = self.item_embedding.weight.device
        out = []
        try:
            for s in range(0, len(histories), batch_size):
                full = [np.asarray(h, np.int64) for h in histories[s:s + batch_size]]
                hs = [h[-self.config.max_len:] for h in full]
                if any(len(h) == 0 for h in hs):
                    raise ValueError("every history needs at least one item")
                cu = cu_seqlens_from_lengths([len(h) for h in hs], device=dev)
                ids = torch.from_numpy(np.concatenate(hs)).to(dev)
                scores = self(ids, cu, max(len(h) for h in hs), index=(cu[1:] - 1).long()).float()
                if exclude_history:
                    rows = torch.from_numpy(np.repeat(np.arange(len(full)), [len(h) for h in full])).to(dev)
                    scores[rows, torch.from_numpy(np.concatenate(full)).to(dev)] = float("-inf")
                    # the -inf scores refill the top k; dropping them again only matters when fewer than k
                    # items are left outside the history (tiny catalogues), where -inf would fill the rest
                    out.extend(drop_history(r, h) for r, h in zip(topk_from_scores(scores, k), full))
                else:
                    out.extend(topk_from_scores(scores, k))
        finally:
            self.train(was)
        return out

    def evaluate(self, histories, targets, ks=(5, 10), *, exclude_history: bool = False, return_ranks: bool = False,
                 popularity=None):
        """Recall/NDCG/coverage@K over all items (``exclude_history``: see :meth:`recommend`) and the exposure
        measures (``popularity [M]``: training item counts, see :func:`~plumrec.metrics.exposure_metrics`);
        ``return_ranks``: ``(metrics, per-user target ranks)`` as in ``GenerativeRetriever.evaluate``."""
        return evaluate_lists(self.recommend(histories, max(ks), exclude_history=exclude_history), targets,
                              self.config.num_items, ks, return_ranks=return_ranks, popularity=popularity)


class SequenceDataset:
    """Each user's training sequence (its last ``max_len`` items) as one example; every position predicts the next."""

    def __init__(self, sequences: Sequence[np.ndarray], num_items: int, max_len: int):
        check_histories(sequences, num_items, "sequences")
        self.sequences = [np.asarray(s, np.int64)[-max_len:] for s in sequences if len(s) >= 2]
        if not self.sequences:
            raise ValueError("no sequence has >= 2 items")

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> Example:
        s = self.sequences[i]
        w = np.ones(len(s), np.float32)
        w[0] = 0.0
        return Example(s, w)


def sasrec_loss(model, batch: PackedBatch):
    scores = model(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, index=batch.loss_index)
    ce = F.cross_entropy(scores.float(), batch.targets, reduction="none")
    loss = (ce * batch.weights).sum() / batch.weights.sum().clamp_min(1e-12)
    return loss, {"ce": loss.detach(), "aux": torch.zeros(()), "tokens": batch.num_tokens}
