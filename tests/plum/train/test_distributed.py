"""The process group, the device of each rank and the model wrapping of distributed training, in one process
(two gloo processes: test_loop.py)."""
import torch

from plumrec.train import TrainConfig
from plumrec.train.distributed import default_device, dist_env, full_model_state, full_state, wrap_model


def test_shutdown_distributed(tmp_path):
    """Leaves a (one-rank gloo) process group; a no-op without one."""
    import torch.distributed as dist

    from plumrec.train.distributed import shutdown_distributed

    shutdown_distributed()  # no group: nothing to do
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    assert dist.is_initialized()
    shutdown_distributed()
    assert not dist.is_initialized()


def test_one_process_is_rank_0_of_1_and_leaves_the_model_unwrapped(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist_env() == (0, 1) and default_device() == torch.device("cpu")
    model = torch.nn.Linear(2, 3)
    assert wrap_model(model, TrainConfig()) is model
    state = full_model_state(model)
    assert set(state) == {"weight", "bias"} and all(v.device.type == "cpu" for v in state.values())
    sd, osd = full_state(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert torch.equal(sd["weight"], model.weight) and "param_groups" in osd


def test_collective_device_follows_the_backend(tmp_path, monkeypatch):
    """The current CUDA device under NCCL; the CPU under gloo and without a group."""
    import torch.distributed as dist

    from plumrec.train.distributed import collective_device

    assert collective_device() == torch.device("cpu")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert collective_device() == torch.device("cpu")
        monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
        assert collective_device() == torch.device("cuda", 3)
    finally:
        dist.destroy_process_group()


def test_all_reduce_floats_checks_op_and_passes_values_through_without_a_group():
    from plumrec.train.distributed import all_reduce_floats

    assert all_reduce_floats([1.5, float("nan")])[0] == 1.5
    import pytest

    with pytest.raises(ValueError, match="op must be 'sum' or 'max', got 'mean'"):
        all_reduce_floats([1.0], op="mean")
    from plumrec.train.distributed import gather_objects

    assert gather_objects({"a": [1, 2]}) == [{"a": [1, 2]}]  # no group: this process's object alone


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
                "reduce", "gather", "scatter", "all_to_all_single")


def test_every_collective_of_a_training_run_takes_a_tensor_placed_on_the_group_device(tmp_path, monkeypatch):
    """A fake NCCL check over a one-rank gloo group (collectives run whenever there is a group): every
    tensor handed to a ``torch.distributed`` collective must lie on ``collective_device()`` and must have
    been placed there by asking it (NCCL refuses a tensor placed by habit on the CPU, which gloo would take);
    a run with logging, a checkpoint, a resume and the non-finite check issues such collectives each step."""
    import torch.distributed as dist
    from tiny_training import tiny_lm_and_data, tiny_train_config

    import plumrec.train.distributed as D
    from plumrec.train import train

    asked, seen = [], []
    real_device = D.collective_device

    def spy():
        asked.append(real_device())
        return asked[-1]

    def fake_nccl(name, real):
        def call(*args, **kwargs):
            tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            for t in tensors:
                if not asked or t.device != D.collective_device():
                    raise RuntimeError(f"fake NCCL: {name} on a tensor on {t.device} that collective_device() "
                                       "did not place")
            asked.clear()
            seen.append(name)
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(D, "collective_device", spy)
    for name in _COLLECTIVES:
        monkeypatch.setattr(dist, name, fake_nccl(name, getattr(dist, name)))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model, data = tiny_lm_and_data()
        train(model, data, tiny_train_config(steps=3), tmp_path / "run", stop_after=2)
        last = train(model, data, tiny_train_config(steps=3), tmp_path / "run")
    finally:
        dist.destroy_process_group()
    assert last["step"] == 3 and seen.count("all_reduce") == 2 * 3  # the non-finite check and the log, per step
