"""The next-token loss of CPT and the checks of the SFT loss's settings (the codebook loss:
test_codebook_loss.py)."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from plumrec.sequences import Example, pack
from plumrec.train.losses import (
    check_distill,
    check_distill_temperature,
    check_item_loss,
    check_label_smoothing,
    check_level_weights,
    lm_loss,
    weighted_loss,
)


class _FixedLogits(torch.nn.Module):
    """A 'model' whose logits at every position are one learnt row, and a fixed router aux loss."""

    def __init__(self, vocab_size=5, aux=0.25):
        super().__init__()
        self.row = torch.nn.Parameter(torch.linspace(-1, 1, vocab_size, dtype=torch.float64))
        self.aux = torch.tensor(aux, dtype=torch.float64)

    def forward(self, input_ids, cu_seqlens, max_seqlen, logits_index):
        return SimpleNamespace(logits=self.row.expand(len(logits_index), -1), aux_loss=self.aux)


def test_lm_loss_is_the_weighted_token_cross_entropy_plus_aux():
    batch = pack([Example(np.array([0, 3, 4]), np.array([0, 1, 3], np.float32)),
                  Example(np.array([1, 2]), np.array([0, 2], np.float32))])
    model = _FixedLogits()
    loss, parts = lm_loss(model, batch)
    logp = torch.log_softmax(model.row.detach().float(), -1)
    ce = {t: -float(logp[t]) for t in (2, 3, 4)}
    ref = (1 * ce[3] + 3 * ce[4] + 2 * ce[2]) / 6
    assert float(parts["ce"]) == pytest.approx(ref, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(ref + 0.25, rel=1e-6)
    assert float(parts["aux"]) == 0.25 and parts["tokens"] == 5
    loss.backward()
    assert model.row.grad is not None and not parts["ce"].requires_grad


def test_weighted_loss_of_zero_weights_is_zero_not_nan():
    batch = pack([Example(np.array([0, 1]), np.array([0, 0], np.float32))])
    loss, parts = weighted_loss(torch.tensor(0.0), batch, SimpleNamespace(aux_loss=torch.tensor(0.5)))
    assert float(parts["ce"]) == 0.0 and float(loss) == 0.5


def test_setting_checks_return_floats_and_name_the_setting():
    assert check_label_smoothing(0) == 0.0 and check_item_loss(2) == 2.0 and check_distill(1) == 1.0
    assert check_distill_temperature(0.5) == 0.5 and check_level_weights(None, 3) is None
    assert check_level_weights((1, 0, 2.5), 3) == [1.0, 0.0, 2.5]
    cases = [(check_label_smoothing, (1.0, -0.1, "0.1"), r"label_smoothing must be in \[0, 1\)"),
             (check_item_loss, (-1, math.inf, True, "1"), "item_loss must be a finite number >= 0"),
             (check_distill, (1.5, -0.1, math.nan, False), r"distill must be a number in \[0, 1\]"),
             (check_distill_temperature, (0, -1.0, math.inf), "distill_temperature must be a finite number > 0")]
    for check, values, message in cases:
        for v in values:
            with pytest.raises(ValueError, match=message):
                check(v)
    for v, message in (([1, 1], "must be a list of 3 weights"), ("abc", "must be a list of 3 weights"),
                       ([1, -1, 1], "must be finite numbers >= 0"), ([0, 0, 0], "must not all be 0")):
        with pytest.raises(ValueError, match=f"level_weights {message}"):
            check_level_weights(v, 3)
