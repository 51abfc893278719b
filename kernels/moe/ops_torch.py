"""PyTorch MoE ops: validation, dispatch and ``torch.library`` registration.

Public functions (re-exported by ``plum_kernels.torch``):

- ``moe_route(router_logits, top_k, *, score, bias, renormalize, impl)``
- ``moe_permute(x, expert_ids, num_experts, *, impl, validate)``
- ``moe_unpermute(y, weights, permutation, inverse, *, impl, validate)``
- ``grouped_matmul(x, w, group_sizes=None, *, offs=None, transpose_w, impl,
  validate)`` (``offs``: ``torch._grouped_mm``'s cumulative end offsets)
- ``moe_mlp(x, router_logits, w_gate_up, w_down, top_k, *, score, bias,
  renormalize, impl)``

Each wraps a ``plum_kernels::*`` custom op that carries ``impl`` as a string
argument, so ``impl="reference"`` and ``impl="triton"`` go through the same
registration (fake tensors for ``torch.compile``, ``register_autograd`` for
the backward, itself another custom op). ``impl=None`` picks Triton for CUDA
tensors and the reference otherwise; ``impl="triton"`` on CPU tensors runs the
Triton interpreter (the caller sets ``TRITON_INTERPRET=1``). Contracts:
docs/design.md, 'moe_route' .. 'moe_mlp'; exact semantics:
``kernels/moe/reference.py``.

``moe_route``, ``moe_route_backward``, ``moe_permute``, ``moe_combine``,
``moe_unpermute`` and ``moe_unpermute_backward`` are ``triton_visible_op``s:
with ``impl="triton"`` ``torch.compile`` traces into their Triton launches
(Inductor compiles the kernels). ``grouped_matmul`` stays opaque: its
autotuned launch refills its tile schedule for each configuration through a
Triton ``pre_hook``, which ``torch.library.wrap_triton`` does not support.
``grouped_matmul_dw`` (the weight gradient, no ``pre_hook``) is opaque as well,
so that the forward and backward of one grouped matmul compile the same way.

Host synchronisation: none inside the ops on CUDA. On CPU tensors the
reference grouped matmuls run one product per expert (``*_segments`` in the
reference: the group sizes are read on the host, which costs nothing there).
The public ``moe_permute``, ``moe_unpermute`` and ``grouped_matmul`` check
the *values* of ``expert_ids`` / ``permutation`` and ``inverse`` /
``group_sizes`` (ranges, consistency, sum) when ``validate=True`` (the
default), which reads them back once per call; ``moe_mlp`` builds them itself
and skips that. Under ``torch.compile`` (``torch.compiler.is_compiling()``)
the value checks are skipped: they would need a host read in the middle of
the graph (a graph break); the shape, dtype and device checks run on the
static shapes while tracing. The argument checks are ``checks.py``'s, shared with the JAX
ops. Without the value checks the results are undefined for bad values, but
no kernel reads or writes outside its tensors (the Triton kernels clamp every
row index they compute an address from).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._autotune import triton_visible_op
from .._checks import describe
from .._dispatch import resolve_torch_impl
from . import reference as ref
from .checks import (
    check_expert_ids_values,
    check_group_sizes_values,
    check_grouped_matmul,
    check_mlp,
    check_offs_values,
    check_permute,
    check_route,
    check_unpermute,
    check_unpermute_values,
)


def _triton():
    # Imported lazily: importing plum_kernels.torch must not import triton.
    from . import triton_gmm, triton_permute, triton_route
    return triton_gmm, triton_permute, triton_route


def _route_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ============================================================================= route


@triton_visible_op("plum_kernels::moe_route")
def _route_op(logits: Tensor, top_k: int, score: str, bias: Optional[Tensor], renormalize: bool,
              impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if impl == "triton":
        w, ids, lse, lb, z = _triton()[2].route_forward(logits, top_k, score, bias, renormalize)
        return w, ids, lb, z, lse
    w, ids, lb, z = ref.route(logits, top_k, score, bias, renormalize)
    lse = torch.logsumexp(logits.to(w.dtype), dim=-1)
    return w, ids, lb, z, lse


@_route_op.register_fake
def _(logits, top_k, score, bias, renormalize, impl):
    T = logits.shape[0]
    dt = _route_dtype(logits.dtype)
    return (logits.new_empty(T, top_k, dtype=dt), logits.new_empty(T, top_k, dtype=torch.int32),
            logits.new_empty((), dtype=dt), logits.new_empty((), dtype=dt), logits.new_empty(T, dtype=dt))


@triton_visible_op("plum_kernels::moe_route_backward")
def _route_backward_op(logits: Tensor, ids: Tensor, lse: Tensor, bias: Optional[Tensor], top_k: int,
                       score: str, renormalize: bool, grad_weights: Tensor, grad_lb: Tensor,
                       grad_z: Tensor, impl: str) -> Tensor:
    if impl == "triton":
        return _triton()[2].route_backward(logits, ids, lse, score, renormalize, grad_weights, grad_lb, grad_z)
    return ref.route_backward(logits, ids, score, renormalize, grad_weights, grad_lb, grad_z)


@_route_backward_op.register_fake
def _(logits, ids, lse, bias, top_k, score, renormalize, grad_weights, grad_lb, grad_z, impl):
    return torch.empty_like(logits)


def _route_setup(ctx, inputs, output):
    logits, top_k, score, bias, renormalize, impl = inputs
    _, ids, _, _, lse = output
    ctx.save_for_backward(logits, ids, lse, bias)
    ctx.args = (top_k, score, renormalize, impl)


def _route_backward(ctx, gw, gids, glb, gz, glse):
    logits, ids, lse, bias = ctx.saved_tensors
    top_k, score, renormalize, impl = ctx.args
    dt = _route_dtype(logits.dtype)
    gw = torch.zeros(ids.shape, dtype=dt, device=logits.device) if gw is None else gw
    glb = logits.new_zeros((), dtype=dt) if glb is None else glb
    gz = logits.new_zeros((), dtype=dt) if gz is None else gz
    dl = _route_backward_op(logits, ids, lse, bias, top_k, score, renormalize, gw, glb, gz, impl)
    return dl, None, None, None, None, None


_route_op.register_autograd(_route_backward, setup_context=_route_setup)


class RouteOutput(NamedTuple):
    weights: Tensor            # [T, k] float32 (float64 for float64 logits)
    expert_ids: Tensor         # [T, k] int32, descending by score (+ bias)
    load_balance_loss: Tensor  # [] Switch/GShard E * sum_e f_e P_e
    z_loss: Tensor             # [] mean_t logsumexp(logits_t)^2


def moe_route(router_logits: Tensor, top_k: int, *, score: str = "softmax", bias: Tensor | None = None,
              renormalize: bool = True, impl: str | None = None) -> RouteOutput:
    """Top-``k`` expert choice per token and its weights, plus the router's losses.

    Args:
      router_logits: ``[T, E]`` floating (float16/bfloat16/float32; float64 for
        the reference only), ``T >= 1``. The router math runs in float32.
      top_k: experts per token, ``1 <= top_k <= E``.
      score: ``"softmax"`` or ``"sigmoid"`` scores.
      bias: optional ``[E]`` floating bias added to the scores for the
        selection only (auxiliary-loss-free balancing); never in the weights
        and never differentiated.
      renormalize: divide the ``k`` selected scores by their sum.
      impl: ``None`` | ``"reference"`` | ``"triton"``.

    Returns ``RouteOutput(weights [T, k], expert_ids [T, k] int32,
    load_balance_loss [], z_loss [])``; ``weights`` and both losses are
    differentiable w.r.t. ``router_logits``. See ``kernels/moe/reference.py``
    for the exact formulas.
    """
    impl = resolve_torch_impl(impl, getattr(router_logits, "device", "cpu"))
    check_route(describe("router_logits", router_logits, "[T, E]"), top_k, score,
                None if bias is None else describe("bias", bias, "[E]"), impl)
    w, ids, lb, z, _ = _route_op(router_logits, top_k, score, bias, bool(renormalize), impl)
    return RouteOutput(w, ids, lb, z)


# ============================================================================= permute / unpermute


@triton_visible_op("plum_kernels::moe_combine")
def _combine_op(y: Tensor, weights: Optional[Tensor], inverse: Tensor, k: int, impl: str) -> Tensor:
    if impl == "triton":
        return _triton()[1].combine(y, weights, inverse, k)
    return ref.combine(y, weights, inverse, k)


@_combine_op.register_fake
def _(y, weights, inverse, k, impl):
    return y.new_empty(inverse.shape[0] // k, y.shape[1])


@triton_visible_op("plum_kernels::moe_permute")
def _permute_op(x: Tensor, expert_ids: Tensor, num_experts: int, impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    group_sizes, perm, inverse = ref.permute_indices(expert_ids, num_experts)
    k = expert_ids.shape[1]
    if impl == "triton":
        xs = _triton()[1].gather_rows(x, perm, k)
    else:
        xs = ref.gather_rows(x, perm, k)
    return xs, group_sizes, perm, inverse


@_permute_op.register_fake
def _(x, expert_ids, num_experts, impl):
    M = expert_ids.shape[0] * expert_ids.shape[1]
    i32 = torch.int32
    return (x.new_empty(M, x.shape[1]), x.new_empty(num_experts, dtype=i32), x.new_empty(M, dtype=i32),
            x.new_empty(M, dtype=i32))


def _permute_setup(ctx, inputs, output):
    x, expert_ids, num_experts, impl = inputs
    ctx.save_for_backward(output[3])
    ctx.k, ctx.impl = expert_ids.shape[1], impl


def _permute_backward(ctx, gxs, ggs, gperm, ginv):
    (inverse,) = ctx.saved_tensors
    return _combine_op(gxs, None, inverse, ctx.k, ctx.impl), None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


@triton_visible_op("plum_kernels::moe_unpermute")
def _unpermute_op(y: Tensor, weights: Tensor, permutation: Tensor, inverse: Tensor, impl: str) -> Tensor:
    return _combine_op(y, weights, inverse, weights.shape[1], impl)


@_unpermute_op.register_fake
def _(y, weights, permutation, inverse, impl):
    return y.new_empty(weights.shape[0], y.shape[1])


@triton_visible_op("plum_kernels::moe_unpermute_backward")
def _unpermute_backward_op(grad_out: Tensor, y: Tensor, weights: Tensor, permutation: Tensor,
                           impl: str) -> tuple[Tensor, Tensor]:
    if impl == "triton":
        return _triton()[1].unpermute_backward(grad_out, y, weights, permutation)
    return ref.unpermute_backward(grad_out, y, weights, permutation)


@_unpermute_backward_op.register_fake
def _(grad_out, y, weights, permutation, impl):
    return torch.empty_like(y), torch.empty_like(weights)


def _unpermute_setup(ctx, inputs, output):
    y, weights, permutation, inverse, impl = inputs
    ctx.save_for_backward(y, weights, permutation)
    ctx.impl = impl


def _unpermute_backward(ctx, grad_out):
    y, weights, permutation = ctx.saved_tensors
    dy, dw = _unpermute_backward_op(grad_out.contiguous(), y, weights, permutation, ctx.impl)
    return dy, dw, None, None, None


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


def moe_permute(x: Tensor, expert_ids: Tensor, num_experts: int, *, impl: str | None = None,
                validate: bool = True):
    """Sort the ``k`` copies of every token stably by expert.

    Args:
      x: ``[T, d]`` tokens.
      expert_ids: ``[T, k]`` int32/int64 in ``[0, num_experts)`` (``moe_route``'s).
      num_experts: ``E >= 1``.
      validate: check that every id is in range (one read-back to the host;
        skipped under ``torch.compile``).
        Without it, ids outside ``[0, num_experts)`` give undefined
        ``group_sizes`` and a permutation that mixes those copies into the
        first or last group (memory-safe).

    Returns ``(x_sorted [T*k, d], group_sizes [E] int32, permutation [T*k]
    int32, inverse [T*k] int32)``: sorted row ``p`` is copy
    ``permutation[p] = t*k + j`` of token ``t``; ``inverse`` is the inverse
    permutation. Differentiable w.r.t. ``x`` (the backward sums each token's
    ``k`` copies)."""
    check_permute(describe("x", x, "[T, d]"), describe("expert_ids", expert_ids, "[T, k]"), num_experts)
    if validate and expert_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.stack([expert_ids.min(), expert_ids.max()]).tolist()
        check_expert_ids_values(lo, hi, num_experts)
    impl = resolve_torch_impl(impl, x.device)
    return _permute_op(x, expert_ids, int(num_experts), impl)


def _unpermute_summary(permutation: Tensor, inverse: Tensor) -> tuple:
    """``((min, max) of permutation, (min, max) of inverse, consistent)`` in
    one read-back (the consistency gather clamps its indices)."""
    M = inverse.shape[0]
    perm, inv = permutation.long(), inverse.long()
    back = perm[inv.clamp(0, M - 1)]
    ok = (back == torch.arange(M, device=inv.device)).all()
    vals = torch.stack([perm.min(), perm.max(), inv.min(), inv.max(), ok.long()]).tolist()
    return (vals[0], vals[1]), (vals[2], vals[3]), bool(vals[4])


def moe_unpermute(y: Tensor, weights: Tensor, permutation: Tensor, inverse: Tensor, *,
                  impl: str | None = None, validate: bool = True) -> Tensor:
    """Weighted combine back to token order: ``out[t] = sum_j weights[t, j] *
    y[inverse[t*k + j]]`` (float32 accumulation).

    Args:
      y: ``[T*k, d]`` floating, rows sorted by expert (``moe_permute``'s order).
      weights: ``[T, k]`` floating (``moe_route``'s), on y's device.
      permutation: ``[T*k]`` int32/int64, ``moe_permute``'s ``permutation``.
      inverse: ``[T*k]`` int32/int64, ``moe_permute``'s ``inverse``.
      impl: ``None`` | ``"reference"`` | ``"triton"``.
      validate: check that ``permutation`` and ``inverse`` lie in ``[0,
        T*k)`` and are inverse permutations of each other (one read-back to
        the host; skipped under ``torch.compile``). Without it, bad indices
        give undefined values (and an ``IndexError`` from the reference); the
        Triton kernels clamp every row index into ``[0, T*k)`` and never read
        or write outside their tensors.

    Returns ``[T, d]`` in ``y.dtype``. Differentiable w.r.t. ``y`` and
    ``weights`` (the backward reads ``permutation``)."""
    check_unpermute(describe("y", y, "[T*k, d]"), describe("weights", weights, "[T, k]"),
                    describe("permutation", permutation, "[T*k]"), describe("inverse", inverse, "[T*k]"))
    if validate and y.shape[0] and not torch.compiler.is_compiling():
        check_unpermute_values(y.shape[0], *_unpermute_summary(permutation, inverse))
    impl = resolve_torch_impl(impl, y.device)
    return _unpermute_op(y, weights, permutation, inverse, impl)


# ============================================================================= grouped matmul


@torch.library.custom_op("plum_kernels::grouped_matmul", mutates_args=())
def _gmm_op(x: Tensor, w: Tensor, group_sizes: Tensor, transpose_w: bool, impl: str) -> Tensor:
    if impl == "triton":
        return _triton()[0].gmm(x, w, group_sizes, transpose_w=transpose_w)
    if x.device.type == "cpu":  # one product per expert: 1/E of the dense reference's FLOPs
        return ref.grouped_matmul_segments(x, w, group_sizes, transpose_w)
    return ref.grouped_matmul(x, w, group_sizes, transpose_w)


@_gmm_op.register_fake
def _(x, w, group_sizes, transpose_w, impl):
    return x.new_empty(x.shape[0], w.shape[1] if transpose_w else w.shape[2])


@torch.library.custom_op("plum_kernels::grouped_matmul_dw", mutates_args=())
def _gmm_dw_op(x: Tensor, dy: Tensor, group_sizes: Tensor, impl: str) -> Tensor:
    if impl == "triton":
        return _triton()[0].tgmm(x, dy, group_sizes)
    if x.device.type == "cpu":
        return ref.grouped_matmul_dw_segments(x, dy, group_sizes)
    return ref.grouped_matmul_dw(x, dy, group_sizes)


@_gmm_dw_op.register_fake
def _(x, dy, group_sizes, impl):
    return x.new_empty(group_sizes.shape[0], x.shape[1], dy.shape[1])


def _gmm_setup(ctx, inputs, output):
    x, w, group_sizes, transpose_w, impl = inputs
    ctx.save_for_backward(x, w, group_sizes)
    ctx.transpose_w, ctx.impl = transpose_w, impl


def _gmm_backward(ctx, dy):
    x, w, group_sizes = ctx.saved_tensors
    dy = dy.contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = _gmm_op(dy, w, group_sizes, not ctx.transpose_w, ctx.impl)
    if ctx.needs_input_grad[1]:
        # out_e = x_e @ w_e  -> dw_e = x_e^T dy_e;  out_e = x_e @ w_e^T -> dw_e = dy_e^T x_e
        dw = (_gmm_dw_op(dy, x, group_sizes, ctx.impl) if ctx.transpose_w
              else _gmm_dw_op(x, dy, group_sizes, ctx.impl))
    return dx, dw, None, None, None


_gmm_op.register_autograd(_gmm_backward, setup_context=_gmm_setup)


def _group_sizes_from_offs(offs: Tensor) -> Tensor:
    """``torch._grouped_mm``'s cumulative end offsets ``offs [E]`` -> group sizes ``[E]``."""
    starts = torch.cat([offs.new_zeros(1), offs[:-1]])
    return offs - starts


def grouped_matmul(x: Tensor, w: Tensor, group_sizes: Tensor | None = None, *, offs: Tensor | None = None,
                   transpose_w: bool = False, impl: str | None = None, validate: bool = True) -> Tensor:
    """Grouped (ragged) matmul: rows of ``x`` sorted by group, each times its
    group's matrix.

    Args:
      x: ``[M, K]`` floating (bf16, fp16 or fp32; float64 with
        ``impl="reference"``).
      w: ``[E, K, N]`` (``[E, N, K]`` used transposed when ``transpose_w``),
        same dtype and device as ``x``.
      group_sizes: ``[E]`` int32/int64, non-negative, summing to ``M``; the
        rows of group ``e`` are ``offsets[e] : offsets[e+1]``. Empty groups are
        allowed (their ``dw`` is zero).
      offs: instead of ``group_sizes`` (exactly one of the two): ``[E]``
        int32/int64 cumulative end offsets as ``torch._grouped_mm`` takes
        them, ``offs[e]`` = the end row of group ``e`` (non-decreasing,
        ``offs[E-1] == M``).
      transpose_w: use ``w[e]`` transposed (``w`` is ``[E, N, K]``).
      impl: ``None`` | ``"reference"`` | ``"triton"``.
      validate: check the values (sizes non-negative and summing to ``M``;
        ``offs`` non-decreasing from >= 0 and ending at ``M``; one read-back
        to the host; skipped under ``torch.compile``). Without it, bad values
        give undefined rows; the Triton kernels clamp the groups' row ranges
        into ``[0, M)`` and never read or write outside ``x`` and the output.

    Returns ``[M, N]`` in ``x.dtype`` (float32 accumulation; float32 inputs
    use exact float32 products in the Triton kernel, not tf32).
    Differentiable w.r.t. ``x`` and ``w``."""
    impl = resolve_torch_impl(impl, getattr(x, "device", "cpu"))
    if (group_sizes is None) == (offs is None):
        raise ValueError("pass exactly one of group_sizes (rows per group) and offs (cumulative end rows)")
    name = "group_sizes" if offs is None else "offs"
    groups = group_sizes if offs is None else offs
    check_grouped_matmul(describe("x", x, "[M, K]"), describe("w", w, "[E, K, N]"),
                         describe(name, groups, "[E]"), bool(transpose_w), impl, name=name)
    if validate and not torch.compiler.is_compiling():
        if offs is None:
            check_group_sizes_values(group_sizes.tolist(), x.shape[0])
        else:
            check_offs_values(offs.tolist(), x.shape[0])
    if offs is not None:
        group_sizes = _group_sizes_from_offs(offs)
    return _gmm_op(x, w, group_sizes.to(torch.int32), bool(transpose_w), impl)


# ============================================================================= SwiGLU expert layer


class MoEOutput(NamedTuple):
    out: Tensor                # [T, d] in x.dtype
    load_balance_loss: Tensor  # []
    z_loss: Tensor             # []


def moe_mlp(x: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor, top_k: int, *,
            score: str = "softmax", bias: Tensor | None = None, renormalize: bool = True,
            impl: str | None = None) -> MoEOutput:
    """Dropless SwiGLU mixture-of-experts layer.

    ``out[t] = sum_j w[t, j] * (silu(x_t Wg_e) * (x_t Wu_e)) Wd_e`` with
    ``e = expert_ids[t, j]``, composed as route -> permute -> grouped_matmul
    (gate|up) -> SwiGLU -> grouped_matmul (down) -> unpermute.

    Args:
      x: ``[T, d]``.
      router_logits: ``[T, E]`` (the router projection of ``x``; computed by
        the caller).
      w_gate_up: ``[E, d, 2f]``, gate in ``[..., :f]``, up in ``[..., f:]``;
        same dtype and device as ``x``.
      w_down: ``[E, f, d]``, same dtype and device as ``x``.
      top_k, score, bias, renormalize: as ``moe_route``.
      impl: ``None`` | ``"reference"`` | ``"triton"``, used by every op.

    Returns ``MoEOutput(out [T, d], load_balance_loss, z_loss)``; all
    differentiable w.r.t. ``x``, ``router_logits`` and both weights."""
    impl = resolve_torch_impl(impl, getattr(x, "device", "cpu"))
    check_mlp(describe("x", x, "[T, d]"), describe("router_logits", router_logits, "[T, E]"),
              describe("w_gate_up", w_gate_up, "[E, d, 2f]"), describe("w_down", w_down, "[E, f, d]"), impl)
    E = w_down.shape[0]
    r = moe_route(router_logits, top_k, score=score, bias=bias, renormalize=renormalize, impl=impl)
    xs, group_sizes, perm, inverse = _permute_op(x, r.expert_ids, E, impl)
    h = _gmm_op(xs, w_gate_up, group_sizes, False, impl)
    a = ref.swiglu(h)
    y = _gmm_op(a, w_down, group_sizes, False, impl)
    out = _unpermute_op(y, r.weights, perm, inverse, impl)
    return MoEOutput(out, r.load_balance_loss, r.z_loss)
