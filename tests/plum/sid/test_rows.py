"""plumrec.sid.rows: validation without copies, block statistics, standardised row reads."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from plumrec.sid import rows as R
from plumrec.sid.rqvae import RQVAE


@pytest.fixture
def arrays(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "BLOCK_ROWS", 37)  # several blocks and a partial last one
    rng = np.random.default_rng(0)
    a = (rng.normal(size=(200, 6)) * 3 + 5).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    return a, np.load(tmp_path / "a.npy", mmap_mode="r")


def test_block_stats_equal_the_whole_array_stats(arrays):
    a, mapped = arrays
    model = RQVAE([6], 4, [8], [4])
    model.set_input_stats([torch.from_numpy(a)])
    mean, scale = R.block_stats(mapped)
    a64 = a.astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), a64.mean(0), rtol=0, atol=1e-6)
    assert scale.item() == pytest.approx(np.sqrt(((a64 - a64.mean(0)) ** 2).mean()), rel=1e-6)
    np.testing.assert_allclose(mean.numpy(), model.in_mean_0.numpy(), atol=1e-5)
    assert scale.item() == pytest.approx(model.in_scale_0.item(), rel=1e-5)


def test_rows_read_standardised_rows_of_a_memory_map(arrays):
    a, mapped = arrays
    mean, scale = torch.from_numpy(a.mean(0)), torch.tensor(2.5)
    whole = (torch.from_numpy(a) - mean) / scale
    for source in (mapped, torch.from_numpy(a), a.astype(np.float64)):
        rows = R.Rows([source], [mean], [scale])
        idx = torch.tensor([5, 199, 0, 5, 17])
        assert torch.equal(rows.take(idx)[0], whole[idx])
        got = torch.cat([b[0] for b in rows.blocks(rows=64)])
        assert torch.equal(got, whole)
        got = torch.cat([b[0] for b in rows.blocks(idx, rows=2)])
        assert torch.equal(got, whole[idx])


def test_validation_reads_in_blocks_and_names_the_row(arrays, tmp_path):
    a, _ = arrays
    b = a.copy()
    b[150, 3] = np.nan
    np.save(tmp_path / "b.npy", b)
    with pytest.raises(ValueError, match="embeddings contains NaN or infinite values .first at row 150"):
        R.validate_embeddings(np.load(tmp_path / "b.npy", mmap_mode="r"))
    xs = R.validate_embeddings([np.load(tmp_path / "a.npy", mmap_mode="r")])
    assert isinstance(xs[0], np.memmap)  # not copied
    with pytest.raises(ValueError, match=r"embeddings\[1\] has 199 rows"):
        R.validate_embeddings([a, a[:-1]])
