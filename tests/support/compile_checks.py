"""Proof, on a machine with neither, that our kernels are real GPU / TPU kernels.

Hopper. :func:`captured_launches` runs our launchers on CPU tensors in a
process without ``TRITON_INTERPRET`` and records every Triton launch instead
of running it. :func:`compile_launch` then compiles a recorded launch for an
H100/H200 (``sm_90``) through Triton's whole pipeline (TTIR -> TTGIR -> LLVM
-> PTX -> cubin with the bundled ptxas), specialised exactly as Triton
specialises it at run time (the same binder: 16-byte-aligned pointers and
multiple-of-16 integers are marked divisible, ints equal to 1 become
constants), so the build is the variant that runs, pipelined where the real
one is. The only change to the recorded arguments: the interpreter-only
constexprs (``UPCAST``, ``CPU_INTERP``) are set to False, as on a GPU. The
build reports its PTX, shared memory, registers and stack frame (read from
the cubin with the bundled ``cuobjdump``), which tests check against the
device (:meth:`HopperBuild.check`: shared memory within the sm_90 limit, no
spills to local memory, ``wgmma`` in matrix kernels).

TPU. :func:`lower_for_tpu` exports a JAX function for the TPU platform with
``jax.export`` (the Pallas kernels inside must be called with
``interpret=False``), which runs Mosaic's lowering and enforces its block-shape
and op rules; it returns the StableHLO text holding the ``tpu_custom_call``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterator

from plum_kernels.hopper import SM90, blocks_per_sm

# Max dynamic shared memory per block on Hopper (sm_90): 227 KiB.
HOPPER_SMEM_LIMIT = SM90.shared_per_block
# Constexprs that exist only for the Triton interpreter (CPU tensors); False on a GPU.
INTERPRETER_ONLY = ("UPCAST", "CPU_INTERP")


@dataclasses.dataclass(frozen=True)
class HopperBuild:
    """Facts of one sm_90 build."""

    ptx: str
    shared: int          # bytes of dynamic shared memory per program
    registers: int       # per thread
    stack: int           # bytes of stack frame per thread: spills (our kernels have no local arrays)
    num_warps: int
    num_stages: int
    divisible: tuple[str, ...] = ()   # arguments specialised as multiples of 16 (aligned pointers, ints)

    @property
    def uses_wgmma(self) -> bool:
        return "wgmma.mma_async" in self.ptx

    @property
    def blocks_per_sm(self) -> int:
        return blocks_per_sm(self.registers, self.shared, self.num_warps)

    def facts(self) -> dict:
        return {"shared": self.shared, "registers": self.registers, "stack": self.stack, "wgmma": self.uses_wgmma,
                "num_warps": self.num_warps, "num_stages": self.num_stages, "blocks_per_sm": self.blocks_per_sm,
                "sm_90": ".target sm_90" in self.ptx, "divisible": list(self.divisible)}


def check_facts(name: str, facts: dict, *, tensor_cores: bool) -> None:
    """Assert what every shipped configuration must show on sm_90."""
    assert facts["sm_90"], f"{name}: not built for sm_90"
    assert facts["shared"] <= HOPPER_SMEM_LIMIT, (
        f"{name}: needs {facts['shared']} B of shared memory, sm_90 allows {HOPPER_SMEM_LIMIT}")
    assert facts["stack"] == 0, f"{name}: {facts['stack']} B of stack per thread (register spills), " \
                                f"{facts['registers']} registers"
    if tensor_cores:
        assert facts["wgmma"], f"{name}: matrix kernel has no wgmma instruction in its PTX"


@dataclasses.dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""

    kernel: Any          # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict
    grid: Any

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@contextlib.contextmanager
def captured_launches() -> Iterator[list[Launch]]:
    """Record Triton launches (``JITFunction.run``) instead of running them.

    Launches through ``triton.autotune`` are recorded once per call, with the
    config the autotuner would run (its first config: no benchmarking here)."""
    _require_no_interpreter()
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    run, tuned_run = JITFunction.run, Autotuner.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs), grid))

    def record_tuned(self, *args, **kwargs):
        config = self.configs[0]
        nargs = {**dict(zip(self.arg_names, args)), **kwargs, **config.all_kwargs()}
        if config.pre_hook is not None:
            config.pre_hook(nargs)
        return self.fn.run(*args, **kwargs, **config.all_kwargs())

    JITFunction.run, Autotuner.run = record, record_tuned
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = run, tuned_run


def compile_launch(launch: Launch, **overrides) -> HopperBuild:
    """Compile a recorded launch for sm_90 with Triton's run-time specialisation.

    ``overrides`` replace keyword arguments (constexprs, ``num_warps``,
    ``num_stages``): how tests build every config of an autotuning space
    from one recorded launch."""
    _require_no_interpreter()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.kwargs, **overrides}
    for name in INTERPRETER_ONLY:
        if name in fn.arg_names:
            kwargs[name] = False
    kwargs.setdefault("debug", False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    regs, stack = _resource_usage(compiled.asm["cubin"])
    divisible = tuple(fn.arg_names[path[0]] for path, attr in attrs.items() if ["tt.divisibility", 16] in attr)
    return HopperBuild(ptx=compiled.asm["ptx"], shared=int(compiled.metadata.shared), registers=regs, stack=stack,
                       num_warps=options.num_warps, num_stages=options.num_stages, divisible=divisible)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """``(registers per thread, stack bytes per thread)`` of a cubin, from the
    ``cuobjdump`` that ships with Triton."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[-500:]}")
    return int(m.group(1)), int(m.group(2))


def _require_no_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET"):
        raise RuntimeError("ahead-of-time builds run only in a process without TRITON_INTERPRET: "
                           "call them through compile_in_clean_process")


def build_all(module: str, names: list[str], workers: int = 2) -> dict[str, dict]:
    """Facts of ``module.build(name)`` (a :class:`HopperBuild`) for every name,
    built in ``workers`` processes (ptxas is the bottleneck). ``module`` as in :func:`load_module`."""
    from concurrent.futures import ProcessPoolExecutor

    names = sorted(names)
    if workers <= 1:
        return {n: _build_one(module, n) for n in names}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return dict(zip(names, pool.map(_build_one, [module] * len(names), names)))


def _build_one(module: str, name: str) -> dict:
    return load_module(module).build(name).facts()


def load_module(module: str) -> Any:
    """A test file by its path (``__file__``; the tests' folders are not packages) or a module of
    ``tests/support`` by its name."""
    if not module.endswith(".py"):
        return importlib.import_module(module)
    name = "aot_" + re.sub(r"\W", "_", os.path.relpath(module, os.path.dirname(os.path.dirname(__file__))))
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, module)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def compile_in_clean_process(module: str, function: str, timeout: float = 900) -> Any:
    """Run ``module.function()`` in a fresh Python without ``TRITON_INTERPRET`` and return its
    JSON-serialisable result. ``module`` is a test file's path (pass ``__file__``) or the name of a
    module in ``tests/support``.

    Ahead-of-time builds must happen there: once the Triton interpreter has
    run a kernel that calls other ``@triton.jit`` helpers it has patched
    ``triton.language`` for good, and real compilation in that process fails.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = f"import json, compile_checks; m = compile_checks.load_module({module!r}); " \
           f"print('REPORT' + json.dumps(m.{function}()))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")][-1]
    return json.loads(line[len("REPORT"):])


def lower_for_tpu(fn: Callable, *args: Any) -> str:
    """Export ``fn`` for TPU with ``jax.export``; ``args`` are arrays or
    ``jax.ShapeDtypeStruct``s. Returns the lowered module text, which must hold
    a Mosaic ``tpu_custom_call``."""
    import jax

    specs = [a if isinstance(a, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(a.shape, a.dtype)
             for a in args]
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*specs)
    text = exported.mlir_module()
    assert "tpu_custom_call" in text, "no Mosaic kernel in the TPU lowering"
    return text
