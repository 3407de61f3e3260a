"""A map of the code: its modules, their import graph, the layers it crosses and its longest functions.

The graph is read from the source (``ast``), with every import counted wherever it sits, inside a
function too: a lazy import still ties two modules together. ``tests/unit/test_layers.py`` holds
the code to this map (no circles, nothing upward, no stage importing another); this script
prints it as one JSON object.

    python -m benchmarks.layers
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYERS = "cli -> pipelines -> {beit_data, beit_model} -> beit_common"
PARTS = ("cli", "pipelines", "beit_data", "beit_model", "beit_common")  # top to bottom
# What each part may import of the project, besides itself.
ALLOWED = {
    "beit_common": set(),
    "beit_data": {"beit_common"},
    "beit_model": {"beit_common"},
    "pipelines": {"beit_common", "beit_data", "beit_model"},
    "cli": {"beit_common", "beit_data", "beit_model", "pipelines"},
}
LONG_FUNCTION = 80  # lines; a longer function says why in its docstring


def modules(root: Path = REPO, parts: tuple[str, ...] = PARTS) -> dict[str, Path]:
    """Each module of ``parts`` by its dotted name: a package's files, or a top-level ``part.py``."""
    found = {}
    for part in parts:
        if (root / f"{part}.py").is_file():
            found[part] = root / f"{part}.py"
        for path in sorted((root / part).rglob("*.py")) if (root / part).is_dir() else []:
            dotted = path.relative_to(root).with_suffix("").parts
            found[".".join(dotted[:-1] if dotted[-1] == "__init__" else dotted)] = path
    return found


def _targets(node: ast.Import | ast.ImportFrom, name: str, is_package: bool, known: dict) -> set[str]:
    """The project modules one import statement loads: ``import a.b`` and ``from a import b`` load
    ``a.b`` where it is a module, and ``a`` where ``b`` is a name it defines."""
    if isinstance(node, ast.Import):
        wanted = [alias.name for alias in node.names]
    else:
        if node.level:  # relative: from the module's package, up ``level - 1`` more
            package = name.split(".") if is_package else name.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        wanted = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    found = set()
    for target in wanted:
        while target and target not in known:  # ``import a.b.c`` of a name: its deepest module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def import_graph(root: Path = REPO, parts: tuple[str, ...] = PARTS) -> dict[str, set[str]]:
    """Which project modules each module imports, at any depth of its code."""
    known = modules(root, parts)
    graph = {}
    for name, path in known.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name] |= _targets(node, name, path.name == "__init__.py", known)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(circles)


def part_of(module: str) -> str:
    return module.split(".")[0]


def upward_imports(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Each module's imports of a part its layer may not use (``ALLOWED``); modules outside the
    layers (the benchmarks) may use them all."""
    upward = {}
    for module, targets in sorted(graph.items()):
        if part_of(module) not in ALLOWED:
            continue
        allowed = ALLOWED[part_of(module)] | {part_of(module)}
        wrong = sorted(t for t in targets if part_of(t) not in allowed)
        if wrong:
            upward[module] = wrong
    return upward


def stages(root: Path = REPO) -> set[str]:
    """The modules of ``pipelines`` that hold a stage: those whose ``run_*`` a command calls."""
    held = set()
    for path in modules(root, ("cli",)).values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipelines.") and \
                    any(alias.name.startswith("run_") for alias in node.names):
                held.add(node.module)
    return held


def stage_imports(graph: dict[str, set[str]], root: Path = REPO) -> dict[str, list[str]]:
    """Each stage's imports of another stage."""
    held = stages(root)
    return {s: sorted(graph[s] & held) for s in sorted(held) if graph[s] & held}


def functions(root: Path = REPO, parts: tuple[str, ...] = PARTS) -> list[dict]:
    """Every function and method: where it is, its lines and whether it has a docstring."""
    found = []
    for path in modules(root, parts).values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append({"function": f"{path.relative_to(root)}:{node.name}",
                              "lines": node.end_lineno - node.lineno + 1, "docstring": bool(ast.get_docstring(node))})
    return found


def layer_map(root: Path = REPO) -> dict:
    graph = import_graph(root)
    return {
        "layers": LAYERS,
        "modules": {name: len(path.read_text().splitlines()) for name, path in modules(root).items()},
        "import_circles": import_circles(graph),
        "upward_imports": upward_imports(graph),
        "stage_imports": stage_imports(graph, root),
        "longest_functions": sorted(functions(root), key=lambda f: -f["lines"])[:10],
    }


if __name__ == "__main__":
    print(json.dumps(layer_map(), indent=1))
