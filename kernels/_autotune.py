"""Autotuning of the Triton kernels on a GPU, off by one switch.

Each tuned kernel has a *space* of tile configurations (frozen dataclasses in
its family's module, every one compiled for sm_90 in the test suite without
register spills and within the shared-memory limit) and a *default*, the
space's first entry. On CUDA tensors the launchers run the kernel through
``triton.autotune`` over the space (one benchmark per new tuning key, then
the winner is cached for the process); under the Triton interpreter, or after
``set_autotune(False)``, they run the default: deterministic tiling, so
results are bitwise reproducible from one process to the next.

``chosen_configs()`` reports what the autotuners picked (for benchmarks).

``triton_visible_op`` registers a ``torch.library`` custom op whose Triton
branch ``torch.compile`` traces into (as ``torch.library.triton_op`` does: the
kernels, called through ``wrapped(kernel)``, appear in the graph as
``triton_kernel_wrapper_functional`` nodes that Inductor compiles), while its
reference branch, and every branch under the Triton interpreter (whose
kernels ``wrap_triton`` cannot trace), stays one opaque op with its fake.
"""
from __future__ import annotations

import inspect
from typing import Callable, Mapping, Sequence

import torch

_enabled = True
_tuners: dict[str, object] = {}


def set_autotune(enabled: bool) -> None:
    """Turn autotuning of every Triton kernel on (default) or off. Off, every
    kernel runs its default tiles: the same arithmetic order in every process."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _enabled = enabled


def autotune_enabled(device) -> bool:
    """Whether launches on ``device`` autotune: CUDA and the switch on."""
    return _enabled and getattr(device, "type", str(device)) == "cuda"


def tuner(name: str, kernel, configs: Sequence, key: Sequence[str], *, reset_to_zero: Sequence[str] = ()):
    """The process-wide ``triton.autotune`` of ``kernel`` over ``configs``
    (``triton.Config``s), created on first use under ``name``."""
    t = _tuners.get(name)
    if t is None:
        import triton

        t = triton.autotune(configs=list(configs), key=list(key), reset_to_zero=list(reset_to_zero) or None)(kernel)
        _tuners[name] = t
    return t


def chosen_configs() -> dict[str, dict[str, str]]:
    """``{tuner name: {tuning key: chosen config}}`` for the tuners that ran."""
    return {name: {str(k): str(cfg) for k, cfg in getattr(t, "cache", {}).items()} for name, t in _tuners.items()}


def launch(kernel, *, name: str, space: Sequence, config, device, grid: Callable[[Mapping], tuple], args: tuple,
           meta: dict, key: Sequence[str], pre_hook: Callable[[dict], None] | None = None,
           reset_to_zero: Sequence[str] = ()) -> None:
    """Launch ``kernel[grid](*args, **meta)`` with tiles from ``space``.

    On a GPU with autotuning on and no explicit ``config``: through the tuner
    ``name`` over ``space``, keyed by the arguments ``key`` (and the dtypes).
    Otherwise with ``config`` or the space's default (its first entry).
    ``grid(meta)`` gets the constexprs (block sizes included); ``pre_hook``
    (``dict`` of every argument and constexpr) refills what depends on the
    tiles before each run, e.g. a schedule; ``reset_to_zero`` names outputs
    the kernel accumulates into (zeroed before each timed run)."""
    if config is None and len(space) > 1 and autotune_enabled(device):
        tuned = tuner(name, kernel, [triton_config(c, pre_hook) for c in space], key, reset_to_zero=reset_to_zero)
        tuned[grid](*args, **meta)
        return
    cfg = config or space[0]
    meta = {**meta, **cfg.meta()}
    if pre_hook is not None:
        pre_hook({**dict(zip(kernel.arg_names, args)), **meta})
    kernel[grid(meta)](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def triton_config(cfg, pre_hook: Callable | None = None):
    """``triton.Config`` of one of our frozen tile dataclasses (its ``meta()``
    gives the constexpr block sizes)."""
    import triton

    return triton.Config(cfg.meta(), num_warps=cfg.num_warps, num_stages=cfg.num_stages, pre_hook=pre_hook)


def wrapped(kernel):
    """``torch.library.wrap_triton(kernel)`` under a dispatch mode (the
    tracing of a ``triton_visible_op`` body), a launch that ``torch.compile``
    traces; the kernel itself otherwise (eager launches, the interpreter)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return kernel if _get_current_dispatch_mode() is None else torch.library.wrap_triton(kernel)


def _interpreted() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)


def triton_visible_op(name: str, *, impl_arg: str = "impl"):
    """Decorator: ``fn`` as the custom op ``name`` (schema inferred from its
    annotations, no mutated arguments). In eager mode the op runs ``fn``.
    Under functionalization (``torch.compile``'s AOT tracing) a call whose
    ``impl_arg`` is ``"triton"`` decomposes into ``fn``'s body, i.e. its
    ``wrapped`` kernel launches, when the kernels are compiled ones; other
    calls stay opaque and use the fake registered on the returned op."""
    from torch._library.infer_schema import infer_schema
    from torch._library.triton import set_wrap_triton_enabled
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    def dec(fn: Callable):
        signature = inspect.signature(fn)

        def backend(*args, **kwargs):
            with set_wrap_triton_enabled(False):
                return fn(*args, **kwargs)

        op = torch.library.custom_op(name, backend, mutates_args=(), schema=infer_schema(fn, mutates_args=()))

        def decompose(mode, func, types, args, kwargs):
            if any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not torch.Tensor for t in types):
                return NotImplemented
            impl = signature.bind(*args, **kwargs).arguments[impl_arg]
            if impl != "triton" or _interpreted():
                return mode.__torch_dispatch__(func, types, args, kwargs)
            with mode:
                return fn(*args, **kwargs)

        op.register_torch_dispatch(FunctionalTensorMode, decompose)
        return op

    return dec


def registered_ops() -> list[str]:
    """Sorted names of the registered ``plum_kernels::`` ops (every op once
    ``plum_kernels.torch`` is imported), e.g. ``"moe_route"``."""
    prefix = "plum_kernels::"
    names = torch._C._dispatch_get_all_op_names()
    return sorted({n[len(prefix):].split(".")[0] for n in names if n.startswith(prefix)})
