"""Test-suite set-up shared by every test.

- ``TRITON_INTERPRET=1`` is set *before* triton is imported, on every machine,
  so every Triton kernel runs through the Triton interpreter on the tests' CPU
  tensors (the package itself never touches this variable). The suite is the
  same check with or without a GPU; on a GPU, ``benchmarks/check_kernels.py``
  checks the compiled kernels against their float64 references.
- Every test starts from fixed seeds (python, numpy, torch).
- ``@pytest.mark.gpu`` tests (those that need CUDA itself, not a compiled
  kernel) are skipped cleanly without CUDA.
- Pallas tests call the kernels with ``interpret=True`` (TPU interpret mode);
  TPU lowering is checked separately with ``compile_checks.lower_for_tpu``.
"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch  # noqa: E402  (does not import triton)

HAS_CUDA = torch.cuda.is_available()
# Always: the tests build CPU tensors, which compiled GPU kernels cannot take.
os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "plum",
        deadline=None,
        max_examples=int(os.environ.get("PLUM_HYPOTHESIS_EXAMPLES", "60")),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=True,
    )
    settings.load_profile("plum")
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass

SEED = 20261123


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op torch thread per test: the tests' tensors are tiny, the
    suite runs as 2 workers on 2 cores, and extra threads only add
    synchronisation (several times the CPU time of a small fit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(SEED)
    np.random.seed(SEED % (2**32))
    torch.manual_seed(SEED)
    yield


@pytest.fixture
def last_config_wins(monkeypatch):
    """Run the GPU launch path (``triton.autotune`` over each space) on the
    CPU: autotuning on for every device, fresh tuners, and a fake timer under
    which each tuning key's configs, timed in order, get decreasing times, so
    the *last* config of every space wins (the interesting case: not the
    default). Yields ``plum_kernels._autotune`` (its ``chosen_configs()``)."""
    import itertools

    import triton

    from plum_kernels import _autotune

    real = triton.autotune

    def autotune(configs, key, **kw):
        times = itertools.cycle(range(len(configs), 0, -1))

        def fake_bench(kernel_call, quantiles):
            kernel_call()
            t = float(next(times))
            return [t, t, t]
        return real(configs=configs, key=key, do_bench=fake_bench, **kw)

    monkeypatch.setattr(_autotune, "autotune_enabled", lambda device: True)
    monkeypatch.setattr(_autotune, "_tuners", {})
    monkeypatch.setattr(triton, "autotune", autotune)
    yield _autotune


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
