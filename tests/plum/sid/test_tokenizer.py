"""SemanticIdTokenizer (SIDv2 RQ-VAE): fit/encode/save/load, determinism,
multi-embedding input, every loss path, dead-code restarts, bad input.

Everything runs on the synthetic catalogue with tiny models (a few seconds
per fit on two CPU cores)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from damage import OPS, damage_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from plumrec.data import cooccurrence_pairs, leave_one_out, make_synthetic_catalogue
from plumrec.sid import TIGER_CODEBOOKS, SemanticIdTokenizer, SIDConfig, multi_resolution_codebooks, sid_quality

TINY = dict(latent_dim=16, hidden_dims=(64,), epochs=12, warmup_epochs=3, batch_size=128,
            learning_rate=3e-3, kmeans_iters=10, restart_every=3)
SIZES = (16, 8, 8)


@pytest.fixture(scope="module")
def cat():
    return make_synthetic_catalogue(num_items=480, num_users=400, num_topics=8, subtopics_per_topic=2, seed=11)


@pytest.fixture(scope="module")
def fitted(cat):
    tok = SemanticIdTokenizer(SIZES, seed=0, **TINY)
    codes = tok.fit(cat.embeddings["text"], progress=False)
    return tok, codes


def test_fit_returns_valid_codes(fitted, cat):
    tok, codes = fitted
    assert codes.shape == (480, 3) and codes.dtype == np.int64
    for l, v in enumerate(SIZES):
        assert 0 <= codes[:, l].min() and codes[:, l].max() < v
    np.testing.assert_array_equal(tok.codes, codes)
    np.testing.assert_array_equal(tok.encode(cat.embeddings["text"]), codes)
    # every loss was computed, the codebook losses only after the warm-up
    hist = tok.history
    assert len(hist) == TINY["epochs"]
    assert all(h["vq"] == 0 for h in hist[:3]) and all(h["vq"] > 0 for h in hist[3:])
    assert all(h["recon"] > 0 for h in hist) and all(h["cooc"] == 0 for h in hist)
    assert hist[-1]["recon"] < hist[0]["recon"]


def test_encode_matches_float64_reference(fitted, cat):
    """Codes are the greedy nearest codewords of the residuals, recomputed in float64."""
    tok, codes = fitted
    m = tok.model
    x = torch.from_numpy(cat.embeddings["text"]).double()
    with torch.no_grad():
        xs = [(x - m.in_mean_0.double()) / m.in_scale_0.double()]
        z = m.double().encode_latent(xs)
        r, ref = z, []
        for cb in m.codebooks:
            d = ((r[:, None, :] - cb[None].double()) ** 2).sum(-1)
            c = d.argmin(1)
            # ties/near-ties between float32 and float64 distances are the only allowed difference
            ref.append(c)
            r = r - cb.double()[c]
        m.float()
    ref = torch.stack(ref, 1).numpy()
    assert (ref == codes).all(1).mean() > 0.99


def test_save_load_round_trip(fitted, cat, tmp_path):
    tok, codes = fitted
    tok.save(tmp_path / "sid")
    meta = json.loads((tmp_path / "sid" / "config.json").read_text())
    assert meta["config"]["codebook_sizes"] == list(SIZES) and meta["input_dims"] == [64]
    loaded = SemanticIdTokenizer.load(tmp_path / "sid")
    assert loaded.config == tok.config
    np.testing.assert_array_equal(loaded.codes, codes)
    np.testing.assert_array_equal(loaded.encode(cat.embeddings["text"]), codes)
    for a, b in zip(loaded.reconstruct(cat.embeddings["text"][:50]), tok.reconstruct(cat.embeddings["text"][:50])):
        np.testing.assert_array_equal(a, b)
    # the codewords (init_sid_embeddings' input): one [V_l, latent_dim] float32 array per level, kept by
    # save/load, and copies (writing into them leaves the tokenizer's codes alone)
    words = tok.codewords
    assert [w.shape for w in words] == [(v, tok.config.latent_dim) for v in SIZES]
    assert all(w.dtype == np.float32 for w in words)
    for a, b in zip(loaded.codewords, words):
        np.testing.assert_array_equal(a, b)
    words[0][:] = 0
    np.testing.assert_array_equal(tok.encode(cat.embeddings["text"]), codes)
    with pytest.raises(RuntimeError, match="not fitted"):
        SemanticIdTokenizer(SIZES).codewords
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a saved SemanticIdTokenizer"):
        SemanticIdTokenizer.load(tmp_path / "bad")


def test_encode_new_items_without_retraining(cat):
    emb = cat.embeddings["text"]
    tok = SemanticIdTokenizer(SIZES, seed=0, **TINY)
    tok.fit(emb[:400], progress=False)
    before = {k: v.clone() for k, v in tok.model.state_dict().items()}
    new = tok.encode(emb[400:])
    assert new.shape == (80, 3)
    np.testing.assert_array_equal(tok.encode(torch.from_numpy(emb[400:])), new)  # tensors too
    np.testing.assert_array_equal(tok.encode(emb[390:410])[10:], new[:10])  # batch-independent
    assert all(torch.equal(before[k], v) for k, v in tok.model.state_dict().items())
    # new items land in the level-1 cell of their nearest fitted item far more often than chance
    sim = emb[400:] @ emb[:400].T
    nearest = sim.argmax(1)
    agree = (new[:, 0] == tok.codes[nearest, 0]).mean()
    assert agree > 0.5


def test_deterministic_for_a_seed(cat, fitted):
    tok, codes = fitted
    again = SemanticIdTokenizer(SIZES, seed=0, **TINY)
    np.testing.assert_array_equal(again.fit(cat.embeddings["text"], progress=False), codes)
    for k, v in tok.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[k], v, rtol=0, atol=0)
    other = SemanticIdTokenizer(SIZES, seed=1, **TINY).fit(cat.embeddings["text"], progress=False)
    assert not np.array_equal(other, codes)
    # fit draws from its own generator and leaves the global RNG alone
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    SemanticIdTokenizer(SIZES, seed=0, **{**TINY, "epochs": 4}).fit(cat.embeddings["text"][:100], progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_uniqueness_and_structure_on_synthetic(cat):
    """A 4-level SID over 480 items: nearly unique, every level-1 code used,
    and co-engaged items share level-1 codes far more often than random pairs."""
    split = leave_one_out(cat.data)
    held_out = np.stack([[h[-1] for h in split.test.histories], split.test.targets], 1)
    tok = SemanticIdTokenizer((16, 16, 16, 16), seed=0, **{**TINY, "epochs": 20})
    tok.fit(cat.embeddings["text"], progress=False)
    q = tok.quality_report(cat.embeddings["text"], held_out)
    assert q.uniqueness >= 0.93, q  # 96.3% when written
    assert q.utilisation[0] == 1.0, q
    assert q.prefix_share[0] > 2 * q.random_prefix_share[0], q
    assert 0 < q.reconstruction_error < 1, q


def test_multi_embedding_input(cat, fitted):
    text, meta = cat.embeddings["text"], cat.embeddings["meta"]
    tok = SemanticIdTokenizer(SIZES, seed=0, **TINY)
    codes = tok.fit([text, meta], progress=False)
    m = tok.model
    assert m.input_dims == (64, 32) and len(m.encoders) == 2 and len(m.decoders) == 2
    assert isinstance(m.fuse, torch.nn.Linear) and m.fuse.in_features == 2 * TINY["latent_dim"]
    np.testing.assert_array_equal(tok.encode([text, meta]), codes)
    # the second modality changes the codes
    assert not np.array_equal(fitted[1], codes)  # same settings, text only
    recon = tok.reconstruct([text[:20], meta[:20]])
    assert [r.shape for r in recon] == [(20, 64), (20, 32)]
    with pytest.raises(ValueError, match="do not match the fitted"):
        tok.encode(text)
    with pytest.raises(ValueError, match="do not match the fitted"):
        tok.encode([meta, text])
    with pytest.raises(ValueError, match=r"embeddings\[1\] has 10 rows"):
        tok.encode([text, meta[:10]])


def test_input_weights_steer_the_latent(cat, tmp_path):
    """``input_weights`` weigh each input's reconstruction error: equal weights
    are the default exactly, and the heavier input is reconstructed better."""
    text, meta = cat.embeddings["text"], cat.embeddings["meta"]
    kw = {**TINY, "epochs": 10}
    base = SemanticIdTokenizer(SIZES, seed=0, **kw).fit([text, meta], progress=False)
    for w in ((1, 1), (2.5, 2.5)):  # only the ratios matter
        np.testing.assert_array_equal(
            SemanticIdTokenizer(SIZES, seed=0, **kw, input_weights=w).fit([text, meta], progress=False), base)

    def rel_err(tok):
        out = []
        for x, xh in zip((text, meta), tok.reconstruct([text, meta])):
            x = x.astype(np.float64)
            out.append(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        return out

    toks = {}
    for w in ((10, 1), (1, 10)):
        toks[w] = SemanticIdTokenizer(SIZES, seed=0, **kw, input_weights=w)
        toks[w].fit([text, meta], progress=False)
    (t_text, m_text), (t_meta, m_meta) = rel_err(toks[10, 1]), rel_err(toks[1, 10])
    assert t_text < t_meta and m_meta < m_text, (t_text, m_text, t_meta, m_meta)
    toks[1, 10].save(tmp_path / "sid")
    loaded = SemanticIdTokenizer.load(tmp_path / "sid")
    assert loaded.config.input_weights == (1.0, 10.0)
    np.testing.assert_array_equal(loaded.encode([text, meta]), toks[1, 10].codes)
    with pytest.raises(ValueError, match="input_weights has 2 weights but fit\\(\\) got 1"):
        SemanticIdTokenizer(SIZES, seed=0, **kw, input_weights=(1, 2)).fit(text, progress=False)


def test_cooccurrence_loss_pulls_co_engaged_items_together(cat):
    split = leave_one_out(cat.data)
    pairs = cooccurrence_pairs(split.train, cat.data.num_items)
    held_out = np.stack([[h[-1] for h in split.test.histories], split.test.targets], 1)
    kw = {**TINY, "epochs": 10}
    off = SemanticIdTokenizer(SIZES, seed=0, **{**kw, "cooccurrence_weight": 0.0})
    off.fit(cat.embeddings["text"], cooccurrence=pairs, progress=False)
    assert all(h["cooc"] == 0 for h in off.history)  # weight 0 switches it off
    on = SemanticIdTokenizer(SIZES, seed=0, **{**kw, "cooccurrence_weight": 0.5})
    on.fit(cat.embeddings["text"], cooccurrence=pairs, progress=False)
    assert all(h["cooc"] > 0 for h in on.history)
    q0 = sid_quality(off.codes, SIZES, cooccurrence=held_out)
    q1 = sid_quality(on.codes, SIZES, cooccurrence=held_out)
    # measured on held-out transitions the loss never saw
    assert q1.prefix_share[0] > q0.prefix_share[0] + 0.05, (q0, q1)


def test_progressive_masking_makes_coarse_levels_carry_more(cat):
    """With progressive masking the decoder must work from SID prefixes, so
    the reconstruction from level 1 alone is better than without it."""
    emb = cat.embeddings["text"]
    errs = {}
    for p in (0.0, 0.9):
        tok = SemanticIdTokenizer(SIZES, seed=0, **{**TINY, "epochs": 10, "mask_prob": p})
        tok.fit(emb, progress=False)
        x = emb.astype(np.float64)
        xh = tok.reconstruct(emb, levels=1)[0]
        errs[p] = ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert errs[0.9] < errs[0.0], errs


def test_dead_code_restart_revives_codes(cat):
    tok = SemanticIdTokenizer(SIZES, seed=0, **{**TINY, "restart_every": 0})
    tok.fit(cat.embeddings["text"], progress=False)
    m = tok.model
    with torch.no_grad():
        m.codebooks[0][:5] = 1e3  # five codewords no item can reach
        m.codebooks[1][:3] = -1e3
    rows = tok._rows(m, [torch.from_numpy(cat.embeddings["text"])])
    used_before = np.unique(tok.encode(cat.embeddings["text"])[:, 0])
    assert not np.isin(np.arange(5), used_before).any()
    opt = torch.optim.AdamW(m.parameters())
    n = tok._restart_dead_codes(m, rows, None, torch.Generator().manual_seed(0), opt)
    assert n >= 8
    codes = tok.encode(cat.embeddings["text"])
    assert np.isin(np.arange(5), codes[:, 0]).all()
    assert np.isin(np.arange(3), codes[:, 1]).all()
    # and during fit: with restarts the codebooks end up fully used
    tok2 = SemanticIdTokenizer((16, 32, 32), seed=0, **{**TINY, "epochs": 8, "restart_every": 1})
    tok2.fit(cat.embeddings["text"], progress=False)
    assert sum(h.get("restarted", 0) for h in tok2.history) > 0
    q = sid_quality(tok2.codes, (16, 32, 32))
    assert min(q.utilisation) >= 0.9, q


def test_codebook_presets():
    assert multi_resolution_codebooks() == (2048, 1024, 512, 256)
    assert multi_resolution_codebooks(256, 4) == (256, 128, 64, 32)
    assert SemanticIdTokenizer().codebook_sizes == (2048, 1024, 512, 256)  # PLUM default
    assert SemanticIdTokenizer(TIGER_CODEBOOKS).codebook_sizes == (256, 256, 256)
    with pytest.raises(ValueError, match=">= 2"):
        multi_resolution_codebooks(8, 4, factor=4)


def test_a_catalogue_above_train_items_streams_from_a_memory_map(tmp_path):
    """More items than ``train_items``: fitted from a memory-mapped file (epochs of fresh draws, statistics
    in blocks), codes written to ``codes_path`` as they come and returned memory-mapped; they equal
    ``encode`` of the same rows in memory, follow the clusters (first-level purity) and are nearly unique."""
    from plumrec.data.scale import write_clustered_embeddings
    from plumrec.sid import first_level_purity

    path, labels = write_clustered_embeddings(tmp_path / "emb.npy", 3000, dim=16, num_clusters=12, noise=0.3,
                                              progress=False)
    emb = np.load(path, mmap_mode="r")
    cfg = dict(TINY, epochs=24, warmup_epochs=6, train_items=1000)
    tok = SemanticIdTokenizer((24, 64, 64), seed=0, **cfg)
    codes = tok.fit(emb, progress=False, codes_path=tmp_path / "codes.npy")
    assert isinstance(codes, np.memmap) and codes.shape == (3000, 3) and codes.dtype == np.int64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy", "emb.clusters.npy", "emb.npy"]
    np.testing.assert_array_equal(codes, tok.encode(np.array(emb)))
    assert first_level_purity(codes, np.load(labels)) >= 0.9
    again = SemanticIdTokenizer((24, 64, 64), seed=0, **cfg).fit(emb, progress=False)
    np.testing.assert_array_equal(again, codes)
    same_steps = dict(cfg, epochs=8, warmup_epochs=2, train_items=3000)  # in memory, as many training items
    whole = SemanticIdTokenizer((24, 64, 64), seed=0, **same_steps).fit(np.array(emb), progress=False)
    uniqueness = [sid_quality(c, tok.codebook_sizes).uniqueness for c in (codes, whole)]
    assert uniqueness[0] >= uniqueness[1] - 0.05, uniqueness
    stats = [tok.model.in_mean_0.numpy(), tok.model.in_scale_0.item()]
    whole = np.array(emb, np.float64)
    np.testing.assert_allclose(stats[0], whole.mean(0), atol=1e-5)
    assert stats[1] == pytest.approx(np.sqrt(((whole - whole.mean(0)) ** 2).mean()), rel=1e-5)


def test_streamed_fit_with_two_mapped_inputs_and_cooccurrence(tmp_path):
    """The streamed path with every loss on: two memory-mapped inputs (one float64), co-occurrence pairs read
    through the same row reader, input weights; ``encode`` to a file gives the fitted codes."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(1500, 12)).astype(np.float32)
    b = rng.normal(size=(1500, 6))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    xs = [np.load(tmp_path / "a.npy", mmap_mode="r"), np.load(tmp_path / "b.npy", mmap_mode="r")]
    pairs = rng.integers(0, 1500, (800, 2))
    tok = SemanticIdTokenizer((8, 8), seed=0, **dict(TINY, epochs=5, warmup_epochs=1, restart_every=2,
                                                      train_items=500, input_weights=(2.0, 1.0)))
    codes = tok.fit(xs, cooccurrence=pairs, progress=False)
    assert codes.shape == (1500, 2) and all(h["cooc"] > 0 for h in tok.history)
    assert any("restarted" in h for h in tok.history)
    again = tok.encode(xs, codes_path=tmp_path / "c.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), codes)
    np.testing.assert_array_equal(again, codes)


# -- bad input -------------------------------------------------------------------

@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda e: np.where(np.arange(len(e))[:, None] == 3, np.nan, e), ValueError, "NaN or infinite.*row 3"),
        (lambda e: np.where(np.arange(len(e))[:, None] == 7, np.inf, e), ValueError, "NaN or infinite.*row 7"),
        (lambda e: e[:0], ValueError, "catalogue is empty"),
        (lambda e: [e, e[:-1]], ValueError, r"embeddings\[1\] has 479 rows but embeddings\[0\] has 480"),
        (lambda e: [], ValueError, "empty list"),
        (lambda e: e[:, :, None], ValueError, r"shape \[N, d\]"),
        (lambda e: (e * 10).astype(np.int64), TypeError, "floating-point"),
        (lambda e: e.tolist(), TypeError, "numpy array or torch tensor"),
    ],
)
def test_bad_embeddings(cat, make, exc, match):
    with pytest.raises(exc, match=match):
        SemanticIdTokenizer(SIZES, **TINY).fit(make(cat.embeddings["text"].copy()), progress=False)


@pytest.mark.parametrize(
    "pairs, exc, match",
    [
        (np.array([[0, 1], [2, 480]]), ValueError, "names item 480.*480 items"),
        (np.array([[-1, 1]]), ValueError, "names item -1"),
        (np.array([0, 1, 2]), ValueError, r"shape \[P, 2\]"),
        (np.zeros((0, 2), np.int64), ValueError, "empty"),
        (np.array([[0.0, 1.0]]), TypeError, "integer"),
    ],
)
def test_bad_cooccurrence(cat, pairs, exc, match):
    with pytest.raises(exc, match=match):
        SemanticIdTokenizer(SIZES, **TINY).fit(cat.embeddings["text"], cooccurrence=pairs, progress=False)


def test_bad_config_and_state(fitted, cat):
    for kwargs, match in [
        (dict(codebook_sizes=()), "codebook_sizes"),
        (dict(codebook_sizes=(16, 1)), "codebook_sizes"),
        (dict(mask_prob=1.5), "mask_prob"),
        (dict(warmup_epochs=12, epochs=12), "warmup_epochs"),
        (dict(learning_rate=0), "learning_rate"),
        (dict(restart_every=-1), "restart_every"),
        (dict(latent_dim=0), "latent_dim"),
        (dict(input_weights=()), "input_weights"),
        (dict(input_weights=(1, -1)), "input_weights"),
        (dict(input_weights=(0, 0)), "input_weights"),
        (dict(input_weights=(1, float("nan"))), "input_weights"),
    ]:
        with pytest.raises(ValueError, match=match):
            SIDConfig(**kwargs)
    with pytest.raises(RuntimeError, match="not fitted"):
        SemanticIdTokenizer(SIZES).encode(cat.embeddings["text"])
    tok, _ = fitted
    with pytest.raises(ValueError, match=r"widths \(32,\)"):
        tok.encode(cat.embeddings["meta"])
    with pytest.raises(ValueError, match="levels"):
        tok.reconstruct(cat.embeddings["text"], levels=4)


def _same_tokenizer(a: SemanticIdTokenizer, b: SemanticIdTokenizer) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return (a.config == b.config and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
            and np.array_equal(a.codes, b.codes))


def test_damaged_tokenizer_files_name_the_file(fitted, tmp_path):
    tok, _ = fitted
    d = tok.save(tmp_path / "sid")
    (d / "notes.txt").write_text("kept")
    tok.save(d)  # swapped in as a whole; a file it does not write is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sid"] and (d / "notes.txt").read_text() == "kept"
    weights, config = (d / "model.safetensors").read_bytes(), (d / "config.json").read_text()
    (d / "model.safetensors").write_bytes(weights[:-9])
    with pytest.raises(ValueError, match=r"sid/model.safetensors: not a readable safetensors file"):
        SemanticIdTokenizer.load(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"sid/model.safetensors not found"):
        SemanticIdTokenizer.load(d)
    (d / "model.safetensors").write_bytes(weights)
    (d / "config.json").write_text(config.replace('"latent_dim": 16', '"latent_dim": 8'))
    with pytest.raises(ValueError, match=r"sid/config.json is not the file that .*model.safetensors was saved with"):
        SemanticIdTokenizer.load(d)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"sid/config.json not found"):
        SemanticIdTokenizer.load(d)
    # a folder written without the SHA-256 records: the config is checked against the weights' shapes
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    save_file({k: v.contiguous() for k, v in tok.model.state_dict().items()}, str(legacy / "model.safetensors"))
    (legacy / "config.json").write_text(config.replace('"latent_dim": 16', '"latent_dim": 8'))
    with pytest.raises(ValueError, match=r"legacy/model.safetensors does not match the model of .*config.json"):
        SemanticIdTokenizer.load(legacy)
    (legacy / "config.json").write_text(config.replace('"mask_prob"', '"mask_probability"'))
    with pytest.raises(ValueError, match=r"legacy/config.json: not a SemanticIdTokenizer config"):
        SemanticIdTokenizer.load(legacy)
    (legacy / "config.json").write_text(config[:-20])
    with pytest.raises(ValueError, match=r"legacy/config.json: line \d+: not valid JSON"):
        SemanticIdTokenizer.load(legacy)
    (legacy / "config.json").write_text(config)
    save_file({**{k: v.contiguous() for k, v in tok.model.state_dict().items()},
               "fitted_codes": torch.full((4, 3), 99)}, str(legacy / "model.safetensors"))
    with pytest.raises(ValueError, match=r"legacy/model.safetensors: fitted_codes hold codes outside"):
        SemanticIdTokenizer.load(legacy)


@pytest.fixture(scope="module")
def saved_tokenizer(fitted, tmp_path_factory):
    tok, _ = fitted
    return tok.save(tmp_path_factory.mktemp("saved") / "sid")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["config.json", "model.safetensors"]), op=st.sampled_from(OPS),
       where=st.floats(0, 1), bit=st.integers(0, 7), tail=st.binary(min_size=1, max_size=24))
def test_a_damaged_tokenizer_loads_identically_or_raises_a_value_error_naming_it(
        fitted, saved_tokenizer, name, op, where, bit, tail):
    """Flip one bit, truncate or extend either file: the only outcomes are the same tokenizer or a
    ValueError naming the folder's file, never another error or a different tokenizer."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(shutil.copytree(saved_tokenizer, Path(tmp) / "sid"))
        damage_file(d / name, op, where, bit, tail)
        try:
            loaded = SemanticIdTokenizer.load(d)
        except ValueError as e:
            assert str(d) in str(e), e
        else:
            assert _same_tokenizer(loaded, fitted[0])
