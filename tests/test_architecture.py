"""The import rule of docs/ARCHITECTURE.md, enforced: no import circle between files or between top-level rooms of
src/clipslim, and no module imports from a layer above its own. Every import counts, deferred ones included."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "clipslim"

# Top-level rooms, top layer first. A room may import rooms of its own layer (without a circle) and any layer below.
LAYERS: list[tuple[str, ...]] = [
    ("cli", "commands"),
    ("workflows",),
    ("train",),
    ("inherit", "tokens", "proto", "objectives", "slimmable", "prompt", "distiller", "recipe"),
    ("eval", "data", "deploy", "distributed"),
    ("outputs", "registry", "models", "io", "config", "export", "plots", "hooks", "attention"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_pkg else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    names = [f"{base}.{a.name}" for a in node.names]
    return [base, *names]


def import_graph() -> dict[str, set[str]]:
    """module -> the clipslim modules it imports (anywhere in the file)."""
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = _resolve(module, is_pkg, node)
            for target in targets:
                if target in files and target != module:
                    graph[module].add(target)
        graph.setdefault(module, set())
    return graph


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _rank(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"room '{name}' is in no layer of tests/test_architecture.py (add it)")


def _room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = defaultdict(set)
    for src, dsts in graph.items():
        for dst in dsts:
            if room(src) != room(dst) and "__init__" not in (room(src), room(dst)):
                rooms[room(src)].add(room(dst))
    return rooms


def test_no_import_circle_between_files():
    assert _cycles(import_graph()) == []


def test_no_import_circle_between_rooms():
    assert _cycles(_room_graph(import_graph())) == []


def test_imports_point_down_the_layers():
    upward = sorted(
        f"{src} -> {dst}"
        for src, dsts in import_graph().items()
        for dst in dsts
        if "__init__" not in (room(src), room(dst)) and _rank(room(dst)) < _rank(room(src))
    )
    assert upward == []


@pytest.mark.parametrize("rooms", LAYERS)
def test_every_room_is_placed(rooms):
    present = {room(m) for m in import_graph()} - {"__init__"}
    assert present <= {r for layer in LAYERS for r in layer}, present - {r for layer in LAYERS for r in layer}


def _loaded_after(code: str) -> set[str]:
    import subprocess
    import sys

    probe = f"{code}\nimport sys; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_core_imports_load_no_optional_library():
    """faiss, sentence-transformers, onnx/onnxruntime and matplotlib are extras, imported where used. (transformers is
    an extra too, but open_clip 3.3.0 imports it itself whenever it is installed, as in this venv.)"""
    loaded = _loaded_after("import clipslim, clipslim.objectives, clipslim.distiller, clipslim.recipe")
    heavy = {"faiss", "sentence_transformers", "onnx", "onnxruntime", "onnxscript", "matplotlib"}
    assert loaded & heavy == set()
    assert "torch" in loaded and "open_clip" in loaded


def test_cli_help_loads_no_torch():
    loaded = _loaded_after(
        "import contextlib, io\nfrom clipslim.cli import _parser\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    _parser().parse_args(['--help'])"
    )
    assert "torch" not in loaded and "open_clip" not in loaded


def test_objective_table_names_every_registered_objective():
    """The name -> module table (known before import) and the @register decorators (the definitions) agree."""
    import importlib
    import re

    from clipslim.registry import OBJECTIVE_MODULES, OBJECTIVES

    defined = {}
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for name in re.findall(
            r'@register\s*\nclass \w+\([^)]*\):\s*\n(?:\s*""".*?"""\s*\n)?\s*name(?:: ClassVar\[str\])? = "(\w+)"',
            text,
            re.S,
        ):
            defined[name] = _module_name(path)
    assert defined == OBJECTIVE_MODULES
    for module in OBJECTIVE_MODULES.values():
        importlib.import_module(module)
    assert set(OBJECTIVE_MODULES) <= set(OBJECTIVES)
