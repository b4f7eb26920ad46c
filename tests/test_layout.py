"""The repository's shape: import direction between layers, module docstrings, the README tree.

Everything here reads source with ``ast``; nothing under ``lmforge/`` is imported, so a layering
mistake is reported even when the offending module would fail to import. The rules come from
ARCHITECTURE.md: ``config``, ``errors``, ``protocol`` <- ``models`` <- ``engine`` <- ``server`` <-
``cli``, and the CPU bookkeeping modules of ``engine`` never import torch.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lmforge"

_LOWER = ("lmforge.models", "lmforge.engine", "lmforge.jobs", "lmforge.server", "lmforge.cli")

# (module path prefix relative to the repo root, imports it must not make). A prefix ending in "/"
# covers a whole subpackage. Imports under `if TYPE_CHECKING:` count too: the layering is about
# what a module knows, not only about what runs.
LAYER_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("lmforge/config.py", _LOWER),
    ("lmforge/errors.py", _LOWER),
    ("lmforge/protocol/", _LOWER),
    ("lmforge/models/", ("lmforge.engine", "lmforge.jobs", "lmforge.server", "lmforge.cli")),
    ("lmforge/engine/", ("lmforge.jobs", "lmforge.server", "lmforge.cli")),
    # the batch worker drives the server's app as an ASGI callable it is handed, never imports it
    ("lmforge/jobs/", ("lmforge.server", "lmforge.cli")),
    ("lmforge/server/", ("lmforge.cli",)),
    # scale-out composes the layers below it on Ray; only the CLI sits above
    ("lmforge/cluster/", ("lmforge.cli",)),
    # training runs the models it is handed or loads; the jobs worker calls it, never the reverse
    ("lmforge/training/", ("lmforge.server", "lmforge.jobs", "lmforge.cli")),
    # the preference pipeline is a client of OpenAI endpoints: no engine, no model, no torch
    ("lmforge/preference/", ("lmforge.models", "lmforge.engine", "lmforge.jobs",
                             "lmforge.server", "lmforge.cli", "torch")),
    ("lmforge/engine/block_manager.py", ("torch",)),
    ("lmforge/engine/scheduler.py", ("torch",)),
    ("lmforge/engine/request.py", ("torch",)),
]


def package_files() -> list[str]:
    """Every ``.py`` file under ``lmforge/``, as a repo-relative POSIX path, sorted."""
    return sorted(
        p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts
    )


def imported_modules(path: str, source: str | None = None) -> set[str]:
    """Absolute dotted names that the module at ``path`` imports, relative imports resolved.

    ``from lmforge import cli`` yields both ``lmforge`` and ``lmforge.cli``, because the imported
    name may be a submodule; ``from .scheduler import X`` in ``lmforge/engine/llm_engine.py`` yields
    ``lmforge.engine.scheduler`` and ``lmforge.engine.scheduler.X``. ``source`` defaults to the
    file's text.
    """
    parts = Path(path).with_suffix("").parts
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = tuple(p for p in package if p != "__init__")
    names: set[str] = set()
    if source is None:
        source = (ROOT / path).read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join((*base, *(node.module.split(".") if node.module else ())))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _rule_applies(prefix: str, path: str) -> bool:
    return path == prefix or (prefix.endswith("/") and path.startswith(prefix))


def forbidden_imports(path: str, rules: list[tuple[str, tuple[str, ...]]] = LAYER_RULES) -> list[str]:
    """The imports of ``path`` that ``rules`` forbid, as ``"name (forbidden: prefix)"``."""
    banned = [b for prefix, bans in rules if _rule_applies(prefix, path) for b in bans]
    return sorted(
        f"{name} (forbidden: {b})"
        for name in imported_modules(path)
        for b in banned
        if name == b or name.startswith(b + ".")
    )


def readme_tree_files(readme: str) -> set[str]:
    """The ``.py`` paths that the README's layout block lists under ``lmforge/``.

    The block is the fenced code block whose first line is ``lmforge/``; each entry is the first
    word of a line, indented two spaces per level, and a name ending in ``/`` opens a directory.
    """
    blocks = re.findall(r"```[^\n]*\n(lmforge/\n.*?)```", readme, flags=re.S)
    if not blocks:
        raise AssertionError("README.md has no layout code block starting with a line 'lmforge/'")
    files: set[str] = set()
    stack: list[str] = []
    for line in blocks[0].splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        if not (name.endswith("/") or name.endswith(".py")):
            continue  # a wrapped description line
        del stack[depth:]
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
        else:
            files.add("/".join((*stack, name)))
    return {f for f in files if f.startswith("lmforge/")}


def test_self_check_helpers() -> None:
    """The helpers above find what they must, so the real checks below cannot pass vacuously."""
    assert "lmforge/config.py" in package_files()
    tree = readme_tree_files("```\nlmforge/\n  a.py   x\n  sub/\n    b.py  y\n  c.py\nother/\n  d.py\n```")
    assert tree == {"lmforge/a.py", "lmforge/sub/b.py", "lmforge/c.py"}
    assert forbidden_imports("tests/test_layout.py") == []
    rules = [("tests/", ("pytest", "ast.foo"))]
    assert forbidden_imports("tests/test_layout.py", rules) == ["pytest (forbidden: pytest)"]
    source = "from .scheduler import Scheduler\nfrom .. import cli\nimport torch.nn as nn\n"
    assert imported_modules("lmforge/engine/llm_engine.py", source) == {
        "lmforge.engine.scheduler", "lmforge.engine.scheduler.Scheduler", "lmforge", "lmforge.cli",
        "torch.nn",
    }
    assert "lmforge.engine.x" in imported_modules("lmforge/engine/__init__.py", "from . import x")


@pytest.mark.parametrize("path", package_files())
def test_import_direction(path: str) -> None:
    bad = forbidden_imports(path)
    assert not bad, f"{path} imports across the layering of ARCHITECTURE.md: {', '.join(bad)}"


@pytest.mark.parametrize("path", package_files())
def test_module_has_docstring(path: str) -> None:
    source = (ROOT / path).read_text(encoding="utf-8")
    if not source.strip():
        return  # an empty package marker has nothing to document
    assert ast.get_docstring(ast.parse(source)), f"{path} has no module docstring"


def test_readme_tree_lists_every_module() -> None:
    listed = readme_tree_files((ROOT / "README.md").read_text(encoding="utf-8"))
    missing = [
        f for f in package_files()
        if f not in listed and not (f.endswith("/__init__.py") and f != "lmforge/__init__.py")
    ]
    assert not missing, f"README.md's layout tree does not list: {', '.join(missing)}"


def test_readme_tree_lists_only_existing_modules() -> None:
    listed = readme_tree_files((ROOT / "README.md").read_text(encoding="utf-8"))
    absent = sorted(f for f in listed if not (ROOT / f).is_file())
    assert not absent, f"README.md's layout tree lists files that do not exist: {', '.join(absent)}"


# what lmforge.client may import: it must work where only httpx and pydantic are installed
# (tests/client/test_without_torch.py runs it so; this names the offending import)
CLIENT_DEPENDENCIES = ("httpx", "pydantic")


def client_outside_imports(path: str, source: str | None = None) -> list[str]:
    """The imports of a ``lmforge/client/`` module beyond the standard library, httpx, pydantic
    and ``lmforge.client`` itself."""
    return sorted(
        name for name in imported_modules(path, source)
        if name.split(".")[0] not in (*sys.stdlib_module_names, *CLIENT_DEPENDENCIES)
        and name not in ("lmforge", "lmforge.client") and not name.startswith("lmforge.client.")
    )


def test_client_helper_finds_outside_imports() -> None:
    source = "import json\nimport httpx\nfrom lmforge.client import transport\nimport numpy\n" \
             "from lmforge.protocol import chat\n"
    assert client_outside_imports("lmforge/client/x.py", source) == [
        "lmforge.protocol", "lmforge.protocol.chat", "numpy"]


@pytest.mark.parametrize("path", [p for p in package_files() if p.startswith("lmforge/client/")])
def test_client_imports_only_httpx_and_pydantic(path: str) -> None:
    bad = client_outside_imports(path)
    assert not bad, f"{path} imports beyond httpx, pydantic and the standard library: {bad}"


@pytest.mark.parametrize("path", [p for p in package_files() if p.startswith("lmforge/server/")])
def test_every_router_parses_json_strictly(path: str) -> None:
    """A router made without ``route_class=StrictJSONRoute`` would accept lone surrogates in
    its JSON bodies and fail on them later as a 500 (``lmforge/server/routing.py``)."""
    tree = ast.parse((ROOT / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "APIRouter":
            keywords = {k.arg: k.value for k in node.keywords}
            route_class = keywords.get("route_class")
            assert getattr(route_class, "id", None) == "StrictJSONRoute", (
                f"{path}:{node.lineno}: APIRouter(...) needs route_class=StrictJSONRoute")


ENGINE_REACH = re.compile(r"\bengine\.engine\b")


@pytest.mark.parametrize("path", [p for p in package_files()
                                  if not p.startswith("lmforge/engine/")])
def test_only_engine_reaches_inside_the_async_engine(path):
    """``AsyncEngine`` is the one door into the engine: outside ``lmforge/engine/`` nothing
    touches the ``LLMEngine`` the loop thread owns (``async_engine.engine``)."""
    source = (ROOT / path).read_text(encoding="utf-8")
    assert not ENGINE_REACH.search(source), f"{path} reaches through AsyncEngine.engine"


# --- import circles ----------------------------------------------------------------------------
# A module-level import is one that runs when the module is imported: a statement of the module
# body, also inside a top-level ``if`` (``if TYPE_CHECKING:`` included), ``try``, ``with`` or
# class body. TYPE_CHECKING imports count, as in LAYER_RULES: two modules that name each other's
# types know each other, and the circle `attention -> multi_lora -> llama -> attention` ran
# through one. Imports inside a function body do not count: they run late, when both modules are
# loaded, and are how a module defers a heavy optional dependency; the layering rules above still
# see them.


def _import_time_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements of ``body`` that run at import time, nested blocks (``if``, ``try``,
    ``with``, class bodies) flattened; function bodies are skipped."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        out.append(node)
        for field in ("body", "orelse", "finalbody"):
            out.extend(_import_time_statements(getattr(node, field, None) or []))
        for handler in getattr(node, "handlers", None) or []:
            out.extend(_import_time_statements(handler.body))
    return out


def module_name(path: str) -> str:
    """``lmforge/models/llama.py`` -> ``lmforge.models.llama``; a package's ``__init__.py`` ->
    the package's name."""
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_edges(path: str, modules: set[str], source: str | None = None) -> set[str]:
    """The modules among ``modules`` that ``path`` imports at module level.

    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``
    (``name`` is then an attribute of the package); ``import a.b`` is an edge to ``a.b``. The
    parent packages that Python imports on the way are not edges: a package's ``__init__`` that
    re-exports its modules would otherwise close a circle with every one of them.
    """
    if source is None:
        source = (ROOT / path).read_text(encoding="utf-8")
    edges: set[str] = set()
    for node in _import_time_statements(ast.parse(source, filename=path).body):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:  # one statement per name, resolved by imported_modules
                single = ast.unparse(ast.ImportFrom(node.module, [alias], node.level))
                package, name = sorted(imported_modules(path, single), key=len)  # pkg, pkg.name
                target = name if name in modules else package
                if target in modules:
                    edges.add(target)
    return edges


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component of ``graph`` that has one
    (Tarjan's algorithm, then a path back to the component's first node), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:  # node is the root of a component: pop it off the stack
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for component in components:
        start = min(component)
        if len(component) == 1 and start not in graph.get(start, ()):
            continue
        cycles.append(_path_back(graph, component, start))
    return sorted(cycles)


def _path_back(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest path ``start -> ... -> start`` inside ``component`` (breadth-first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph.get(node, set()) & component):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is in a cycle but no path leads back to it")


def lmforge_import_graph() -> dict[str, set[str]]:
    """Module-level import edges between lmforge's own modules."""
    modules = {module_name(p): p for p in package_files()}
    return {name: module_level_edges(path, set(modules)) for name, path in modules.items()}


def test_import_cycle_helpers() -> None:
    """The graph helpers see what they must: TYPE_CHECKING imports count, function-body
    imports do not, a submodule named in ``from pkg import mod`` is the edge."""
    modules = {"lmforge.models", "lmforge.models.a", "lmforge.models.b", "lmforge.models.c"}
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n"
              "from lmforge.models import c\nfrom lmforge.models import VERSION\n"
              "def f():\n    from lmforge.models.a import A\n")
    assert module_level_edges("lmforge/models/a.py", modules, source) == {
        "lmforge.models.b", "lmforge.models.c", "lmforge.models"}
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c", "a"], ["d", "d"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    cycles = import_cycles(lmforge_import_graph())
    shown = "; ".join(" -> ".join(cycle) for cycle in cycles)
    assert not cycles, f"import circles (module-level imports, TYPE_CHECKING included): {shown}"


def test_the_test_tree_mirrors_the_package():
    """Each directory under ``tests/`` is named after a package under ``lmforge/`` (its tests),
    or is ``support/`` (servers for tests) or ``seeds/`` (the user's documents)."""
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    test_dirs = {p.name for p in (ROOT / "tests").iterdir()
                 if p.is_dir() and p.name != "__pycache__"}
    assert test_dirs - packages - {"support", "seeds"} == set()
    assert not list((ROOT / "tests" / "server").glob("test_*_cli.py"))
    assert not list((ROOT / "tests" / "server").glob("test_client_*.py"))


MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 50  # docstring included


@pytest.mark.parametrize("path", package_files())
def test_files_and_functions_stay_small(path):
    """No module over ``MAX_FILE_LINES`` lines, no function over ``MAX_FUNCTION_LINES``: a
    module that grows past them holds a second concept, which gets its own name and place."""
    source = (ROOT / path).read_text(encoding="utf-8")
    assert source.count("\n") <= MAX_FILE_LINES, f"{path} has {source.count(chr(10))} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path}: {', '.join(long)}"


def test_test_file_names_are_unique():
    """The test directories are not packages, so pytest imports each test file by its bare name:
    two files of one name in different directories fail the whole collection."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
