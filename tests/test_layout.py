"""The test tree mirrors the source tree, so a newcomer finds a module's tests from its path:

- a module ``kernels/<family>/<name>.py``, ``plum/<pkg>/<name>.py`` or ``benchmarks/<name>.py`` is tested in
  ``tests/kernels/<family>/``, ``tests/plum/<pkg>/``, ``tests/benchmarks/`` (one file per op of a kernel
  family, covering every implementation of that op; one file per module elsewhere, ``test_<name>.py``);
- ahead-of-time builds (sm_90 through ``compile_checks``, TPU lowering through Mosaic) live only in
  ``tests/kernels/<family>/test_aot.py`` (and, for the JAX model twin, ``tests/plum/jax/test_aot.py``);
- helpers and oracles live in ``tests/support/`` (on the import path), never beside the tests.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
SOURCE_ROOTS = ("kernels", "plum", "benchmarks")
# Repository-level checks (packaging, the README's examples, layout, code size, import graph, the compile tool itself).
TOP_LEVEL = {"conftest.py", "test_code_size.py", "test_import_graph.py", "test_layout.py", "test_packaging.py",
             "test_readme.py", "test_toolchain.py"}


def _source_modules():
    for top in SOURCE_ROOTS:
        for path in (ROOT / top).rglob("*.py"):
            if path.name != "__init__.py" and "__pycache__" not in path.parts:
                yield path.relative_to(ROOT)


def test_every_source_folder_has_its_test_folder():
    missing = sorted({str(m.parent) for m in _source_modules()
                      if not list((TESTS / m.parent).glob("test_*.py"))})
    assert not missing, f"source folders without tests/<folder>/test_*.py: {missing}"


def test_every_test_folder_mirrors_a_source_folder():
    strays = []
    for path in TESTS.rglob("*.py"):
        rel = path.relative_to(TESTS)
        if rel.parts[0] == "support" or "__pycache__" in rel.parts:
            continue
        if len(rel.parts) == 1:
            if rel.name not in TOP_LEVEL:
                strays.append(str(rel))
        elif not path.name.startswith("test_") or not (ROOT / rel.parent).is_dir():
            strays.append(str(rel))
    assert not strays, f"test files outside the mirrored tree (or helpers outside tests/support): {strays}"


def test_ahead_of_time_checks_live_in_test_aot():
    pattern = re.compile(r"\b(check_facts|lower_for_tpu|compile_in_clean_process)\(")
    elsewhere = [str(p.relative_to(TESTS)) for p in TESTS.rglob("test_*.py")
                 if p.name not in ("test_aot.py", "test_toolchain.py") and pattern.search(p.read_text())]
    assert not elsewhere, f"ahead-of-time builds outside a test_aot.py: {elsewhere}"
