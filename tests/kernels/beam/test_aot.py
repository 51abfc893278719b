"""Proof that the beam kernels are real GPU/TPU kernels: every Triton kernel
compiled ahead of time for Hopper (sm_90) at each shipped configuration, from a
launch of the real launcher specialised as Triton specialises it at run time
(no register spills, shared memory within the limit; no matrix products, so
no wgmma requirement); every Pallas kernel lowered for TPU with
interpret=False; and the benchmark's --smoke path."""
from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
from compile_checks import (
    build_all,
    captured_launches,
    check_facts,
    compile_in_clean_process,
    compile_launch,
    lower_for_tpu,
)

# PLUM's codebooks; the launches choose level 1 (V = 1024) of a trie with this many nodes / edges.
CODEBOOKS = (2048, 1024, 512, 256)
NUM_INTERNAL, NUM_EDGES, USERS = 5000, 20000, 4
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def _trie(token: str):
    import torch

    from plum_kernels.beam.ops_torch import _TrieView, chain_layout

    shift, mask = chain_layout(CODEBOOKS)
    return _TrieView(torch.zeros(NUM_INTERNAL + 1, dtype=torch.int64),
                     torch.zeros(NUM_EDGES, dtype=getattr(torch, token)), torch.zeros(NUM_EDGES, dtype=torch.int32),
                     shift, mask, CODEBOOKS, NUM_INTERNAL, NUM_EDGES)


@functools.lru_cache(maxsize=None)
def _launches(kp: int, dtype: str, normalize: str, token: str, bias: str = "") -> dict:
    """Recorded launches of ``beam_step`` with ``W = KP`` beams (logits of
    ``dtype``; ``token``: the trie's edge-token dtype, int16, or int32 for
    codebooks above 32768; ``bias``: ``"shared"`` with one per-edge bias
    ``[E]``, ``"rows"`` with a ``[T, E]`` table and int32 per-user rows)."""
    import torch

    from plum_kernels.beam import triton as tk

    logits = torch.randn(USERS, kp, CODEBOOKS[1]).to(getattr(torch, DTYPES[dtype]))
    scores, nodes = torch.zeros(USERS, kp), torch.zeros(USERS, kp, dtype=torch.int64)
    edge_bias = {"": None, "shared": torch.zeros(NUM_EDGES), "rows": torch.zeros(3, NUM_EDGES)}[bias]
    bias_row = torch.zeros(USERS, dtype=torch.int32) if bias == "rows" else None
    with captured_launches() as launches:
        tk.beam_step(logits, scores, nodes, _trie(token), 1, kp, normalize, 0, edge_bias=edge_bias, bias_row=bias_row)
    return {launch.name: launch for launch in launches}


@functools.lru_cache(maxsize=None)
def _aggregate_launches() -> dict:
    """Recorded launches of ``trie_aggregate`` (item masses of a catalogue of
    ``NUM_EDGES`` items with some collision groups); the level kernel's launch
    is one per depth with the same specialisation, the first is kept."""
    import torch

    from plum_kernels.beam import triton as tk

    trie = _trie("int16")._asdict()
    trie["level_ptr"] = torch.tensor([0, 1, 100, NUM_INTERNAL])
    view = type("AggregateTrie", (), trie)
    with captured_launches() as launches:
        tk.trie_aggregate(torch.rand(NUM_EDGES), view, torch.zeros(NUM_EDGES, dtype=torch.int64),
                          torch.tensor([0, 2, 4]), torch.arange(4), 1e-3)
    out = {}
    for launch in launches:
        out.setdefault(launch.name, launch)
    return out


def jobs() -> dict:
    """name -> (kernel, launch spec) for every shipped configuration: both
    kernels at every per-beam list length KP with bf16 logits (fp16 takes the
    same code path); at the largest KP also the expand kernel with fp32
    logits and with ``normalize="children"``, and with an edge bias shared by
    every user or read from each user's row of a table; one KP with int32
    edge tokens."""
    from plum_kernels.beam import triton as tk

    out = {}
    for kp in tk.SHIPPED_KP:
        token = "int32" if kp == 64 else "int16"
        out[f"expand-kp{kp}-bf16-codebook"] = ("_expand_kernel", (kp, "bf16", "codebook", token))
        out[f"select-kp{kp}"] = ("_select_kernel", (kp, "bf16", "codebook", token))
    kp = max(tk.SHIPPED_KP)
    out[f"expand-kp{kp}-bf16-children"] = ("_expand_kernel", (kp, "bf16", "children", "int16"))
    out[f"expand-kp{kp}-fp32-codebook"] = ("_expand_kernel", (kp, "fp32", "codebook", "int16"))
    out[f"expand-kp{kp}-bf16-codebook-bias"] = ("_expand_kernel", (kp, "bf16", "codebook", "int16", "shared"))
    out[f"expand-kp{kp}-bf16-codebook-bias-rows"] = ("_expand_kernel", (kp, "bf16", "codebook", "int16", "rows"))
    out["aggregate-sid-mass"] = ("_sid_mass_kernel", None)
    out["aggregate-level"] = ("_level_kernel", None)
    return out


def build(name: str):
    """Compile one job (runs in a worker of ``build_all``)."""
    kernel, spec = jobs()[name]
    return compile_launch((_aggregate_launches() if spec is None else _launches(*spec))[kernel])


def build_everything() -> dict:
    """Run in the clean subprocess (a process that ran interpreted kernels
    cannot compile for real): every job's facts."""
    return build_all(__file__, list(jobs()))


@pytest.fixture(scope="module")
def hopper_builds():
    return compile_in_clean_process(__file__, "build_everything")


def test_every_shipped_kp_is_compiled():
    from plum_kernels.beam import triton as tk
    names = jobs()
    for kernel in ("expand", "select"):
        assert {int(n.split("-")[1][2:]) for n in names if n.startswith(kernel)} == set(tk.SHIPPED_KP)
    assert tk.DEFAULT_BLOCKS.kp(tk.MAX_BEAM) == max(tk.SHIPPED_KP) and tk.DEFAULT_BLOCKS.kp(1) == min(tk.SHIPPED_KP)


@pytest.mark.parametrize("name", sorted(jobs()))
def test_triton_kernel_compiles_for_hopper(hopper_builds, name):
    check_facts(name, hopper_builds[name], tensor_cores=False)


@pytest.mark.parametrize("W_in,V,C,W,normalize", [(16, 256, 16, 16, "codebook"), (70, 2048, 7, 70, "children"),
                                                  (256, 2048, 64, 256, "codebook")])
def test_pallas_kernel_lowers_for_tpu(W_in, V, C, W, normalize):
    import jax
    import jax.numpy as jnp

    from plum_kernels.beam import pallas as kp
    f = functools.partial(kp.beam_select, W=W, normalize=normalize, interpret=False)
    lower_for_tpu(f, jax.ShapeDtypeStruct((4, W_in, V), jnp.bfloat16),
                  jax.ShapeDtypeStruct((4, W_in, C), jnp.float32), jax.ShapeDtypeStruct((4, W_in), jnp.float32))


def test_pallas_kernels_with_an_edge_bias_lower_for_tpu():
    """The biased select kernel and ``trie_aggregate``'s log-ratio kernel."""
    import jax
    import jax.numpy as jnp

    from plum_kernels.beam import pallas as kp
    f = functools.partial(kp.beam_select, W=64, normalize="codebook", interpret=False)
    lower_for_tpu(f, jax.ShapeDtypeStruct((4, 64, 1024), jnp.bfloat16), jax.ShapeDtypeStruct((4, 64, 16), jnp.float32),
                  jax.ShapeDtypeStruct((4, 64), jnp.float32), jax.ShapeDtypeStruct((4, 64, 16), jnp.float32))
    g = functools.partial(kp.log_ratio, eps=1e-3, interpret=False)
    lower_for_tpu(g, *[jax.ShapeDtypeStruct((NUM_EDGES,), jnp.float32)] * 4)


def test_benchmark_smoke(tmp_path):
    root = Path(__file__).resolve().parents[3]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_beam.py"), "--smoke", "--out",
                        str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "bench_beam.json").exists() and (tmp_path / "bench_beam.md").exists()
