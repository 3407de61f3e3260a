"""The layers run one way: cli -> pipelines -> {beit_data, beit_model} -> beit_common; no modules
import each other, and no stage imports another. The graph is ``benchmarks.layers``'s, the map
``python -m benchmarks.layers`` prints."""

import ast
import re
import sys

import pytest
from helpers import REPO

from benchmarks.layers import (
    ALLOWED,
    LONG_FUNCTION,
    PARTS,
    functions,
    import_circles,
    import_graph,
    modules,
    stage_imports,
    stages,
    upward_imports,
)

CODE = (*PARTS, "benchmarks")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(REPO, CODE)


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_the_layers_below_it(part, graph):
    assert {m: wrong for m, wrong in upward_imports(graph).items() if m.split(".")[0] == part} == {}


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from pkg import a\n")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (tmp_path / "pkg" / "b.py").write_text("from . import a\nfrom .a import f\nimport pkg.a as alias\ng = 1\n")
    (tmp_path / "top.py").write_text("import pkg.b\nfrom pkg import name_of_init\n")
    found = import_graph(tmp_path, ("pkg", "top"))
    assert found == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "top": {"pkg.b", "pkg"}}
    assert import_circles(found) == [["pkg.a", "pkg.b"]]
    assert upward_imports({"beit_data.x": {"beit_common", "beit_model.y"}, "cli": {"pipelines.z"},
                           "benchmarks.x": {"cli"}}) == {"beit_data.x": ["beit_model.y"]}


def test_no_modules_import_each_other(graph):
    """A circle, even through a lazy import, is two modules cut where they should be one, or one
    that calls up into its caller."""
    assert import_circles(graph) == []


def test_no_stage_imports_another(graph):
    assert {"pipelines.pretrain", "pipelines.tokenize_shards", "pipelines.probe"} <= stages(REPO)
    assert stage_imports(graph, REPO) == {}


def test_the_command_line_is_one_module():
    assert (REPO / "cli.py").is_file() and not (REPO / "cli").exists()


def test_no_module_shadows_the_standard_library():
    names = {name.split(".")[-1] for name in modules(REPO, CODE)}
    assert names & set(sys.stdlib_module_names) == set()


def test_a_long_function_says_why_it_is_long():
    """A module is as long as its idea, so modules have no limit; a function over 80 lines must
    carry a docstring that gives its reason."""
    unexplained = {f["function"]: f["lines"] for f in functions(REPO, CODE)
                   if f["lines"] > LONG_FUNCTION and not f["docstring"]}
    assert unexplained == {}


def test_every_module_says_what_it_is_for():
    missing = [name for name, path in modules(REPO, CODE).items()
               if path.read_text().strip() and ast.get_docstring(ast.parse(path.read_text())) is None]
    assert missing == []


# The keys of a token file's metadata: ``beit_data.tokens`` reads them (``TokenMeta``), every other module
# its attributes.
META_KEYS = {"format_version", "tokenizer", "views", "decoder", "min_size", "source", "shard", "rejects",
             "tool_version"}


def meta_key_reads(source: str) -> list[str]:
    """Where code reads a token-metadata key by name from something named as metadata or a
    footer: ``meta["views"]``, ``self.meta.get("shard")``, ``metas[0]["tokenizer"]``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript):
            base, key = node.value, node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and node.args:
            base, key = node.func.value, node.args[0]
        else:
            continue
        if isinstance(key, ast.Constant) and key.value in META_KEYS and re.search("meta|footer", ast.unparse(base),
                                                                                 re.IGNORECASE):
            found.append((node.lineno, f"line {node.lineno}: {ast.unparse(base)} {key.value!r}"))
    return [where for _, where in sorted(found)]


def test_only_the_token_format_reads_its_metadata_by_key():
    """``TokenMeta`` is the metadata's one reading: a module that picks its keys by name holds a
    second copy of the format."""
    assert meta_key_reads('g = stream.meta["tokenizer"]["grid"]\ns = meta.get("shard")\nv = metas[0]["views"]\n'
                          'r = row["views"]\nc = meta["class"]\n') == [
        "line 1: stream.meta 'tokenizer'", "line 2: meta 'shard'", "line 3: metas[0] 'views'"]
    found = {name: reads for name, path in modules(REPO, CODE).items()
             if name != "beit_data.tokens" and (reads := meta_key_reads(path.read_text()))}
    assert found == {}
