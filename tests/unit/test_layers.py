"""The layers run one way: cli -> pipelines -> {beit_data, beit_model} -> beit_common; no modules
import each other, and no stage imports another. The graph is ``benchmarks.layers``'s, the map
``python -m benchmarks.layers`` prints. Locations are one kind of value: ``beit_common`` alone
knows their kinds, and the code below the command line and the configs takes ``Location``."""

import ast
import re
import sys
from pathlib import Path

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


SCHEME_WORDS = ("s3", "gs", "gcs", "http", "https", "file", "pipe")
KIND_WORDS = {"local", "url", "pipe"}


def _names_a_kind(node: ast.AST) -> bool:
    """A string constant that names a location's kind or scheme: ``"pipe"``, ``"s3://"``, ``"pipe:"``."""
    values = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return any(isinstance(v, ast.Constant) and isinstance(v.value, str) and (
        v.value in KIND_WORDS or v.value.rstrip(":/") in SCHEME_WORDS or "://" in v.value) for v in values)


def kind_questions(root: Path = REPO, parts: tuple[str, ...] = CODE) -> list[str]:
    """``module:line`` of each place outside ``beit_common`` that asks which kind a location is:
    ``.is_local`` or ``.scheme``, ``.kind`` compared with a kind, or a string tested for a scheme
    (``x.startswith("s3")``, ``x.partition("://")``)."""
    found = []
    for name, path in modules(root, parts).items():
        if name.split(".")[0] == "beit_common":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            asks = isinstance(node, ast.Attribute) and node.attr in ("is_local", "scheme") or \
                isinstance(node, ast.Compare) and any(
                    isinstance(x, ast.Attribute) and x.attr == "kind" for x in (node.left, *node.comparators)) and \
                any(_names_a_kind(x) for x in (node.left, *node.comparators)) or \
                isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("startswith", "partition", "split", "rpartition") and \
                any(_names_a_kind(a) for a in node.args)
            if asks:
                found.append(f"{name}:{node.lineno}")
    return sorted(set(found))


def test_only_beit_common_asks_which_kind_a_location_is():
    """What differs between a local path, a URL and a ``pipe:`` command is answered in
    ``beit_common`` (``local_path``, ``seekable``, ``sibling``...): elsewhere a new kind would
    be a hunt for every place that asks."""
    assert kind_questions() == []


def test_the_kind_scan_finds_each_way_of_asking(tmp_path):
    (tmp_path / "pkg").mkdir()
    lines = ["a.is_local", "a.kind == 'pipe'", "'url' != b.kind", "a.kind in ('local', 'url')", "a.scheme",
             "str(a).startswith('s3://')", "a.partition('://')", "a.startswith('pipe:')", "t.kind == 'vqkd'",
             "k.startswith('beit')", "x.kind"]
    (tmp_path / "pkg" / "__init__.py").write_text("\n".join(lines) + "\n")
    (tmp_path / "beit_common").mkdir()
    (tmp_path / "beit_common" / "__init__.py").write_text("a.is_local\n")
    assert kind_questions(tmp_path, ("pkg", "beit_common")) == [f"pkg:{i}" for i in range(1, 9)]


# An annotation that takes a path as a plain string or ``os.PathLike``: a location not yet resolved.
UNRESOLVED = re.compile(r"PathLike|\bstr \| Path\b|\bPath \| str\b")


def unresolved_parameters(root: Path = REPO, parts: tuple[str, ...] = ("beit_data", "pipelines")) -> list[str]:
    """``module.function(parameter)`` of each public function or method (of a class that is not a
    ``*Config``, which are the boundary) whose parameter is annotated as a string or a path."""
    found = []
    for name, path in modules(root, parts).items():
        tree = ast.parse(path.read_text(), str(path))
        scopes = [("", tree)] + [(f"{c.name}.", c) for c in tree.body
                                 if isinstance(c, ast.ClassDef) and not c.name.startswith("_")
                                 and not c.name.endswith("Config")]
        for prefix, scope in scopes:
            for f in scope.body:
                if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) or \
                        f.name.startswith("_") and f.name != "__init__":
                    continue
                args = f.args
                for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg):
                    if a is not None and a.annotation is not None and UNRESOLVED.search(ast.unparse(a.annotation)):
                        found.append(f"{name}.{prefix}{f.name}({a.arg})")
    return sorted(found)


def test_functions_below_the_boundary_take_locations():
    """The command line and the configs turn what a user typed into ``Location`` once; every
    public function below them takes one, and none wraps a string again."""
    assert unresolved_parameters() == []


def test_the_parameter_scan_reads_every_annotation(tmp_path):
    (tmp_path / "beit_data").mkdir()
    (tmp_path / "beit_data" / "m.py").write_text(
        "def f(a: str | os.PathLike, *, b: Sequence[str | os.PathLike] = (), c: Location = None): ...\n"
        "def g(p: str | Path | None): ...\n"
        "def _private(a: str | os.PathLike): ...\n"
        "class C:\n    def __init__(self, a: os.PathLike): ...\n    def m(self, a: Location): ...\n"
        "class SomeConfig:\n    def __init__(self, out: str | os.PathLike): ...\n")
    assert unresolved_parameters(tmp_path, ("beit_data",)) == [
        "beit_data.m.C.__init__(a)", "beit_data.m.f(a)", "beit_data.m.f(b)", "beit_data.m.g(p)"]
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
