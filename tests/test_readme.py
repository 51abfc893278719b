"""The README's Python examples run: every fenced ```python block of README.md is executed on its own,
in a fresh namespace (nothing defined by another block), in a temporary working directory (a block may
write files there), and a block that raises fails the test. The examples build CPU tensors and arrays,
so they run on the CPU on any machine (in this process: each block's imports are then already paid).

A block that must not run here (one that trains, downloads, or needs a GPU) is fenced ```python no-run:
GitHub still highlights it as Python, and this test lists it as skipped. Every other block runs.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python(?P<info>[^\n]*)\n(?P<code>.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def _blocks() -> list[tuple[int, str, bool]]:
    """``(line, code, runs)`` of every ```python block of README.md."""
    text = (ROOT / "README.md").read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append((line, m.group("code"), "no-run" not in m.group("info").split()))
    return out


BLOCKS = _blocks()


def test_the_readme_has_python_examples():
    assert sum(runs for _, _, runs in BLOCKS) >= 2


@pytest.mark.parametrize("line, code, runs", BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_block_runs(line, code, runs, tmp_path, monkeypatch):
    if not runs:
        pytest.skip("fenced ```python no-run")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
