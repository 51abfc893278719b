"""The next-token loss of CPT (:func:`lm_loss`) and the checks of the SFT loss's settings.

Every loss is a weighted token cross-entropy at the packed positions that
carry a loss (``sum w * CE / sum w``, :func:`weighted_loss`) plus the
model's router aux losses; it returns ``(loss, parts)``, where ``parts``
holds the logged terms (``ce``, ``aux``, ``tokens`` and, for
:class:`~plumrec.train.codebook_loss.CodebookLoss`, :data:`LOGGED_PARTS`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from plumrec.sequences import PackedBatch

__all__ = ["lm_loss", "weighted_loss", "LOGGED_PARTS", "check_label_smoothing", "check_item_loss", "check_distill",
           "check_distill_temperature", "check_level_weights"]

LOGGED_PARTS = ("item", "distill")  # optional loss terms a loss_fn returns beside "ce", logged when present


def lm_loss(model, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
    """Weighted next-token cross-entropy at ``batch.loss_index`` plus router aux losses."""
    out = model(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, logits_index=batch.loss_index)
    ce = F.cross_entropy(out.logits.float(), batch.targets, reduction="none")
    return weighted_loss((ce * batch.weights).sum(), batch, out)


def weighted_loss(weighted_ce_sum: torch.Tensor, batch: PackedBatch, out) -> tuple[torch.Tensor, dict]:
    """``sum(w * ce) / sum(w)`` plus the router aux losses, and the logged parts."""
    loss = weighted_ce_sum / batch.weights.sum().clamp_min(1e-12)
    return loss + out.aux_loss, {"ce": loss.detach(), "aux": out.aux_loss.detach(), "tokens": batch.num_tokens}


def check_label_smoothing(value) -> float:
    """``value`` as a float in [0, 1): a label smoothing (ValueError naming ``label_smoothing`` otherwise)."""
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {value!r}")
    return float(value)


def _is_weight(v) -> bool:
    """Whether ``v`` is a finite number >= 0 (an int or a float, not a bool): a loss weight."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0


def check_item_loss(value) -> float:
    """``value`` as a float >= 0: an item-loss weight (ValueError naming ``item_loss`` otherwise)."""
    if not _is_weight(value):
        raise ValueError(f"item_loss must be a finite number >= 0, got {value!r}")
    return float(value)


def check_distill(value) -> float:
    """``value`` as a float in [0, 1]: a distillation weight (ValueError naming ``distill`` otherwise)."""
    if not _is_weight(value) or value > 1:
        raise ValueError(f"distill must be a number in [0, 1], got {value!r}")
    return float(value)


def check_distill_temperature(value) -> float:
    """``value`` as a finite float > 0 (ValueError naming ``distill_temperature`` otherwise)."""
    if not _is_weight(value) or value == 0:
        raise ValueError(f"distill_temperature must be a finite number > 0, got {value!r}")
    return float(value)


def check_level_weights(value, num_levels: int) -> list[float] | None:
    """``value`` as ``num_levels`` finite weights >= 0, not all 0, or None (ValueError naming
    ``level_weights`` otherwise)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != num_levels:
        raise ValueError(f"level_weights must be a list of {num_levels} weights (one per SID level), got {value!r}")
    out = []
    for v in value:
        if not _is_weight(v):
            raise ValueError(f"level_weights must be finite numbers >= 0, got {value!r}")
        out.append(float(v))
    if not any(out):
        raise ValueError(f"level_weights must not all be 0, got {value!r}")
    return out
