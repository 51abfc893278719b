"""The explicit ``impl=`` / ``interpret=`` choice every op family shares (plum_kernels._dispatch)."""
from __future__ import annotations

import pytest
import torch

from plum_kernels._dispatch import resolve_interpret, resolve_jax_impl, resolve_torch_impl


def test_torch_default_follows_the_device():
    assert resolve_torch_impl(None, torch.device("cpu")) == "reference"
    assert resolve_torch_impl(None, torch.device("cuda", 0)) == "triton"
    assert resolve_torch_impl("triton", torch.device("cpu")) == "triton"  # explicit wins (the interpreter)


def test_jax_default_on_a_cpu_backend():
    assert resolve_jax_impl(None) == "reference"
    assert resolve_jax_impl("pallas") == "pallas"
    assert resolve_interpret(None) is True and resolve_interpret(False) is False


@pytest.mark.parametrize("resolve, bad", [(lambda i: resolve_torch_impl(i, "cpu"), "pallas"),
                                          (resolve_jax_impl, "triton"), (resolve_jax_impl, "")])
def test_unknown_impl_names_the_argument(resolve, bad):
    with pytest.raises(ValueError, match="impl must be None or one of"):
        resolve(bad)
