"""``plumrec.pipeline.recipe``: the ``"auto"`` codebook sizes and preset from the catalogue and log sizes."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from retrieval_data import write_dataset

from plumrec.pipeline.recipe import (
    DEEPER_LEVELS,
    LARGE_LOG_PRESET,
    LARGE_LOG_TARGETS,
    SMALL_LOG_PRESET,
    codebook_sizes_for,
    preset_for,
    resolve_auto,
    training_targets,
)
from plumrec.pipeline.settings import model_config


@pytest.mark.parametrize("items, sizes", [(12_101, [1024, 64, 32, 16]), (11_924, [1024, 64, 32, 16]),
                                          (18_357, [1024, 64, 32, 16]), (10_000_000, [2048, 1024, 512, 256]),
                                          (4_000, [256, 64, 32, 16]), (5, [64, 64, 32, 16])])
def test_codebook_sizes_keep_the_tuned_sizes_and_grow_with_the_catalogue(items, sizes):
    """Beauty, Toys and Sports get the sizes chosen on Beauty, 10M items the scale benchmark's."""
    assert codebook_sizes_for(items) == sizes


def test_codebook_sizes_give_room_to_every_catalogue_size():
    """From 4k to 1M items and beyond: powers of two, never narrower as the catalogue grows, and at least 30 leaves
    per item (the SIDs can stay unique)."""
    last = None
    for items in [2 ** k for k in range(6, 25)] + [3 * 10 ** k for k in range(3, 7)]:
        sizes = codebook_sizes_for(items)
        assert len(sizes) == 1 + len(DEEPER_LEVELS) and all(s & (s - 1) == 0 for s in sizes)
        prod = 1
        for s in sizes:
            prod *= s
        assert prod >= 30 * items, (items, sizes)
        if last is not None and items > last[0]:
            assert all(a >= b for a, b in zip(sizes, last[1])), (items, sizes, last)
        last = (items, sizes)


def test_preset_grows_with_the_log_and_bad_sizes_are_refused():
    assert preset_for(131_413) == SMALL_LOG_PRESET and preset_for(LARGE_LOG_TARGETS) == LARGE_LOG_PRESET
    assert training_targets([[1, 2, 3], [4], []]) == 2
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_items"):
            codebook_sizes_for(bad)
    with pytest.raises(ValueError, match="num_targets"):
        preset_for(-1)


def test_resolve_auto_reads_the_dataset_and_keeps_explicit_values(tmp_path):
    data = write_dataset(tmp_path / "d", num_items=48, num_users=40, seed=1)
    args = SimpleNamespace(dataset=str(data), codebook_sizes="auto", preset="auto", model_overrides={},
                           model_config=None)
    chosen = resolve_auto(args)
    assert args.codebook_sizes == chosen["codebook_sizes"] == codebook_sizes_for(48)
    assert args.preset == chosen["preset"] == SMALL_LOG_PRESET and chosen["items"] == 48
    assert 0 < chosen["training_targets"] < 40 * 8 and args.model_config == model_config(SMALL_LOG_PRESET, {})
    args = SimpleNamespace(dataset=str(tmp_path / "missing"), codebook_sizes=[8, 4], preset="tiny")
    assert resolve_auto(args) == {} and args.codebook_sizes == [8, 4] and args.preset == "tiny"
