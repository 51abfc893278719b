"""Exporting a PlumLM as a Hugging Face Qwen3 / Qwen3-MoE checkpoint: transformers runs it to the same
logits, AutoTokenizer gives our ids, and load_hf_model reads it back exactly."""
import json

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")  # the [hf] extra

from plumrec.cli import main  # noqa: E402
from plumrec.model import ModelConfig, PlumLM, SIDVocab, cu_seqlens_from_lengths  # noqa: E402
from plumrec.model.hf import load_hf_config, load_hf_model  # noqa: E402
from plumrec.model.hf_export import export_hf, hf_config_dict, parse_shard_size  # noqa: E402
from plumrec.model.vocab import TextTokenizer, train_word_tokenizer  # noqa: E402
from plumrec.pipeline.workspace import save_model  # noqa: E402

LENGTHS = (7, 3, 11, 1)
CORPUS = ["the quick brown fox jumps over the lazy dog", "red shoes and blue hats for the summer"]


def _text() -> TextTokenizer:
    return train_word_tokenizer(CORPUS)


def _vocab(text: TextTokenizer, gap: int = 5) -> SIDVocab:
    """``gap`` ids between the text tokenizer's vocabulary and base_size (a padded embedding, as Qwen3's)."""
    return SIDVocab(base_size=text.vocab_size + gap, codebook_sizes=(8, 6, 4), feature_tokens=("<|f_a|>",))


def _model(vocab: SIDVocab, moe: bool, seed: int = 0, **kw) -> PlumLM:
    """A tiny model with every parameter drawn (norms near 1), so that a wrong mapping shows."""
    fields = dict(vocab_size=vocab.size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, intermediate_size=48, rope_theta=5000.0, rms_norm_eps=1e-5,
                  max_position_embeddings=64, hidden_dropout=0.1, router_z_loss_coef=0.02, initializer_range=0.03)
    if moe:
        fields.update(moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2, mlp_only_layers=(1,),
                      norm_topk_prob=False, tie_word_embeddings=False, router_aux_loss_coef=0.05)
    else:
        fields.update(num_experts=0, tie_word_embeddings=True)
    fields.update(kw)
    torch.manual_seed(seed)
    model = PlumLM(ModelConfig(**fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both exports (dense tied, MoE untied), sharded at 20 kB."""
    text = _text()
    vocab = _vocab(text)
    out = {}
    for moe in (False, True):
        model = _model(vocab, moe)
        path = tmp_path_factory.mktemp("moe" if moe else "dense") / "hf"
        info = export_hf(model, vocab, text, path, max_shard_size="20KB")
        out[moe] = (model, vocab, text, path, info)
    return out


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_transformers_logits_match_ours(exported, moe):
    """A packed batch through PlumLM equals transformers on the same sequences right-padded in one batch and
    one at a time (fp32: |diff| <= 1e-5 * max|logit| + 1e-5 * |logit|)."""
    model, vocab, _, path, info = exported[moe]
    hf, loading = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    hf.eval()
    assert type(hf).__name__ == ("Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM")
    assert hf.dtype == torch.float32 and info["model_type"] == ("qwen3_moe" if moe else "qwen3")
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    torch.manual_seed(3)
    seqs = [torch.randint(0, vocab.size, (n,)) for n in LENGTHS]
    with torch.no_grad():
        ours = model(torch.cat(seqs), cu_seqlens_from_lengths(LENGTHS)).logits
        ids = torch.zeros(len(seqs), max(LENGTHS), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = s, 1
        padded = hf(input_ids=ids, attention_mask=mask).logits
        padded = torch.cat([padded[i, :n] for i, n in enumerate(LENGTHS)])
        single = torch.cat([hf(input_ids=s[None]).logits[0] for s in seqs])
    assert padded.abs().max() > 1.0  # a meaningful comparison, not near-zero logits
    for ref in (padded, single):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_files_follow_the_hf_sharding_convention(exported):
    model, vocab, _, path, info = exported[True]
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (path / "model.safetensors").exists()
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == info["total_size"] == sum(
        v.numel() * v.element_size() for v in model.state_dict().values())
    assert "model.layers.2.mlp.experts.5.down_proj.weight" in index["weight_map"]
    assert "model.layers.1.mlp.gate_proj.weight" in index["weight_map"]  # mlp_only_layers=(1,): dense
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["num_experts"] == 6 and cfg["mlp_only_layers"] == [1]
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        vocab.token("<|bos|>"), vocab.token("<|eos|>"), vocab.token("<|pad|>"))
    assert not list(path.parent.glob("*.tmp"))  # the temporary folder was renamed


def test_unsharded_export_is_one_file(tmp_path):
    text = _text()
    vocab = _vocab(text, gap=0)
    export_hf(_model(vocab, moe=False), vocab, text, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()  # tied


def test_out_dir_must_be_new_empty_or_an_export(exported, tmp_path):
    model, vocab, text, path, _ = exported[False]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    for out in (tmp_path / "mine", tmp_path / "file"):
        with pytest.raises(ValueError, match="out_dir"):
            export_hf(model, vocab, text, out)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    export_hf(model, vocab, text, tmp_path / "empty")
    export_hf(model, vocab, text, tmp_path / "empty", max_shard_size="10KB")  # an earlier export is replaced
    assert not (tmp_path / "empty" / "model.safetensors").exists()
    assert (tmp_path / "empty" / "model.safetensors.index.json").exists()


def test_autotokenizer_gives_our_ids(exported):
    _, vocab, text, path, _ = exported[True]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    s = "The fox <|s0_3|><|s1_5|> <|s2_0|> red<|bos|>hats <|f_a|>"
    want = (text.encode("the fox") + vocab.sid_to_tokens([3, 5, 0]).tolist() + text.encode("red")
            + [vocab.token("<|bos|>")] + text.encode("hats") + [vocab.token("<|f_a|>")])
    assert tok(s).input_ids == want
    assert tok(s, add_special_tokens=False).input_ids == want
    assert len(tok) == vocab.size
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        vocab.token("<|bos|>"), vocab.token("<|eos|>"), vocab.token("<|pad|>"))
    assert tok.convert_ids_to_tokens(vocab.level_offset(2) + 3) == "<|s2_3|>"
    assert "<|s1_5|>" in tok.decode(want, skip_special_tokens=True)  # SID tokens are not special


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_round_trip_is_exact(exported, moe):
    model, _, _, path, _ = exported[moe]
    back = load_hf_model(path)
    assert back.config == model.config  # the training-only settings included
    mine, theirs = model.state_dict(), back.state_dict()
    assert list(mine) == list(theirs)
    for k in mine:
        assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), k


def test_bfloat16_round_trip_is_exact(tmp_path):
    text = _text()
    vocab = _vocab(text)
    model = _model(vocab, moe=True, seed=1).to(torch.bfloat16)
    export_hf(model, vocab, text, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    back = load_hf_model(tmp_path / "hf", dtype=torch.bfloat16)
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_cli_exports_a_saved_model(tmp_path, capsys):
    text = _text()
    vocab = _vocab(text)
    model = _model(vocab, moe=True, seed=2)
    save_model(model, vocab, text, tmp_path / "plum")
    assert main(["export-hf", "--model", str(tmp_path / "plum"), "--out", str(tmp_path / "hf"),
                 "--max-shard-size", "30000"]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == "qwen3_moe"
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    back = load_hf_model(tmp_path / "hf")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    assert load_hf_config(tmp_path / "hf") == model.config


def test_parse_shard_size():
    assert parse_shard_size(123) == 123
    assert parse_shard_size("5GB") == 5 * 10**9
    assert parse_shard_size("2MiB") == 2 * 2**20
    assert parse_shard_size("20kb") == 20_000
    for bad in (0, -1, "5 parsecs", "GB", True, 1.5, None):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_shard_size(bad)


def test_bad_input_raises_and_writes_nothing(tmp_path):
    text = _text()
    vocab = _vocab(text)
    model = _model(vocab, moe=True)
    out = tmp_path / "hf"
    cases = [
        ((model, _vocab(text, gap=3), text), "vocab_size"),                      # vocabulary of another model
        ((model, vocab, train_word_tokenizer(CORPUS + ["many more words a b c d e f g h i j"])),
         "text: the text tokenizer has"),
        ((model, vocab, "tokenizer.json"), "text must be a TextTokenizer"),
        ((model, {"base_size": 3}, text), "vocab must be a SIDVocab"),
        ((torch.nn.Linear(2, 2), vocab, text), "model must be a PlumLM"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            export_hf(*args, out)
    with pytest.raises(ValueError, match="max_shard_size"):
        export_hf(model, vocab, text, out, max_shard_size="big")
    mixed = _model(vocab, moe=True)
    mixed.norm.to(torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        export_hf(mixed, vocab, text, out)
    extra = _model(vocab, moe=False)
    extra.adapter = torch.nn.Linear(4, 4)  # a feature Qwen3 lacks
    with pytest.raises(ValueError, match="parameters Qwen3 lacks"):
        export_hf(extra, vocab, text, out)
    clash = TextTokenizer(text.tokenizer)
    clash.tokenizer = train_word_tokenizer(CORPUS).tokenizer
    clash.tokenizer.add_tokens(["<|s0_1|>"])
    with pytest.raises(ValueError, match="already has"):
        export_hf(model, vocab, clash, out)
    with pytest.raises(ValueError, match="dtype"):
        hf_config_dict(model.config, vocab, torch.float64)
    assert not out.exists() and not list(tmp_path.iterdir())
