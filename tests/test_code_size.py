"""Every Python file of the repository (the packages, benchmarks, tests) stays readable in one sitting:
at most :data:`MAX_FILE_LINES` lines a file and :data:`MAX_FUNCTION_LINES` lines a function (AST); and the
package code tells no history of runs or results (:data:`NARRATION`)."""
from __future__ import annotations

import ast
import re
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


# A result's history belongs in docs/experiments/ and its figure in benchmarks/RESULTS.md, not in the code:
# no "twenty-fifth run", "run 14", "seed 2 gains", "(RESULTS.md, ...)" in a docstring, comment or help string.
ORDINAL = (r"(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|[a-z]+teenth"
           r"|twentieth|thirtieth|(?:twenty|thirty)[ -](?:first|second|third|[a-z]+th))")
NARRATION = re.compile(rf"\b(?:{ORDINAL}[ -]run\b|run (?:#\s*)?\d+\b"
                       r"|seeds? \d[\d, /and]* (?:gain|lose|loses|lost|won|beat))", re.IGNORECASE)


def test_code_does_not_narrate_runs_or_results():
    """Package and kernel code (``plum/``, ``kernels/``, ``csrc/``) names no run, no seed's result and no
    RESULTS.md (the benchmark that writes RESULTS.md's device section is a benchmark, not package code)."""
    files = [p for p in _python_files() if p.relative_to(ROOT).parts[0] in ("plum", "kernels")]
    files += sorted((ROOT / "csrc").glob("*.[ch]pp"))
    hits = []
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if NARRATION.search(line) or "RESULTS.md" in line:
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, "code narrates runs or results:\n" + "\n".join(hits)
