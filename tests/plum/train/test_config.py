"""The settings of one training run: their checks and the fields a resumed run may change."""
import pytest

from plumrec.train import TrainConfig
from plumrec.train.config import SAFE_TO_CHANGE


def test_bad_train_config():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"stepz": 3})
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="ema_decay must be in"):
            TrainConfig(ema_decay=bad)
    with pytest.raises(ValueError, match="ema_decay is not supported with fsdp=True"):
        TrainConfig(ema_decay=0.9, fsdp=True)
    for bad in (0.5, 0.0, float("nan")):
        with pytest.raises(ValueError, match="ema_warmup must be >= 1"):
            TrainConfig(ema_decay=0.9, ema_warmup=bad)
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 1, got 0"):
        TrainConfig(keep_checkpoints=0)
    with pytest.raises(ValueError, match=r"nonfinite must be one of \('stop', 'skip'\), got 'ignore'"):
        TrainConfig(nonfinite="ignore")


def test_resume_changes_names_each_field_a_resume_may_not_change():
    recorded = TrainConfig(steps=10, lr=1e-3).to_dict()
    assert TrainConfig.from_dict(recorded) == TrainConfig(steps=10, lr=1e-3)
    safe = {"steps": 20, "log_every": 7, "checkpoint_every": 3, "keep_checkpoints": 2, "nonfinite": "skip",
            "progress": False}
    assert set(safe) == set(SAFE_TO_CHANGE)
    assert TrainConfig(**{**recorded, **safe}).resume_changes(recorded) == []
    assert TrainConfig(**{**recorded, "betas": list(recorded["betas"])}).resume_changes(recorded) == []
    assert TrainConfig(steps=5, lr=1e-3).resume_changes(recorded) == ["steps: 10 → 5 (steps may only grow)"]
    assert TrainConfig(steps=10, lr=2e-3).resume_changes(recorded) == ["lr: 0.001 → 0.002"]
    assert TrainConfig(steps=10, lr=1e-3).resume_changes({**recorded, "old_field": 1}) == [
        "old_field: 1 → (no such field)"]
