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
