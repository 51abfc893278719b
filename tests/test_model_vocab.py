"""SID vocabulary layout and vocabulary extension."""
import numpy as np
import pytest
import torch

from plum.model import PlumLM, SIDVocab, extend_vocabulary, preset
from plum.model.vocab import train_word_tokenizer


def test_layout_and_round_trip():
    v = SIDVocab(100, (8, 4, 2), feature_tokens=("<|f0|>", "<|f1|>"))
    assert v.token("<|pad|>") == 100 and v.feature(1) == 100 + 7 + 1
    assert v.sid_start == 109 and v.size == 109 + 14
    assert v.level_slice(1) == slice(117, 121) and v.level_offset(2) == 121
    codes = np.array([[7, 0, 1], [0, 3, 0]])
    toks = v.sid_to_tokens(codes)
    assert toks.tolist() == [[116, 117, 122], [109, 120, 121]]
    assert (v.tokens_to_sid(toks) == codes).all()
    assert len(v.token_names()) == v.size - v.base_size and v.token_names()[-1] == "<|s2_1|>"
    assert SIDVocab.from_dict(v.to_dict()) == v


def test_bad_codes_and_mismatches_raise():
    v = SIDVocab(10, (8, 4))
    with pytest.raises(ValueError, match="outside the codebook of level 1"):
        v.sid_to_tokens([[1, 4]])
    with pytest.raises(ValueError, match="L = 2 levels"):
        v.sid_to_tokens([[1, 2, 3]])
    with pytest.raises(ValueError, match="not SID tokens"):
        v.tokens_to_sid([[v.level_offset(1), v.level_offset(1)]])
    with pytest.raises(ValueError, match="SID tokenizer has codebooks"):
        v.check_codebooks((8, 8))
    with pytest.raises(ValueError, match="call extend_vocabulary"):
        v.check_model(10)
    with pytest.raises(KeyError, match="unknown special"):
        v.token("<|nope|>")
    with pytest.raises(ValueError, match="must include"):
        SIDVocab(10, (4,), special_tokens=("<|pad|>",))


@pytest.mark.parametrize("tied", [True, False])
def test_extend_vocabulary_keeps_old_rows_and_initialises_new_ones(tied):
    torch.manual_seed(0)
    model = PlumLM(preset("tiny", vocab_size=50, tie_word_embeddings=tied))
    old_emb = model.embed_tokens.weight.detach().clone()
    old_head = None if tied else model.lm_head.weight.detach().clone()
    v = SIDVocab(50, (16, 8))
    extend_vocabulary(model, v, noise_scale=0.1, seed=0)
    assert model.config.vocab_size == v.size == model.embed_tokens.weight.shape[0]
    new = model.embed_tokens.weight.detach()
    assert torch.equal(new[:50], old_emb)
    added = new[50:]
    # mean of the old rows plus small noise: close to the old mean, far below the old spread, all distinct
    assert (added.mean(0) - old_emb.mean(0)).abs().max() < 0.15 * old_emb.std()
    assert added.std(0).mean() < 0.2 * old_emb.std(0).mean()
    assert torch.unique(added, dim=0).shape[0] == added.shape[0]
    if not tied:
        assert torch.equal(model.lm_head.weight[:50], old_head) and model.lm_head.weight.shape[0] == v.size
    out = model(torch.tensor([1, v.level_offset(1) + 3]), torch.tensor([0, 2], dtype=torch.int32))
    assert out.logits.shape == (2, v.size)
    with pytest.raises(ValueError, match="base_size"):
        extend_vocabulary(model, v)


def test_word_tokenizer_splits_digits():
    tok = train_word_tokenizer(["Red shoe no. 123", "blue shoe no. 7"])
    ids = tok.encode("red shoe no. 321")
    assert len(ids) == 7 and tok.vocab_size < 20
