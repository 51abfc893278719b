"""The PLUM LM: presets built, packed forward, KV-cache decoding, errors (the config itself: test_config.py)."""
import pytest
import torch
from model_configs import small_config as small

from plumrec.model import PlumLM, cu_seqlens_from_lengths, preset
from plumrec.model.config import PRESET_TARGETS, PRESETS


def model64(**kw):
    torch.manual_seed(0)
    return PlumLM(small(**kw)).double().eval()


@pytest.mark.parametrize("name", sorted(PRESET_TARGETS))
def test_large_presets_build_with_the_counted_parameters(name):
    with torch.device("meta"):
        m = PlumLM(PRESETS[name])
    assert sum(p.numel() for p in m.parameters()) == PRESETS[name].num_params()


@pytest.mark.parametrize("name", ["tiny", "small", "medium", "medium-deep"])
def test_cpu_presets_structure_and_param_count(name):
    cfg = preset(name, vocab_size=300)
    m = PlumLM(cfg)
    assert [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)] == [False] + [True] * (cfg.num_hidden_layers - 1)
    assert sum(p.numel() for p in m.parameters()) == cfg.num_params()
    assert cfg.kernel_head_dim_ok


def test_flops_and_mfu():
    cfg = preset("tiny", vocab_size=300)
    m = PlumLM(cfg)
    fwd = cfg.flops_per_token(100, training=False)
    assert fwd == 2 * cfg.activated_params() + 2 * 2 * 2 * 64 * 100
    assert cfg.flops_per_token(100) == 3 * fwd
    assert m.mfu(1000.0, 100, 1e12) == pytest.approx(1000 * 3 * fwd / 1e12)
    with pytest.raises(ValueError, match="peak_flops"):
        m.mfu(1.0, 1, 0.0)


def test_packed_batch_equals_sequences_run_alone():
    """No token sees another sequence: packing changes nothing."""
    m = model64()
    seqs = [torch.randint(0, 97, (n,)) for n in (5, 1, 9, 3)]
    packed = m(torch.cat(seqs), cu_seqlens_from_lengths([len(s) for s in seqs])).logits
    alone = torch.cat([m(s, cu_seqlens_from_lengths([len(s)])).logits for s in seqs])
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)


def test_causal_future_tokens_do_not_change_the_past():
    m = model64()
    ids = torch.randint(0, 97, (12,))
    a = m(ids, cu_seqlens_from_lengths([12])).logits
    ids2 = ids.clone()
    ids2[8:] = (ids2[8:] + 1) % 97
    b = m(ids2, cu_seqlens_from_lengths([12])).logits
    torch.testing.assert_close(a[:8], b[:8], rtol=1e-10, atol=1e-10)
    assert (a[8:] - b[8:]).abs().max() > 1e-3


def test_logits_index_and_aux_loss():
    m = model64()
    ids = torch.randint(0, 97, (10,))
    cu = cu_seqlens_from_lengths([4, 6])
    full = m(ids, cu)
    idx = torch.tensor([1, 7, 9])
    part = m(ids, cu, logits_index=idx)
    torch.testing.assert_close(part.logits, full.logits[idx], rtol=1e-12, atol=1e-12)
    assert full.aux_loss > 0  # two MoE layers contribute load-balance + z losses
    dense = PlumLM(small(num_experts=0)).double()
    assert dense(ids, cu).aux_loss == 0


def test_hidden_dropout_acts_in_training_only():
    """Eval mode is the dropout-free model exactly; training mode drops, reproducibly for a seed."""
    ids, cu = torch.randint(0, 97, (11,)), cu_seqlens_from_lengths([6, 5])
    plain, dropped = model64(), model64(hidden_dropout=0.3)
    dropped.load_state_dict(plain.state_dict())
    torch.testing.assert_close(dropped(ids, cu).logits, plain(ids, cu).logits, rtol=0, atol=0)
    dropped.train()
    torch.manual_seed(1)
    a = dropped(ids, cu).logits
    torch.manual_seed(1)
    b = dropped(ids, cu).logits
    torch.manual_seed(2)
    c = dropped(ids, cu).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3 and (a - plain(ids, cu).logits).abs().max() > 1e-3
    plain.train()
    torch.testing.assert_close(plain(ids, cu).logits, plain.eval()(ids, cu).logits, rtol=0, atol=0)


def test_router_logits_stay_float32_under_autocast(monkeypatch):
    """Under bf16 autocast (the CUDA training default) the experts run in bf16 but the router's
    logits are computed in float32, as in eval: a bf16 router would route differently."""
    import plumrec.model.model as M

    seen, moe = [], M.K.moe_mlp
    monkeypatch.setattr(M.K, "moe_mlp", lambda x, logits, *a, **kw: seen.append((x.dtype, logits.dtype))
                        or moe(x, logits, *a, **kw))
    m = PlumLM(small())
    ids, cu = torch.randint(0, 97, (11,)), cu_seqlens_from_lengths([6, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(ids, cu)
    assert seen == [(torch.bfloat16, torch.float32)] * 2  # two MoE layers


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rms_norm_computes_in_float32_or_float64(dtype):
    """RMSNorm normalises in float32 (Hugging Face semantics) but in float64 for float64 inputs,
    so that a float64 model is float64 ground truth (a float32 norm put ~1e-8 errors into its
    gradients)."""
    from plumrec.model.model import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(37, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(37, dtype=torch.float64))
    x = (torch.randn(5, 37, dtype=torch.float64) * 3).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xa = x.to(acc)
    want = norm.weight * (xa * torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert norm(x).dtype == dtype and torch.equal(norm(x), want)
    if dtype == torch.float64:  # against the formula in float64, and gradients by finite differences
        exact = norm.weight.detach() * x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        torch.testing.assert_close(norm(x), exact, rtol=1e-14, atol=0)
        assert torch.autograd.gradcheck(norm, (x.clone().requires_grad_(),))


def test_backward_reaches_every_parameter():
    m = PlumLM(small())
    out = m(torch.randint(0, 97, (11,)), cu_seqlens_from_lengths([6, 5]))
    (out.logits.logsumexp(-1).mean() + out.aux_loss).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "experts" not in n)


def test_decode_step_matches_full_forward():
    """Prefill + per-beam KV-cache decoding == running the whole sequence."""
    m = model64()
    prompts = [torch.randint(0, 97, (n,)) for n in (6, 3)]
    cu = cu_seqlens_from_lengths([6, 3])
    out = m(torch.cat(prompts), cu, return_kv=True, logits=False)
    W, steps = 3, 3
    cache = m.prefix_cache(out.kv, cu, W, steps)
    new = torch.randint(0, 97, (2, W, steps))
    for s in range(steps):
        if s == 1:  # beams swap parents: the suffix cache must follow
            parent = torch.tensor([[2, 0, 0], [1, 1, 2]])
            cache.reorder(parent)
            new[:, :, :1] = torch.gather(new[:, :, :1], 1, parent[..., None])
        h = m.decode_step(new[:, :, s], cache)
        for b in range(2):
            for w in range(W):
                seq = torch.cat([prompts[b], new[b, w, :s + 1]])
                ref = m(seq, cu_seqlens_from_lengths([len(seq)])).hidden[-1]
                torch.testing.assert_close(h[b, w], ref, rtol=1e-9, atol=1e-9)
    assert cache.suffix_len == steps


def test_bad_inputs_raise():
    m = PlumLM(small())
    cu = cu_seqlens_from_lengths([3])
    with pytest.raises(ValueError, match="vocab_size"):
        m(torch.tensor([1, 2, 97]), cu)
    with pytest.raises(TypeError, match="input_ids"):
        m(torch.tensor([1.0, 2.0, 3.0]), cu)
    with pytest.raises(ValueError, match="packed to 1-D"):
        m(torch.tensor([[1, 2, 3]]), cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.tensor([1, 2, 3]), cu_seqlens_from_lengths([2]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        PlumLM(small(max_position_embeddings=4))(torch.tensor([1, 2, 3, 4, 5]), cu_seqlens_from_lengths([5]))
    with pytest.raises(TypeError, match="ModelConfig"):
        PlumLM({"vocab_size": 3})
