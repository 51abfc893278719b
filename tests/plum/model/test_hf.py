"""Loading Hugging Face Qwen3 / Qwen3-MoE checkpoints: logits match transformers."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")  # test-only dependency

from plumrec.model import cu_seqlens_from_lengths  # noqa: E402
from plumrec.model.hf import load_hf_config, load_hf_model, load_tokenizer  # noqa: E402

LENGTHS = (7, 3, 11)


def _hf_logits(hf_model, seqs):
    with torch.no_grad():
        return torch.cat([hf_model(s[None]).logits[0] for s in seqs])


def _randomise(model, std=0.2):
    """transformers initialises norms to 1 and the router to 0: draw everything so that a wrong mapping shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, std)


def _ours(path, seqs, **kw):
    ours = load_hf_model(path, **kw).eval()
    with torch.no_grad():
        return ours(torch.cat(seqs), cu_seqlens_from_lengths([len(s) for s in seqs])).logits


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_logits_match_transformers(tmp_path, norm_topk_prob):
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=48, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
        mlp_only_layers=[1], norm_topk_prob=norm_topk_prob, tie_word_embeddings=False,
        rope_theta=5000.0)
    hf = transformers.Qwen3MoeForCausalLM(cfg).eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path)
    seqs = [torch.randint(0, 120, (n,)) for n in LENGTHS]
    ref = _hf_logits(hf, seqs)
    out = _ours(tmp_path, seqs)
    assert ref.abs().max() > 0.5  # a meaningful comparison, not near-zero logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_qwen3_dense_tied_logits_match_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=90, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=1, head_dim=16, intermediate_size=40,
                                   tie_word_embeddings=True)
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path)
    seqs = [torch.randint(0, 90, (n,)) for n in LENGTHS]
    ref = _hf_logits(hf, seqs)
    out = _ours(tmp_path, seqs)
    assert load_hf_config(tmp_path).num_experts == 0
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_fused_expert_layout_is_accepted(tmp_path):
    """transformers 5 keeps experts fused in memory ([E, 2f, d], [E, d, f]); both layouts load the same."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=8, moe_intermediate_size=12, num_experts=3,
                                      num_experts_per_tok=2)
    hf = transformers.Qwen3MoeForCausalLM(cfg).eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path / "a")
    sd = load_file(str(tmp_path / "a" / "model.safetensors"))
    pre = "model.layers.0.mlp.experts."
    gate = torch.stack([sd.pop(f"{pre}{e}.gate_proj.weight") for e in range(3)])
    up = torch.stack([sd.pop(f"{pre}{e}.up_proj.weight") for e in range(3)])
    down = torch.stack([sd.pop(f"{pre}{e}.down_proj.weight") for e in range(3)])
    sd[pre + "gate_up_proj"] = torch.cat([gate, up], 1).contiguous()
    sd[pre + "down_proj"] = down.contiguous()
    (tmp_path / "b").mkdir()
    save_file(sd, str(tmp_path / "b" / "model.safetensors"))
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    a = load_hf_model(tmp_path / "a").state_dict()
    b = load_hf_model(tmp_path / "b").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_other_architecture_and_bad_checkpoints_raise(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                      "vocab_size": 10, "hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type 'llama'.*qwen3"):
        load_hf_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_model(tmp_path / "missing")
    cfg = transformers.Qwen3Config(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=8, intermediate_size=20)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "q")
    conf = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**conf, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match=r"does not match its config.json: missing \['layers.1"):
        load_hf_model(tmp_path / "q")
    (tmp_path / "q" / "config.json").write_text(json.dumps({**conf, "rope_scaling": {"rope_type": "yarn"},
                                                            "rope_parameters": None}))
    with pytest.raises(ValueError, match="RoPE scaling 'yarn'"):
        load_hf_model(tmp_path / "q")


def test_tokenizer_json_loads_with_tokenizers(tmp_path):
    from plumrec.model.vocab import train_word_tokenizer

    tok = train_word_tokenizer(["red shoes", "blue shoes no. 12"])
    tok.save(str(tmp_path / "tokenizer.json"))
    back = load_tokenizer(tmp_path)
    assert back.encode("blue shoes") == tok.encode("blue shoes") and len(back.encode("no. 12")) == 4
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nothing")


def test_damaged_checkpoint_files_name_the_file(tmp_path):
    cfg = transformers.Qwen3Config(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=8, intermediate_size=20)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp_path)
    conf = (tmp_path / "config.json").read_text()
    weights = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "config.json").write_text(conf[: len(conf) // 2])
    with pytest.raises(ValueError, match=r"config.json: line \d+: not valid JSON"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_bytes(conf.encode().replace(b'"qwen3"', b'"qw\xe9n3"'))
    with pytest.raises(ValueError, match=r"config.json: line \d+: not UTF-8"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in json.loads(conf).items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match="config.json lacks the field 'hidden_size'"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(conf)
    (tmp_path / "model.safetensors").write_bytes(weights[: len(weights) - 100])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_hf_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "shard-1.safetensors"}}))
    with pytest.raises(ValueError, match="shard-1.safetensors not found: .*index.json lists it"):
        load_hf_model(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../elsewhere"}}))
    with pytest.raises(ValueError, match="'weight_map' must map tensor names to shard files"):
        load_hf_model(tmp_path)
