"""The installed distribution: import names that clash with no package of the
field, and a package list that matches the folders.

The folders keep the project's layout (``kernels/``, ``plum/``) and install
as ``plum_kernels`` and ``plumrec``: Hugging Face's kernel hub installs a
top-level ``kernels`` (transformers imports it when present) and
plum-dispatch a top-level ``plum``, so installing either beside a package that
also claimed those names would break one of the two.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"plum_kernels": "kernels", "plumrec": "plum"}
TAKEN_ELSEWHERE = {"kernels": "Hugging Face kernels", "plum": "plum-dispatch"}


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
