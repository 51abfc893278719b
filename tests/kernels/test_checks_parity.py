"""One set of argument checks per op: the same bad input fed to every implementation (torch reference,
Triton, jnp reference, Pallas) raises the same exception type with the same message, which names the
argument at fault (the checks live in ``kernels/<family>/checks.py``, shared by both front ends)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import plum_kernels.torch as K
from plumrec.sid import build_trie

IMPLS = ("torch-reference", "torch-triton", "jax-reference", "jax-pallas")
INTERPRET_OPS = {"history_attention", "beam_decode_attention", "grouped_matmul", "moe_mlp", "constrained_beam_step"}
TRIE = build_trie(np.array([[0, 1, 2], [0, 2, 1], [1, 0, 0], [3, 2, 4], [3, 2, 3]]), (4, 3, 5))
RNG = np.random.default_rng(0)


def _f(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def _i(values, dtype=np.int32):
    return np.asarray(values, dtype)


PERM = _i([1, 3, 5, 7, 9, 11, 0, 2, 4, 6, 8, 10])   # sorted row p <- copy PERM[p]
INV = np.argsort(PERM).astype(np.int32)
BASE = {
    "history_attention": dict(q=_f(8, 4, 64), k=_f(8, 2, 64), v=_f(8, 2, 64), cu_seqlens=_i([0, 3, 8]),
                              max_seqlen=5),
    "beam_decode_attention": dict(q=_f(2, 2, 4, 64), k_prefix=_f(2, 10, 2, 64), v_prefix=_f(2, 10, 2, 64),
                                  prefix_lens=_i([10, 4]), k_suffix=_f(2, 2, 3, 2, 64), v_suffix=_f(2, 2, 3, 2, 64),
                                  suffix_len=2),
    "moe_route": dict(router_logits=_f(6, 4), top_k=2),
    "moe_permute": dict(x=_f(6, 8), expert_ids=_i([[0, 1], [2, 3], [1, 1], [0, 3], [2, 2], [3, 0]]), num_experts=4),
    "moe_unpermute": dict(y=_f(12, 8), weights=_f(6, 2), permutation=PERM, inverse=INV),
    "grouped_matmul": dict(x=_f(6, 8), w=_f(4, 8, 5), group_sizes=_i([2, 2, 1, 1])),
    "moe_mlp": dict(x=_f(6, 8), router_logits=_f(6, 4), w_gate_up=_f(4, 8, 6), w_down=_f(4, 3, 8), top_k=2),
    "constrained_beam_step": dict(logits=_f(2, 2, 3), beam_scores=np.zeros((2, 2), np.float32),
                                  nodes=np.array([[1, 2], [4, -1]], np.int64), trie=None, level=1, W=3),
}


def _set(a, idx, value):
    a = a.copy()
    a[idx] = value
    return a


CASES = [  # (op, overrides, exception, argument named in the message)
    ("history_attention", dict(cu_seqlens=_i([1, 3, 8])), ValueError, "cu_seqlens"),
    ("history_attention", dict(cu_seqlens=_i([0, 6, 5, 8])), ValueError, "cu_seqlens"),
    ("history_attention", dict(cu_seqlens=_i([0, 3, 7])), ValueError, "cu_seqlens"),
    ("history_attention", dict(cu_seqlens=_i([0, 3, 8], np.int64)), TypeError, "cu_seqlens"),
    ("history_attention", dict(cu_seqlens=_i([0])), ValueError, "cu_seqlens"),
    ("history_attention", dict(max_seqlen=4), ValueError, "max_seqlen"),
    ("history_attention", dict(max_seqlen=-1), ValueError, "max_seqlen"),
    ("history_attention", dict(max_seqlen="8"), ValueError, "max_seqlen"),
    ("history_attention", dict(k=_f(8, 3, 64), v=_f(8, 3, 64)), ValueError, "Hkv"),
    ("history_attention", dict(k=_f(8, 2, 64, dtype=np.float16)), TypeError, "k must have the dtype of q"),
    ("history_attention", dict(v=_f(8, 2, 32)), ValueError, "k and v"),
    ("history_attention", dict(q=_f(8, 64)), ValueError, "q must have shape"),
    ("history_attention", dict(q=[[1.0]]), TypeError, "q must be an array"),
    ("history_attention", dict(scale=-1.0), ValueError, "scale"),
    ("beam_decode_attention", dict(prefix_lens=_i([11, 4])), ValueError, "prefix_lens"),
    ("beam_decode_attention", dict(prefix_lens=_i([-1, 4])), ValueError, "prefix_lens"),
    ("beam_decode_attention", dict(prefix_lens=_i([0, 4]), suffix_len=0), ValueError, "prefix_lens"),
    ("beam_decode_attention", dict(prefix_lens=_i([10, 4], np.int64)), TypeError, "prefix_lens"),
    ("beam_decode_attention", dict(prefix_lens=_i([10])), ValueError, "prefix_lens"),
    ("beam_decode_attention", dict(suffix_len=4), ValueError, "suffix_len"),
    ("beam_decode_attention", dict(k_suffix=_f(2, 1, 3, 2, 64)), ValueError, "k_suffix"),
    ("beam_decode_attention", dict(q=_f(2, 2, 64)), ValueError, "q must have shape"),
    ("moe_route", dict(top_k=5), ValueError, "top_k"),
    ("moe_route", dict(top_k=0), ValueError, "top_k"),
    ("moe_route", dict(score="relu"), ValueError, "score"),
    ("moe_route", dict(bias=_f(3)), ValueError, "bias"),
    ("moe_route", dict(bias=_i([0, 0, 0, 0])), TypeError, "bias"),
    ("moe_route", dict(router_logits=_f(6)), ValueError, "router_logits"),
    ("moe_route", dict(router_logits=_f(0, 4)), ValueError, "router_logits"),
    ("moe_route", dict(router_logits=_i([[1, 2]])), TypeError, "router_logits"),
    ("moe_permute", dict(expert_ids=_i([[0, 7]] * 6)), ValueError, "expert_ids"),
    ("moe_permute", dict(expert_ids=_i([[0, -1]] * 6)), ValueError, "expert_ids"),
    ("moe_permute", dict(expert_ids=_f(6, 2)), TypeError, "expert_ids"),
    ("moe_permute", dict(expert_ids=_i([[0, 1]] * 5)), ValueError, "expert_ids"),
    ("moe_permute", dict(num_experts=0), ValueError, "num_experts"),
    ("moe_unpermute", dict(inverse=_set(INV, 3, 12)), ValueError, "inverse"),
    ("moe_unpermute", dict(inverse=_set(INV, 0, -1)), ValueError, "inverse"),
    ("moe_unpermute", dict(permutation=_set(PERM, 5, 40)), ValueError, "permutation"),
    ("moe_unpermute", dict(inverse=INV[[1, 0, *range(2, 12)]]), ValueError, "inverse"),
    ("moe_unpermute", dict(inverse=INV[:11]), ValueError, "inverse"),
    ("moe_unpermute", dict(permutation=PERM.astype(np.float32)), TypeError, "permutation"),
    ("moe_unpermute", dict(weights=_f(5, 2)), ValueError, "weights"),
    ("moe_unpermute", dict(y=_i([[1, 2]] * 12)), TypeError, "y"),
    ("grouped_matmul", dict(group_sizes=_i([2, 2, 1, 0])), ValueError, "group_sizes"),
    ("grouped_matmul", dict(group_sizes=_i([4, 3, -1, 0])), ValueError, "group_sizes"),
    ("grouped_matmul", dict(group_sizes=_f(4)), TypeError, "group_sizes"),
    ("grouped_matmul", dict(group_sizes=_i([6, 0, 0])), ValueError, "group_sizes"),
    ("grouped_matmul", dict(w=_f(4, 7, 5)), ValueError, "w must be"),
    ("grouped_matmul", dict(w=_f(4, 8, 5, dtype=np.float16)), TypeError, "w has dtype"),
    ("grouped_matmul", dict(x=_f(6)), ValueError, "x must be"),
    ("moe_mlp", dict(w_gate_up=_f(4, 8, 5)), ValueError, "w_gate_up"),
    ("moe_mlp", dict(w_down=_f(4, 3, 8, dtype=np.float16)), TypeError, "w_down"),
    ("moe_mlp", dict(router_logits=_f(6, 3)), ValueError, "router_logits"),
    ("moe_mlp", dict(top_k=5), ValueError, "top_k"),
    ("constrained_beam_step", dict(level=3), ValueError, "level"),
    ("constrained_beam_step", dict(W=0), ValueError, "W (beam width)"),
    ("constrained_beam_step", dict(normalize="softmax"), ValueError, "normalize"),
    ("constrained_beam_step", dict(logits=_f(2, 2, 4)), ValueError, "logits"),
    ("constrained_beam_step", dict(logits=_f(2, 2, 3).astype(np.int32)), TypeError, "logits"),
    ("constrained_beam_step", dict(beam_scores=np.zeros((2, 2), np.float16)), TypeError, "beam_scores"),
    ("constrained_beam_step", dict(beam_scores=np.zeros((2, 3), np.float32)), ValueError, "beam_scores"),
    ("constrained_beam_step", dict(nodes=np.array([[1, 99], [4, -1]], np.int64)), ValueError, "nodes"),
    ("constrained_beam_step", dict(vocab_offset=-1), ValueError, "vocab_offset"),
]


def _convert(impl: str, op: str, args: dict) -> dict:
    if impl.startswith("torch"):
        out = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}
        if op == "constrained_beam_step":
            out["trie"] = TRIE.to_torch()
        return out
    import jax.numpy as jnp

    # int64 arrays stay numpy (JAX without x64 would make them int32), beam states are int32 in JAX
    out = {k: v if not isinstance(v, np.ndarray) or v.dtype == np.int64 else jnp.asarray(v) for k, v in args.items()}
    if op == "constrained_beam_step":
        out["trie"], out["nodes"] = TRIE.to_jax(), jnp.asarray(args["nodes"].astype(np.int32))
    return out


def _call(impl: str, op: str, args: dict):
    framework, name = impl.split("-")
    args = _convert(impl, op, args)
    if framework == "torch":
        return getattr(K, op)(**args, impl=name)
    import plum_kernels.jax as KJ

    extra = {"interpret": True} if op in INTERPRET_OPS else {}
    return getattr(KJ, op)(**args, impl=name, **extra)


@pytest.mark.parametrize("op, over, exc, arg", CASES, ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_every_implementation_raises_the_same_error(op, over, exc, arg):
    args = {**BASE[op], **over}
    messages = {}
    for impl in IMPLS:
        with pytest.raises(exc) as info:
            _call(impl, op, args)
        assert type(info.value) is exc, (impl, info.value)
        messages[impl] = str(info.value)
        assert arg in messages[impl], (impl, messages[impl])
    assert len(set(messages.values())) == 1, messages


@pytest.mark.parametrize("impl", ["torch-reference", "jax-reference"])
def test_the_base_inputs_are_accepted(impl):
    """The cases above differ from a valid call only by their override (the kernels run these shapes in
    their own tests)."""
    for op, args in BASE.items():
        _call(impl, op, args)
