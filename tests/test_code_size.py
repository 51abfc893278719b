"""Every Python file of the repository (the packages, benchmarks, tests) stays readable in one sitting:
at most :data:`MAX_FILE_LINES` lines a file and :data:`MAX_FUNCTION_LINES` lines a function (AST)."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


def _python_files() -> list[Path]:
    """The repository's tracked and untracked-but-not-ignored ``.py`` files (every ``.py`` file
    outside hidden folders and ``runs/`` when git is not available)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split()
        return [ROOT / f for f in listed if (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in ROOT.rglob("*.py")
                if not any(part.startswith(".") or part == "runs" for part in p.relative_to(ROOT).parts)]


def test_files_and_functions_are_short():
    files = _python_files()
    assert any(f.name == "test_code_size.py" for f in files)
    long_files, long_functions = [], []
    for path in files:
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long_files, f"files over {MAX_FILE_LINES} lines: {long_files}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"
