"""A CPU-side audit of device-to-host syncs: every operation that makes the host wait for a tensor's values.

:class:`SyncAudit` is a context manager holding two modes:

- a ``TorchDispatchMode`` that sees every aten op the code under it runs (forward and backward) and records
  those whose result the host must read: ``aten._local_scalar_dense`` (what ``.item()``, ``int(t)``,
  ``float(t)``, ``bool(t)`` and ``list[t]`` dispatch to; aten's ``data_dependent_output`` tag), the ops whose
  output *shape* depends on the values (aten's ``dynamic_output_shape`` tag: ``nonzero``, ``masked_select``,
  ``unique*``, boolean indexing through ``aten.index.Tensor``...), except ``aten.index.Tensor`` with integer
  indices and ``aten.repeat_interleave.Tensor`` given ``output_size`` (no read-back), plus ``index_put`` with a
  boolean mask (a ``nonzero`` on CUDA);
- a ``TorchFunctionMode`` for ``Tensor.tolist`` and ``Tensor.numpy``, which read a CPU tensor's memory without
  dispatching any aten op (a dispatch mode never sees them on the CPU).

Our custom ops (namespace ``plum_kernels``) reach the dispatch mode as one opaque op each. With
``inside_custom_ops=False`` (default) their bodies run outside both modes, so the audit covers the code that
runs the same on every device (the model and the ops' Python wrappers, whose value checks must be off inside
layers); the calls are counted in :attr:`SyncAudit.custom_ops`. With ``inside_custom_ops=True`` the audit
re-enters the bodies (of the ops defined with ``torch.library.custom_op``; any other op stays opaque and is
named in :attr:`SyncAudit.unaudited_ops`) and records their syncs with ``in_custom_op`` set: on the CPU these
are the reference implementations, which read ``cu_seqlens`` and ``group_sizes`` on the host by design (a
loop over sequences or experts); the Triton bodies that a GPU runs keep those tensors on the device.

Each record names the innermost repository frame (``plum/`` or ``kernels/``) and keeps every repository frame
by qualified name, so a test can ask which syncs ran inside ``DecoderLayer.forward``.
"""
from __future__ import annotations

import collections
import dataclasses
import sys
from pathlib import Path

import torch
from torch._library import custom_ops
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = tuple(str(ROOT / d) + "/" for d in ("plum", "kernels"))
NAMESPACE = "plum_kernels"
_HOST_READS = {torch.Tensor.tolist: "Tensor.tolist", torch.Tensor.numpy: "Tensor.numpy"}
_INDEX_PUT = {"aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


@dataclasses.dataclass(frozen=True)
class Sync:
    """One device-to-host read: ``op`` (an aten overload or ``Tensor.tolist``), ``where`` (innermost repository
    frame ``path:line in qualname``), ``stack`` (repository frames' qualnames, outermost first) and
    ``in_custom_op`` (the ``plum_kernels`` op whose body ran it, or None)."""

    op: str
    where: str
    stack: tuple[str, ...]
    in_custom_op: str | None


def _repo_frames() -> list[tuple[str, int, str]]:
    frames, f = [], sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(SOURCE_DIRS):
            frames.append((str(Path(name).relative_to(ROOT)), f.f_lineno, f.f_code.co_qualname))
        f = f.f_back
    return frames[::-1]


def _is_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def forces_sync(func, args, kwargs) -> bool:
    """Whether aten op ``func`` on ``args``/``kwargs`` reads tensor values back to the host."""
    name = func._schema.name
    if torch.Tag.data_dependent_output in func.tags:
        return True
    if name in _INDEX_PUT:
        return _is_bool_index(args[1])
    if torch.Tag.dynamic_output_shape not in func.tags:
        return False
    if name == "aten::index":
        return _is_bool_index(args[1])
    if name == "aten::repeat_interleave":
        return kwargs.get("output_size") is None
    return True


class _Dispatch(TorchDispatchMode):
    def __init__(self, audit: "SyncAudit"):
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        audit = self.audit
        if func.namespace == NAMESPACE:
            name = func._schema.name
            audit.custom_ops[name] += 1
            opdef = custom_ops.OPDEFS.get(name)
            if opdef is None or not audit.inside_custom_ops:
                if audit.inside_custom_ops:
                    audit.unaudited_ops.add(name)
                audit._opaque += 1
                try:
                    return func(*args, **kwargs)
                finally:
                    audit._opaque -= 1
            audit._op_stack.append(name)
            try:
                # Inside __torch_dispatch__ both mode stacks are set aside: push fresh ones for the body.
                with _Function(audit), self:
                    return opdef._init_fn(*args, **kwargs)
            finally:
                audit._op_stack.pop()
        if forces_sync(func, args, kwargs):
            audit._record(str(func))
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, audit: "SyncAudit"):
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS and not self.audit._opaque:
            self.audit._record(_HOST_READS[func])
        return func(*args, **(kwargs or {}))


class SyncAudit:
    """``with SyncAudit() as audit: loss = model(...); loss.backward()`` then read ``audit.syncs``."""

    def __init__(self, *, inside_custom_ops: bool = False):
        self.inside_custom_ops = inside_custom_ops
        self.syncs: list[Sync] = []
        self.custom_ops: collections.Counter = collections.Counter()
        self.unaudited_ops: set[str] = set()   # with inside_custom_ops: ops defined without torch.library.custom_op
        self._op_stack: list[str] = []
        self._opaque = 0
        self._modes = (_Function(self), _Dispatch(self))

    def _record(self, op: str) -> None:
        frames = _repo_frames()
        where = f"{frames[-1][0]}:{frames[-1][1]} in {frames[-1][2]}" if frames else "<outside the repository>"
        self.syncs.append(Sync(op, where, tuple(q for _, _, q in frames),
                               self._op_stack[-1] if self._op_stack else None))

    def __enter__(self) -> "SyncAudit":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def within(self, qualname: str) -> list[Sync]:
        """The syncs with ``qualname`` (e.g. ``"DecoderLayer.forward"``) on their stack."""
        return [s for s in self.syncs if qualname in s.stack]

    def outside_custom_ops(self) -> list[Sync]:
        return [s for s in self.syncs if s.in_custom_op is None]

    def report(self) -> str:
        """One line per distinct ``(op, where, in_custom_op)`` with its count."""
        counts = collections.Counter((s.op, s.where, s.in_custom_op) for s in self.syncs)
        return "\n".join(f"{n:4d}  {op}  at {where}" + (f"  (inside {c})" if c else "")
                         for (op, where, c), n in counts.most_common())
