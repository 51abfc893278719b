"""plum_kernels.hf.apply_plum_kernels on tiny random transformers Qwen3 / Qwen3-MoE models (fp32, CPU):
logits and one training step's gradients match the unpatched model; packed batches match each sequence
run alone; what the patch does not support is refused."""
import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")  # test-only dependency

from plum_kernels.hf import ATTN_IMPLEMENTATION, PlumQwen3MoeBlock, apply_plum_kernels  # noqa: E402

VOCAB = 101
RTOL, ATOL = 1e-4, 1e-5  # fp32 patched vs fp32 unpatched (both float32 accumulation)


def _randomise(model, std=0.2):
    """transformers initialises norms to 1 and the router to 0: draw everything so that routing and attention
    patterns are far from uniform and a wrong swap shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, std)
    return model


def _tiny(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, tie_word_embeddings=False, attn_implementation="sdpa")
    if kind == "moe":
        cfg = transformers.Qwen3MoeConfig(num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                          moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                          norm_topk_prob=True, **common)
        return _randomise(transformers.Qwen3MoeForCausalLM(cfg)).float()
    cfg = transformers.Qwen3Config(num_key_value_heads=1, head_dim=32, intermediate_size=96, **common)
    return _randomise(transformers.Qwen3ForCausalLM(cfg)).float()


@pytest.fixture(scope="module", params=["moe", "dense"])
def pair(request):
    """(unpatched, patched deep copy) of one tiny model."""
    ref = _tiny(request.param)
    return ref, apply_plum_kernels(copy.deepcopy(ref))


def _step(model, ids, labels, **kw):
    """Logits and the gradients of a summed cross-entropy on ``labels``, fresh each call."""
    model.zero_grad(set_to_none=True)
    logits = model(ids, **kw).logits
    F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum").backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=RTOL, atol=ATOL)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=RTOL, atol=ATOL * max(1.0, gb[n].abs().max().item()), msg=n)


def test_patch_swaps_modules_and_keeps_parameters(pair):
    ref, ours = pair
    assert ours.config._attn_implementation == ATTN_IMPLEMENTATION and ref.config._attn_implementation == "sdpa"
    assert list(ours.state_dict()) == list(ref.state_dict())
    blocks = [m for m in ours.modules() if isinstance(m, PlumQwen3MoeBlock)]
    assert len(blocks) == (2 if ours.config.model_type == "qwen3_moe" else 0)
    params = {n: p.data_ptr() for n, p in ours.named_parameters()}
    assert apply_plum_kernels(ours) is ours  # idempotent: nothing swapped twice, no parameter copied
    assert {n: p.data_ptr() for n, p in ours.named_parameters()} == params
    assert [m for m in ours.modules() if isinstance(m, PlumQwen3MoeBlock)] == blocks


def test_logits_and_gradients_match_unpatched(pair):
    ref, ours = pair
    torch.manual_seed(3)
    ids, labels = torch.randint(0, VOCAB, (2, 13)), torch.randint(0, VOCAB, (2, 13))
    expected = _step(ref, ids, labels)
    assert expected[0].abs().max() > 1.0  # a meaningful comparison, not near-zero logits
    _assert_same(_step(ours, ids, labels), expected)
    ones = torch.ones_like(ids)  # an all-ones mask is no padding: accepted
    _assert_same(_step(ours, ids, labels, attention_mask=ones), expected)


def _packed(lengths):
    torch.manual_seed(4)
    seqs = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    labels = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return seqs, labels, pos


def _alone(ref, seqs, labels):
    """Each sequence alone through the unpatched model; gradients of the summed losses."""
    ref.zero_grad(set_to_none=True)
    logits = []
    for s, y in zip(seqs, labels):
        lg = ref(s[None]).logits[0]
        F.cross_entropy(lg, y, reduction="sum").backward()
        logits.append(lg.detach())
    return torch.cat(logits)[None], {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}


def test_packed_batch_matches_each_sequence_alone(pair):
    ref, ours = pair
    lengths = (7, 5, 9)
    seqs, labels, pos = _packed(lengths)
    ids, y = torch.cat(seqs)[None], torch.cat(labels)[None]
    expected = _alone(ref, seqs, labels)
    _assert_same(_step(ours, ids, y, position_ids=pos), expected)
    cu = torch.tensor([0, 7, 12, 21], dtype=torch.int32)  # DataCollatorWithFlattening's flash-attn kwargs
    _assert_same(_step(ours, ids, y, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9,
                       max_length_k=9), expected)
    with torch.no_grad():  # the comparison can fail: one unsegmented sequence gives other logits
        whole = ours(ids).logits
    assert (whole - expected[0]).abs().max() > 100 * ATOL


def test_router_logits_and_aux_loss_unchanged():
    ref = _tiny("moe")
    ours = apply_plum_kernels(copy.deepcopy(ref))
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        a = ref(ids, labels=ids, output_router_logits=True)
        b = ours(ids, labels=ids, output_router_logits=True)
    assert len(b.router_logits) == 2
    torch.testing.assert_close(b.aux_loss, a.aux_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(b.loss, a.loss, rtol=RTOL, atol=ATOL)


def test_moe_only_and_attention_only():
    ref = _tiny("moe")
    moe_only = apply_plum_kernels(copy.deepcopy(ref), attention=False)
    attn_only = apply_plum_kernels(copy.deepcopy(ref), moe=False)
    assert moe_only.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, PlumQwen3MoeBlock) for m in attn_only.modules())
    ids = torch.randint(0, VOCAB, (1, 11))
    with torch.no_grad():
        expected = ref(ids).logits
        for m in (moe_only, attn_only):
            torch.testing.assert_close(m(ids).logits, expected, rtol=RTOL, atol=ATOL)


def test_refuses_what_it_does_not_support(pair):
    _, ours = pair
    ids = torch.randint(0, VOCAB, (2, 6))
    padded = torch.ones_like(ids)
    padded[1, :2] = 0
    with torch.no_grad():
        with pytest.raises(ValueError, match="attention_mask"):
            ours(ids, attention_mask=padded)
        with pytest.raises(ValueError, match="attention_mask"):
            ours(ids, attention_mask=torch.zeros(2, 1, 6, 6))  # a prepared 4-D mask
        with pytest.raises(ValueError, match="cu_seq_lens_q"):
            cu = torch.tensor([0, 6, 12], dtype=torch.int32)
            ours(ids, cu_seq_lens_q=cu, max_length_q=6)
        past = ours(ids[:, :4], use_cache=True).past_key_values
        with pytest.raises(ValueError, match="past_key_values"):
            ours(ids[:, 4:], past_key_values=past, use_cache=True)


def test_refuses_other_models():
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32)
    with pytest.raises(ValueError, match="model_type"):
        apply_plum_kernels(transformers.LlamaForCausalLM(cfg))
    with pytest.raises(ValueError, match="model"):
        apply_plum_kernels(torch.nn.Linear(2, 2))
