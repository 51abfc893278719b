"""Proof, on a machine with neither, that our kernels are real GPU / TPU kernels.

``compile_for_hopper`` compiles a ``@triton.jit`` kernel ahead of time for an
H100 (``sm_90``) through Triton's whole pipeline (TTIR -> TTGIR -> LLVM -> PTX ->
cubin with the bundled ptxas); no GPU is needed. It returns the PTX and the
static shared memory the kernel uses so that tests can check the device limit
and, for matrix kernels, the presence of Hopper tensor-core instructions
(``wgmma``).

``lower_for_tpu`` exports a JAX function for the TPU platform with
``jax.export`` (the Pallas kernels inside must be called with
``interpret=False``), which runs Mosaic's lowering and enforces its block-shape
and op rules; it returns the StableHLO text holding the ``tpu_custom_call``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any, Callable, Mapping, Sequence

# Max dynamic shared memory per block on an H100 (sm_90): 227 KiB.
HOPPER_SMEM_LIMIT = 227 * 1024


@dataclasses.dataclass(frozen=True)
class HopperBuild:
    ptx: str
    shared: int          # bytes of shared memory per program
    num_warps: int
    num_stages: int

    @property
    def uses_wgmma(self) -> bool:
        return "wgmma.mma_async" in self.ptx

    def check(self, *, tensor_cores: bool = False) -> "HopperBuild":
        assert self.shared <= HOPPER_SMEM_LIMIT, (
            f"kernel needs {self.shared} B of shared memory, H100 allows {HOPPER_SMEM_LIMIT}")
        if tensor_cores:
            assert self.uses_wgmma, "matrix kernel has no wgmma instruction in its PTX"
        return self


def compile_for_hopper(kernel: Any, signature: Mapping[str, str],
                       constexprs: Mapping[str, Any] | None = None, *,
                       num_warps: int = 4, num_stages: int = 3,
                       aligned: Sequence[str] | None = None) -> HopperBuild:
    """Compile ``kernel`` (a ``triton.jit`` function) for sm_90.

    ``signature`` maps every argument name to a Triton type string
    (``"*bf16"``, ``"i32"``, ``"fp32"``, ...) and constexpr arguments to
    ``"constexpr"``; ``constexprs`` gives their values.

    ``aligned`` names the arguments specialised as divisible by 16, as Triton
    does at run time for 16-byte-aligned pointers and multiple-of-16 integers
    (this is what enables software pipelining, so it decides the real shared
    memory). ``None`` (default) aligns every pointer argument, which is what
    torch allocations give; ``()`` compiles the generic variant.

    Call it in a process where the Triton interpreter has not run kernels
    (see :func:`compile_in_clean_process`).
    """
    if os.environ.get("TRITON_INTERPRET"):
        raise RuntimeError("compile_for_hopper runs only in a process without TRITON_INTERPRET: "
                           "call it through compile_in_clean_process")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel
    # Under TRITON_INTERPRET=1 ``@triton.jit`` gives an InterpretedFunction;
    # compile the JITFunction underneath.
    while not isinstance(fn, triton.runtime.jit.JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = triton.runtime.jit.JITFunction(getattr(fn, "fn", fn))
    constexprs = dict(constexprs or {})
    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    if aligned is None:
        aligned = [name for name, ty in signature.items() if ty.startswith("*")]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return HopperBuild(ptx=compiled.asm["ptx"], shared=int(compiled.metadata.shared),
                       num_warps=num_warps, num_stages=num_stages)


def compile_in_clean_process(module: str, function: str, timeout: float = 600) -> Any:
    """Run ``module.function()`` (a module of ``tests/``) in a fresh Python
    without ``TRITON_INTERPRET`` and return its JSON-serialisable result.

    Ahead-of-time builds must happen there: once the Triton interpreter has
    run a kernel that calls other ``@triton.jit`` helpers it has patched
    ``triton.language`` for good, and real compilation in that process fails.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.path.dirname(here), env.get("PYTHONPATH")) if p)
    code = f"import json, {module} as m; print('REPORT' + json.dumps(m.{function}()))"
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
