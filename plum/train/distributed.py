"""Several training processes through ``torchrun``: the process group, the device of each
rank, and the model wrapped for DDP (default) or FSDP2 (``TrainConfig.fsdp``), whose
full state every rank can gather.

Rank ``r`` of ``W`` takes micro-batches ``r, r + W, ...`` of one seeded stream
(:func:`plumrec.train.loop.train`), so the data order does not depend on ``W``.

Every collective that training and evaluation issue themselves goes through :func:`all_reduce_floats` or
:func:`gather_objects`, whose tensors lie on :func:`collective_device` (the current CUDA device under NCCL,
which refuses CPU tensors; the CPU under gloo).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from plumrec.train.config import TrainConfig

__all__ = ["dist_env", "grouped", "init_distributed", "shutdown_distributed", "default_device", "collective_device",
           "all_reduce_floats", "gather_objects", "full_model_state", "full_state", "wrap_model"]


def dist_env() -> tuple[int, int]:
    """``(rank, world_size)``; 0, 1 when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def grouped() -> bool:
    """Whether this process is in a process group (then collectives run, even with one rank)."""
    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """The device of the tensors that the default process group's collectives take: this process's current
    CUDA device under NCCL, the CPU under any other backend (gloo) or without a group."""
    if grouped() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_floats(values, op: str = "sum") -> list[float]:
    """``values`` (a sequence of python floats, the same length on every rank) reduced over the ranks,
    element-wise, in float64 on :func:`collective_device`; ``op`` is ``"sum"`` or ``"max"``. Without a
    process group, ``values`` as floats. Every rank must call it."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
    values = [float(v) for v in values]
    if not grouped():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=ops[op])
    return t.cpu().tolist()


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``all_gather_object``: through
    :func:`collective_device` under NCCL); ``[obj]`` without a process group. Every rank must call it."""
    if not grouped():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def init_distributed() -> tuple[int, int]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist_env()


def shutdown_distributed() -> None:
    """Leave the ``torchrun`` process group at the end of a successful job (no-op in one process).

    Every rank waits at a barrier, so no collective is in flight, then calls
    ``destroy_process_group``. Call it only when every rank got there: a rank
    that raised never reaches the barrier, and the others would wait for it.
    Known torch limitation on the CPU (gloo): a gloo worker thread can still
    drop the last reference to a finished collective's tensors while the
    interpreter finalizes (it needs the GIL to free them), which aborts the
    process after the job has finished ("terminate called without an active
    exception"; mechanism in pytorch/pytorch#179291); the barrier narrows
    that window, it cannot close it.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def default_device() -> torch.device:
    """This process's CUDA device (``LOCAL_RANK``) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def full_state(model, opt):
    """``(model state, optimizer state)`` of the whole model (gathered on the CPU under DDP/FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if dist_env()[1] > 1:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, opt, options=opts)
    return model.state_dict(), opt.state_dict()


def full_model_state(model) -> dict:
    """The whole model's state dict on the CPU (gathered from every rank under DDP/FSDP2)."""
    if dist_env()[1] > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def wrap_model(model, cfg: TrainConfig):
    """``model`` itself in one process; under ``torchrun`` DDP, or FSDP2 (``fully_shard`` per
    decoder layer) with ``cfg.fsdp``."""
    rank, world = dist_env()
    if world == 1:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = next(model.parameters()).device
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
