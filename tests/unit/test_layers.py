"""The layers run one way: cli -> pipelines -> {beit_data, beit_model} -> beit_common."""

import ast
from pathlib import Path

import pytest
from helpers import REPO

# What each part may import of the project.
ALLOWED = {
    "beit_common": set(),
    "beit_data": {"beit_common"},
    "beit_model": {"beit_common"},
    "pipelines": {"beit_common", "beit_data", "beit_model"},
}
PARTS = {"beit_common", "beit_data", "beit_model", "pipelines", "cli"}


def project_imports(path: Path) -> set[str]:
    """The project parts a module imports, at any depth of its code (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & PARTS


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_the_layers_below_it(part):
    offenders = {}
    for path in sorted((REPO / part).rglob("*.py")):
        wrong = project_imports(path) - ALLOWED[part] - {part}
        if wrong:
            offenders[str(path.relative_to(REPO))] = sorted(wrong)
    assert offenders == {}


def test_no_module_shadows_the_standard_library():
    import sys

    names = {p.stem for part in ("beit_common", "beit_data", "beit_model", "pipelines", "benchmarks")
             for p in (REPO / part).glob("*.py")}
    assert names & set(sys.stdlib_module_names) == set()


CODE = ("beit_common", "beit_data", "beit_model", "pipelines", "cli", "benchmarks")


def test_a_long_function_says_why_it_is_long():
    """A module is as long as its idea, so modules have no limit; a function over 80 lines must
    carry a docstring that gives its reason."""
    unexplained = {}
    for part in CODE:
        for path in sorted((REPO / part).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                        node.end_lineno - node.lineno + 1 > 80 and not ast.get_docstring(node):
                    unexplained[f"{path.relative_to(REPO)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert unexplained == {}


def test_every_module_says_what_it_is_for():
    missing = [str(p.relative_to(REPO)) for part in CODE for p in sorted((REPO / part).rglob("*.py"))
               if p.read_text().strip() and ast.get_docstring(ast.parse(p.read_text())) is None]
    assert missing == []
