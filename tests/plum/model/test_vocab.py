"""SID vocabulary layout and vocabulary extension."""
import numpy as np
import pytest
import torch

from plumrec.model import PlumLM, SIDVocab, extend_vocabulary, init_sid_embeddings, preset
from plumrec.model.vocab import TextTokenizer, train_word_tokenizer


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


def _codewords(sizes, d, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((v, d)) / (l + 1)).astype(dtype) for l, v in enumerate(sizes)]


@pytest.mark.parametrize("tied", [True, False])
def test_init_sid_embeddings_adds_projected_codewords(tied):
    """Only the SID rows move; per level the added rows are the codewords times one [D, H] matrix (solved
    for in float64 with zero residual), of mean norm ``scale``; equal codewords get equal rows; the
    codewords' geometry survives (pairwise cosines correlate); the seed fixes the projection."""
    torch.manual_seed(0)
    v = SIDVocab(30, (16, 8, 4))
    model = PlumLM(preset("tiny", vocab_size=v.size, tie_word_embeddings=tied)).double()
    cw = _codewords(v.codebook_sizes, 6)
    cw[0][3] = cw[0][5]  # two codes with one codeword
    weights = [model.embed_tokens.weight] + ([] if tied else [model.lm_head.weight])
    before = [w.detach().clone() for w in weights]
    init_sid_embeddings(model, v, cw, scale=0.7, seed=3)
    added = [w.detach() - b for w, b in zip(weights, before)]
    for a in added:
        assert torch.equal(a[:v.sid_start], torch.zeros_like(a[:v.sid_start]))
        for l, c in enumerate(cw):
            s, c = a[v.level_slice(l)], torch.from_numpy(c).double()
            assert s.norm(dim=1).mean().item() == pytest.approx(0.7, rel=1e-9)
            proj = torch.linalg.lstsq(c, s).solution
            torch.testing.assert_close(c @ proj, s, rtol=0, atol=1e-10)
            if l == 0:
                torch.testing.assert_close(s[3], s[5], rtol=0, atol=1e-15)
            def cos(m):
                return torch.nn.functional.normalize(m, dim=1) @ torch.nn.functional.normalize(m, dim=1).T
            iu = torch.triu_indices(len(c), len(c), 1)
            r = np.corrcoef(cos(c)[iu[0], iu[1]].numpy(), cos(s)[iu[0], iu[1]].numpy())[0, 1]
            assert r > 0.6
    if not tied:  # embedding and head get the same rows
        torch.testing.assert_close(added[0], added[1], rtol=0, atol=1e-15)
    again = PlumLM(preset("tiny", vocab_size=v.size, tie_word_embeddings=tied)).double()
    base = again.embed_tokens.weight.detach().clone()
    init_sid_embeddings(again, v, cw, scale=0.7, seed=3)
    torch.testing.assert_close(again.embed_tokens.weight.detach() - base, added[0], rtol=0, atol=1e-12)
    other = PlumLM(preset("tiny", vocab_size=v.size, tie_word_embeddings=tied)).double()
    base = other.embed_tokens.weight.detach().clone()
    init_sid_embeddings(other, v, cw, scale=0.7, seed=4)
    assert not torch.allclose(other.embed_tokens.weight.detach() - base, added[0])


def test_init_sid_embeddings_rejects_bad_input():
    v = SIDVocab(30, (16, 8))
    model = PlumLM(preset("tiny", vocab_size=v.size))
    cw = _codewords(v.codebook_sizes, 6)
    before = model.embed_tokens.weight.detach().clone()
    for bad, match in [((cw[:1], 1.0), "1 levels but vocab has 2"),
                       (([cw[0], cw[1][:5]], 1.0), r"codewords\[1\] must be \[8, D\]"),
                       (([cw[0], cw[1][:, :4]], 1.0), r"codewords\[1\] has width 4"),
                       (([cw[0], np.full((8, 6), np.nan)], 1.0), r"codewords\[1\] has non-finite"),
                       (([cw[0], np.zeros((8, 6))], 1.0), r"codewords\[1\] are all zero"),
                       ((cw, 0.0), "scale must be a finite number > 0"),
                       ((cw, float("inf")), "scale must be a finite number > 0"),
                       ((cw, True), "scale must be a finite number > 0")]:
        with pytest.raises(ValueError, match=match):
            init_sid_embeddings(model, v, bad[0], scale=bad[1])
    assert torch.equal(model.embed_tokens.weight.detach(), before)  # nothing half-written
    with pytest.raises(ValueError, match="call extend_vocabulary"):
        init_sid_embeddings(PlumLM(preset("tiny", vocab_size=30)), v, cw, scale=1.0)


def test_malformed_vocab_dicts_and_tokenizer_files_raise_naming_the_field_or_file(tmp_path):
    d = SIDVocab(10, (8, 4)).to_dict()
    for field, bad in (("base_size", "10"), ("codebook_sizes", 8), ("codebook_sizes", [8, True]),
                       ("special_tokens", ["<|bos|>", 3]), ("feature_tokens", None)):
        with pytest.raises(ValueError, match=f"SIDVocab field '{field}' must be"):
            SIDVocab.from_dict({**d, field: bad})
    with pytest.raises(ValueError, match="SIDVocab field 'base_size' must be an int, got None"):
        SIDVocab.from_dict({k: v for k, v in d.items() if k != "base_size"})
    with pytest.raises(ValueError, match="must be a mapping"):
        SIDVocab.from_dict([10, [8, 4]])
    tok = train_word_tokenizer(["red shoes", "blue shoes"])
    tok.save(str(tmp_path / "tokenizer.json"))  # atomically: nothing but the file is left
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
    assert TextTokenizer.load(str(tmp_path / "tokenizer.json")).encode("red shoes") == tok.encode("red shoes")
    text = (tmp_path / "tokenizer.json").read_bytes()
    (tmp_path / "tokenizer.json").write_bytes(text[: len(text) // 2])
    with pytest.raises(ValueError, match="tokenizer.json: not a readable tokenizers file"):
        TextTokenizer.load(str(tmp_path / "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="none.json not found"):
        TextTokenizer.load(str(tmp_path / "none.json"))
