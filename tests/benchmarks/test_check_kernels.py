"""benchmarks/check_kernels.py: every Triton op against its float64 reference (here in --smoke mode,
through the Triton interpreter; on a GPU machine at full size)."""
import importlib.util
import json
import pathlib

import pytest
import torch


def _check_kernels():
    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "check_kernels.py"
    spec = importlib.util.spec_from_file_location("check_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_checks_every_op_family_and_passes(tmp_path):
    report = _check_kernels().main(["--smoke", "--out", str(tmp_path / "c.json")])
    assert report["ok"] and json.loads((tmp_path / "c.json").read_text()) == report
    families = {r["case"].split()[0] for r in report["cases"]}
    assert families == {"history_attention", "beam_decode_attention", "moe_mlp", "constrained_beam_search"}
    for r in report["cases"]:
        errs = [v for k, v in r.items() if k in ("out", "dq", "dk", "dv", "dx", "dlogits", "dw_gate_up", "dw_down",
                                                    "scores")]
        assert errs and all(0 <= e <= r["budget"] for e in errs), r


def test_a_wrong_kernel_is_reported_and_the_other_cases_still_run(tmp_path, monkeypatch):
    import plum_kernels.torch as K

    mlp = K.moe_mlp

    def off_by_a_bit(*a, impl=None, **kw):
        o = mlp(*a, impl=impl, **kw)
        return o._replace(out=o.out * 1.05) if impl == "triton" else o

    monkeypatch.setattr(K, "moe_mlp", off_by_a_bit)
    search = K.constrained_beam_search
    monkeypatch.setattr(K, "constrained_beam_search", lambda *a, impl=None, **kw: (
        lambda c, s: (c.flip(1), s) if impl == "triton" else (c, s))(*search(*a, impl=impl, **kw)))
    report = _check_kernels().main(["--smoke", "--out", str(tmp_path / "c.json")])
    assert not report["ok"]
    bad = {r["case"].split()[0] for r in report["cases"] if not r["ok"]}
    assert bad == {"moe_mlp", "constrained_beam_search"}
    assert all(r["out"] > 0.04 for r in report["cases"] if r["case"].startswith("moe_mlp"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_full_size_needs_a_gpu():
    with pytest.raises(SystemExit):
        _check_kernels().main([])
