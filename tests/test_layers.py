"""The layers run one way: cli -> pipelines -> {beit_data, beit_model} -> beit_common."""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

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
