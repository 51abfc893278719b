"""The PLUM LM's config: checks, presets, parameter and FLOP counts, round trip (the model built from it:
test_model.py)."""
import json

import pytest
from model_configs import small_config as small

from plumrec.model import ModelConfig, preset
from plumrec.model.config import PRESET_TARGETS, PRESETS


@pytest.mark.parametrize("name", sorted(PRESET_TARGETS))
def test_presets_are_near_their_activated_size(name):
    cfg = PRESETS[name]
    assert abs(cfg.activated_params() / PRESET_TARGETS[name] - 1) < 0.1
    assert cfg.kernel_head_dim_ok and cfg.num_params() > cfg.activated_params()


def test_small_preset_is_tiny_widened_with_dropout():
    """The Beauty benchmark's model: tiny's structure at twice the width, dropout 0.1."""
    wide = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
                moe_intermediate_size=256, hidden_dropout=0.1)
    assert preset("small") == preset("tiny", **wide)
    assert preset("tiny").hidden_dropout == 0.0
    assert preset("small", vocab_size=4583).num_params() == 2_748_672


def test_medium_preset_is_tiny_three_times_wider_with_dropout():
    """bench_retrieval's default: tiny's structure at three times the width, dropout 0.2."""
    wide = dict(hidden_size=384, num_attention_heads=6, num_key_value_heads=3, intermediate_size=768,
                moe_intermediate_size=384, hidden_dropout=0.2)
    assert preset("medium") == preset("tiny", **wide)
    assert preset("medium", vocab_size=4583).num_params() == 5_302_528


def test_medium_deep_preset_is_medium_with_a_third_layer():
    """bench_retrieval's default: medium with a second MoE layer."""
    cfg = preset("medium-deep", vocab_size=5239)  # Beauty's vocabulary at the default SIDs
    assert cfg == preset("medium", num_hidden_layers=3, vocab_size=5239)
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert (cfg.num_params(), cfg.activated_params()) == (7_768_704, 5_999_232)


@pytest.mark.parametrize("bad, match", [
    (dict(num_attention_heads=3), "multiple of num_key_value_heads"),
    (dict(head_dim=15), "even"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(mlp_only_layers=(7,)), "mlp_only_layers"),
    (dict(kernel_impl="cuda"), "kernel_impl"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(hidden_dropout=1.0), "hidden_dropout"),
    (dict(hidden_dropout=-0.1), "hidden_dropout"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        small(**bad)


def test_config_round_trip_and_unknown_fields():
    cfg = small()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_layer": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_counts_and_flops_follow_the_layers():
    cfg = small()
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert cfg.num_params() > cfg.activated_params()  # 4 experts, 2 active
    assert small(num_experts=0, mlp_only_layers=()).num_params() == small(num_experts=0,
                                                                           mlp_only_layers=()).activated_params()
    assert cfg.flops_per_token(0, training=False) == 2 * cfg.activated_params()
    with pytest.raises(ValueError, match="seq_len must be >= 0, got -1"):
        cfg.flops_per_token(-1)
    assert not cfg.kernel_head_dim_ok and small(head_dim=64).kernel_head_dim_ok


def test_replace_and_json():
    cfg = small()
    assert cfg.replace(hidden_dropout=0.1) == small(hidden_dropout=0.1) and cfg.hidden_dropout == 0.0
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
