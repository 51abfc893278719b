"""The import graph of ``plum_kernels`` and ``plumrec``, read from the source (AST): imports at module
level and inside functions, relative imports resolved, ``importlib.import_module("...")`` with a
constant name counted as an import.

- no cycle among the modules;
- no function-level import of the package's own modules, except the kernels' backends that
  ``plum_kernels.torch`` / ``plum_kernels.jax`` load on first use (importing ``plum_kernels.torch``
  must not import triton): :data:`LAZY_BACKENDS`;
- ``plum_kernels`` never imports ``plumrec``, and the parts of ``plumrec`` form the layers of
  :data:`LAYERS`: every import points to a lower layer, so the pipeline and the CLI are on top and
  training, retrieval and the baselines, side by side, never import each other. Maximum-entropy
  exploration (``plumrec.explore``) sits beside ``plumrec.sequences``: it reads the trie, the metrics and
  the kernels, and retrieval builds on it.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"plum_kernels": ROOT / "kernels", "plumrec": ROOT / "plum"}

# (importing module, imported module): the only function-level imports of the packages' own modules
LAZY_BACKENDS = {
    ("plum_kernels.attention.ops_torch", "plum_kernels.attention.triton_fwd"),
    ("plum_kernels.attention.ops_torch", "plum_kernels.attention.triton_bwd"),
    ("plum_kernels.attention.ops_torch", "plum_kernels.attention.triton_decode"),
    ("plum_kernels.beam.ops_torch", "plum_kernels.beam.triton"),
    ("plum_kernels.beam.ops_jax", "plum_kernels.beam.pallas"),
    ("plum_kernels.moe.ops_torch", "plum_kernels.moe.triton_gmm"),
    ("plum_kernels.moe.ops_torch", "plum_kernels.moe.triton_permute"),
    ("plum_kernels.moe.ops_torch", "plum_kernels.moe.triton_route"),
    ("plumrec.pipeline.demo", "plumrec.pipeline.jax_stages"),  # the JAX backend: a torch install has no jax
}

# The parts of plumrec (a subpackage or a top-level module), lowest first; a part imports only parts of
# lower layers.
LAYERS = (
    {"plumrec.io"},
    {"plumrec.data", "plumrec.sid", "plumrec.model", "plumrec.metrics"},
    {"plumrec.sequences", "plumrec.explore"},
    {"plumrec.train", "plumrec.retrieval", "plumrec.baselines"},
    {"plumrec.jax"},
    {"plumrec.pipeline"},
    {"plumrec.cli"},
)


def _modules() -> dict[str, Path]:
    """Every module of both packages: dotted name -> file."""
    out = {}
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((name, *parts))] = path
    return out


MODULES = _modules()


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The modules of ours an import node (or ``importlib.import_module`` call) loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module
        names = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
          and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        names = [node.args[0].value]
    else:
        return []
    return sorted({n for n in names if n in MODULES and n != module})


def _imports() -> list[tuple[str, str, bool]]:
    """``(importer, imported, inside a function)`` for every import of our modules."""
    edges = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        in_function = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                in_function.update(id(n) for n in ast.walk(fn) if n is not fn)
        for node in ast.walk(tree):
            for target in _targets(node, module, is_package):
                edges.append((module, target, id(node) in in_function))
    return edges


EDGES = _imports()


def _part(module: str) -> str:
    """The part of plumrec a module belongs to: ``plumrec.train`` for ``plumrec.train.loop``."""
    return ".".join(module.split(".")[:2])


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (as its nodes, first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_graph_is_read():
    assert {"plumrec.pipeline.run", "plumrec.train.loop", "plum_kernels.torch"} <= MODULES.keys()
    assert ("plumrec.pipeline.stages", "plumrec.train.loop", False) in EDGES
    assert ("plum_kernels.beam.ops_torch", "plum_kernels.beam.triton", True) in EDGES  # relative, in a function


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for a, b, _ in EDGES:
        graph.setdefault(a, set()).add(b)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_function_level_imports_are_only_the_lazy_kernel_backends():
    lazy = {(a, b) for a, b, in_function in EDGES if in_function}
    assert lazy <= LAZY_BACKENDS, sorted(lazy - LAZY_BACKENDS)
    assert not [(a, b) for a, b, in_function in EDGES if not in_function and (a, b) in LAZY_BACKENDS]


def test_kernels_never_import_the_model_layer():
    assert not [(a, b) for a, b, _ in EDGES if a.startswith("plum_kernels") and b.startswith("plumrec")]


def test_plumrec_parts_form_layers():
    layer = {part: i for i, parts in enumerate(LAYERS) for part in parts}
    parts = {_part(m) for m in MODULES if m.startswith("plumrec.")}
    assert parts == set(layer), f"place every part of plumrec in LAYERS: {sorted(parts ^ set(layer))}"
    upward = sorted({(_part(a), _part(b)) for a, b, _ in EDGES if a.startswith("plumrec.") and b.startswith("plumrec.")
                     and _part(a) != _part(b) and layer[_part(a)] <= layer[_part(b)]})
    assert not upward, f"imports that do not point to a lower layer: {upward}"
    graph: dict[str, set[str]] = {}
    for a, b, _ in EDGES:
        if a.startswith("plumrec.") and b.startswith("plumrec.") and _part(a) != _part(b):
            graph.setdefault(_part(a), set()).add(_part(b))
    assert _cycle(graph) is None


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_importing_the_torch_ops_does_not_import_triton():
    done = _run("import sys, plum_kernels.torch; print('triton' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_missing_trie_extension_is_named():
    """A checkout whose C++ extension is not built says so (not a circular-import message)."""
    done = _run("import sys; sys.modules['plumrec.sid._sid_trie'] = None; import plumrec.sid")
    assert done.returncode != 0
    assert "the C++ extension plumrec.sid._sid_trie" in done.stderr and "pip install -e ." in done.stderr
    assert "circular" not in done.stderr
