"""The optimiser side of training: AdamW's parameter groups, the learning-rate schedule and the weight
average (the average inside a training run: test_loop.py)."""
import pytest
import torch

from plumrec.train import TrainConfig
from plumrec.train.optim import ParameterEMA, lr_lambda, make_optimizer


def test_schedule_warmup_then_cosine():
    f = lr_lambda(TrainConfig(steps=10, warmup_steps=2, min_lr_ratio=0.1))
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(2, 10))


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False))
    model[2].weight.requires_grad_(False)
    opt = make_optimizer(model, TrainConfig(lr=0.01, weight_decay=0.2, betas=(0.8, 0.9)))
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [(4, 3)] and decay["weight_decay"] == 0.2
    assert [p.shape for p in no_decay["params"]] == [(4,), (4,), (4,)] and no_decay["weight_decay"] == 0.0
    assert isinstance(opt, torch.optim.AdamW) and decay["lr"] == 0.01 and decay["betas"] == (0.8, 0.9)


def test_parameter_ema_follows_its_warm_up_then_its_decay():
    model = torch.nn.Linear(2, 1)
    ema = ParameterEMA(model, decay=0.5, warmup=3)
    assert [ema.decay_at(t) for t in (1, 2, 3)] == [0.5, 0.5, 0.5] and ParameterEMA(model, 0.9).decay_at(1) == 2 / 11
    start = {n: v.clone() for n, v in ema.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(1)  # d_1 = min(0.5, 2 / 4) = 0.5
    torch.testing.assert_close(ema.state_dict()["weight"], start["weight"] + 0.5)
    torch.testing.assert_close(ema.state_dict()["bias"], start["bias"])
    ema.copy_to_model()
    torch.testing.assert_close(model.weight.detach(), start["weight"] + 0.5)
    ema.load_state_dict(start)
    torch.testing.assert_close(ema.state_dict()["weight"], start["weight"])


def test_parameter_ema_refuses_bad_settings_and_foreign_state():
    model = torch.nn.Linear(2, 1)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="ema_decay must be in"):
            ParameterEMA(model, bad)
    with pytest.raises(ValueError, match=r"ema_warmup must be >= 1 \(1: no warm-up\), got 0.5"):
        ParameterEMA(model, 0.9, warmup=0.5)
    with pytest.raises(ValueError, match=r"EMA state has parameters \['bias'\]"):
        ParameterEMA(model, 0.9).load_state_dict({"weight": torch.zeros(1, 2)})
