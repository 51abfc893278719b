"""Every MoE Triton kernel, at every configuration it ships with (each default
and each entry of the grouped GEMM's autotuning spaces; the router's tile at
every expert count up to 256), compiled ahead of time for Hopper (sm_90) from
a launch of the real launcher, specialised as Triton specialises it at run
time (``compile_checks.compile_launch``). ``tests/kernels/moe/test_aot.py`` runs
:func:`build_everything` in a clean child process and checks every build
with ``check_facts``: no register spills, shared memory within the limit,
``wgmma`` in the 16-bit matrix kernels.

Shapes are those of PLUM's MoE layers (multiples of 16, so the divisibility
specialisation, and with it the pipelined build, is the one that runs).
fp16 takes the bf16 code path of every kernel (another 16-bit operand), so
it is not built separately; fp32 GEMMs run their single default.
"""
from __future__ import annotations

import functools

from compile_checks import build_all, captured_launches, compile_launch

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
# Grouped GEMM launch shape: E experts, M routed rows, K -> N (all multiples of 16).
GEMM_SHAPE = dict(E=32, M=4096, K=1024, N=1408)
# (E, k, score, logits dtype): one case per router tile (BLOCK_T x BLOCK_E, warps)
# that E <= 256 gives, k and the score varied across them; sigmoid with a bias.
ROUTE_CASES = [(8, 8, "sigmoid", "fp32"), (16, 2, "softmax", "bf16"), (32, 8, "sigmoid", "fp32"),
               (64, 4, "sigmoid", "bf16"), (128, 8, "softmax", "fp32"), (256, 8, "sigmoid", "bf16")]
# Row-moving kernels: T tokens, k copies, D features.
ROWS_SHAPE = dict(T=4096, k=8, D=1024)


def _torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


@functools.lru_cache(maxsize=None)
def _gemm_launches(dtype: str) -> dict:
    """Recorded launches of the forward, dx (transposed weight) and weight-gradient GEMMs."""
    import torch

    from plum_kernels.moe import triton_gmm as TG

    E, M, K, N = GEMM_SHAPE["E"], GEMM_SHAPE["M"], GEMM_SHAPE["K"], GEMM_SHAPE["N"]
    dt = _torch_dtype(dtype)
    gs = torch.full((E,), M // E, dtype=torch.int32)
    x, w, dy = torch.randn(M, K).to(dt), torch.randn(E, K, N).to(dt), torch.randn(M, N).to(dt)
    with captured_launches() as launches:
        TG.gmm(x, w, gs)
        TG.gmm(dy, w, gs, transpose_w=True)
        TG.tgmm(x, dy, gs)
    assert [launch.name for launch in launches] == ["_gmm_kernel", "_gmm_kernel", "_tgmm_kernel"]
    return dict(zip(("fwd", "dx", "dw"), launches))


@functools.lru_cache(maxsize=None)
def _route_launches(E: int, k: int, score: str, dtype: str) -> dict:
    import torch

    from plum_kernels.moe import triton_route as TR

    T = 4096
    logits = torch.randn(T, E).to(_torch_dtype(dtype))
    bias = torch.randn(E) if score == "sigmoid" else None
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)
    with captured_launches() as launches:
        TR.launch_route_forward(logits, k, score, bias, True)
        TR.route_backward(logits, ids, torch.randn(T), score, True, torch.randn(T, k), torch.tensor(1.0),
                          torch.tensor(1.0))
    return {launch.name: launch for launch in launches}


@functools.lru_cache(maxsize=None)
def _row_launches(dtype: str) -> dict:
    import torch

    from plum_kernels.moe import triton_permute as TP

    T, k, D = ROWS_SHAPE["T"], ROWS_SHAPE["k"], ROWS_SHAPE["D"]
    dt = _torch_dtype(dtype)
    x, y, w = torch.randn(T, D).to(dt), torch.randn(T * k, D).to(dt), torch.rand(T, k)
    perm = torch.randperm(T * k).to(torch.int32)
    inv = torch.argsort(perm).to(torch.int32)
    with captured_launches() as launches:
        TP.gather_rows(x, perm, k)
        TP.combine(y, w, inv, k)
        TP.combine(y, None, inv, k)
        TP.unpermute_backward(x, y, w, perm)
    return dict(zip(("gather_rows", "combine_weighted", "combine_sum", "unpermute_bwd"), launches))


def jobs() -> dict[str, tuple]:
    """name -> (launch source, launch key, overrides, needs wgmma)."""
    from plum_kernels.moe import triton_gmm as TG

    out = {}
    for dtype, esize in (("bf16", 2), ("fp32", 4)):
        for kinds, space in ((("fwd", "dx"), TG.GMM_SPACES[esize]), (("dw",), TG.TGMM_SPACES[esize])):
            for cfg in space:
                tag = "x".join(f"{k[6:]}{v}" for k, v in cfg.meta().items()) + f"w{cfg.num_warps}s{cfg.num_stages}"
                tiles = dict(cfg.meta(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                for kind in kinds:
                    out[f"gmm-{kind}-{dtype}-{tag}"] = (("gemm", dtype), kind, tiles, dtype == "bf16")
    for E, k, score, dtype in ROUTE_CASES:
        for kind in ("fwd", "bwd"):
            out[f"route-{kind}-E{E}-k{k}-{score}-{dtype}"] = (("route", E, k, score, dtype),
                                                            f"_route_{kind}_kernel", {}, False)
    for kernel in ("gather_rows", "combine_weighted", "combine_sum", "unpermute_bwd"):
        out[f"{kernel}-bf16"] = (("rows", "bf16"), kernel, {}, False)
    return out


def launch_of(name: str):
    """The recorded launch behind job ``name``."""
    (source, *spec), key, _, _ = jobs()[name]
    launches = {"gemm": _gemm_launches, "route": _route_launches, "rows": _row_launches}[source](*spec)
    return launches[key]


def build(name: str):
    """Compile one job (runs in a worker of ``build_all``)."""
    return compile_launch(launch_of(name), **jobs()[name][2])


def build_everything() -> dict:
    """Run in the clean subprocess: every job's facts."""
    return build_all("moe_aot", list(jobs()))
