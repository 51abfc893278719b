"""A tiny random sentence-transformers (BERT) directory for tests that embed
item text without the optional all-MiniLM-L6-v2 package."""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = "the a red blue nail polish cream shampoo soft light gold ##s ##ing mini set".split()


def make_tiny_bert_dir(d: Path, words=WORDS) -> Path:
    """A random 2-layer BERT sentence-transformers directory with a WordPiece tokenizer."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from plumrec.data.text import BertConfig, BertEncoder

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", *words])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tok.save(str(d / "tokenizer.json"))
    config = dict(model_type="bert", vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                  type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")
    (d / "config.json").write_text(json.dumps(config))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    g = torch.Generator().manual_seed(0)
    model = BertEncoder(BertConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    state = {k: v.detach() + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point()
             else v.detach() for k, v in model.state_dict().items()}  # non-trivial LN
    state["pooler.dense.weight"] = torch.randn(32, 32, generator=g)  # present in real checkpoints, unused
    state["embeddings.position_ids"] = torch.arange(64)[None]
    save_file(state, str(d / "model.safetensors"))
    return d
