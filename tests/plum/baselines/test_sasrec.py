"""plumrec.baselines.SASRec: packed scoring equals scoring each user alone (causal, no padding), recommend
is the top-k of the last position's scores, history exclusion, the training dataset and loss, and bad
configs / inputs naming the argument."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from plumrec.baselines.sasrec import SASRec, SASRecConfig, SequenceDataset
from plumrec.model.model import cu_seqlens_from_lengths

HISTS = [np.array([1, 4, 2]), np.array([7]), np.array([3, 3, 8, 0, 5])]


def _model(**kw):
    torch.manual_seed(0)
    return SASRec(SASRecConfig(num_items=9, hidden_size=16, num_heads=2, max_len=6, dropout=0.0, **kw)).eval()


def test_packed_scores_equal_each_user_alone():
    m = _model()
    cu = cu_seqlens_from_lengths([len(h) for h in HISTS])
    packed = m(torch.from_numpy(np.concatenate(HISTS)), cu, 5)
    for h, s in zip(HISTS, cu[:-1].tolist()):
        alone = m(torch.from_numpy(h), cu_seqlens_from_lengths([len(h)]), len(h))
        torch.testing.assert_close(packed[s:s + len(h)], alone, rtol=1e-5, atol=1e-5)
        # causal: a prefix scores its positions as the whole sequence does
        prefix = m(torch.from_numpy(h[:1]), cu_seqlens_from_lengths([1]), 1)
        torch.testing.assert_close(prefix[0], alone[0], rtol=1e-5, atol=1e-5)


def test_recommend_is_the_top_k_of_the_last_position():
    m = _model()
    recs = m.recommend(HISTS, 4)
    for h, r in zip(HISTS, recs):
        scores = m(torch.from_numpy(h), cu_seqlens_from_lengths([len(h)]), len(h))[-1]
        want = sorted(range(9), key=lambda i: (-float(scores[i]), i))[:4]
        assert r.tolist() == want
    for h, r in zip(HISTS, m.recommend(HISTS, 4, exclude_history=True)):
        assert len(r) == 4 and not set(r.tolist()) & set(h.tolist())
    assert m.training is False and m.item_embeddings().shape == (9, 16)


def test_dataset_and_loss():
    ds = SequenceDataset([np.array([1, 2, 3]), np.array([4]), np.array([5, 6])], num_items=9, max_len=2)
    assert len(ds) == 2 and ds[0].tokens.tolist() == [2, 3] and ds[0].weights.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="no sequence has >= 2 items"):
        SequenceDataset([np.array([1])], num_items=9, max_len=4)


@pytest.mark.parametrize("kw, match", [(dict(hidden_size=15), "multiple of num_heads"),
                                       (dict(max_len=0), "max_len must be >= 1"),
                                       (dict(dropout=1.0), "dropout"), (dict(num_layers=1.5), "num_layers")])
def test_bad_config_names_the_field(kw, match):
    base = dict(num_items=9, hidden_size=16, num_heads=2)
    with pytest.raises((ValueError, TypeError), match=match):
        SASRecConfig(**{**base, **kw})


def test_bad_histories():
    m = _model()
    with pytest.raises(ValueError, match="histories"):
        m.recommend([np.array([9])], 2)
    with pytest.raises(ValueError, match="longer than max_len=6"):
        m(torch.arange(7) % 9, cu_seqlens_from_lengths([7]), 7)
