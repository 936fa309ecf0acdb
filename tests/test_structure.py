"""The structure the design promises: what may import what, and what only core may name.

These read the source, not the running library: an import circle or a private name can
hide behind lazy imports and still break a plugin author later.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Source outside core/ that a third party could have written: it may use only public names.
OUTSIDE_CORE = ["__init__.py", "__main__.py", "concurrency", "transports", "plugins", "testing",
                "examples", "benchmarks"]


def _python_files(*parts: str) -> list[Path]:
    files: list[Path] = []
    for part in parts:
        path = ROOT / part
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(p for p in path.rglob("*.py") if "build" not in p.parts)
    return sorted(files)


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = ["sockserve", *relative.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module *path* imports, at any level (functions and TYPE_CHECKING included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # ``from . import hookspecs`` imports a module too
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of *graph*, each as the modules in it (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1 or node in graph[node]:
                circles.append(sorted(members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_cycle_finder_finds_a_circle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", ["core", "concurrency", "transports", "plugins"])
def test_modules_of_a_package_import_each_other_in_no_circle(package):
    """Not even through imports inside functions or under TYPE_CHECKING.

    A package's ``__init__`` is left out: it imports its modules, and they import the
    package only to reach one another.
    """
    files = [p for p in _python_files(package) if p.name != "__init__.py"]
    assert len(files) >= 2, files
    names = {_module_name(p): p for p in files}
    graph = {name: {t for t in _imports(path) if t in names} for name, path in names.items()}
    assert _cycles(graph) == []


def test_the_package_imports_no_module_of_the_standard_socketserver():
    for path in _python_files("__init__.py", "core", "concurrency", "transports", "plugins",
                              "testing"):
        assert "socketserver" not in _imports(path), path


def _private_names(path: Path) -> list[str]:
    """``_sockserve_`` names used in *path*: identifiers, and strings that spell one."""
    found = []
    source = path.read_text(encoding="utf-8")
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.string.startswith("_sockserve_"):
            found.append(f"{path.relative_to(ROOT)}:{token.start[0]}: {token.string}")
        elif token.type == tokenize.STRING and "_sockserve_" in token.string:
            found.append(f"{path.relative_to(ROOT)}:{token.start[0]}: {token.string}")
    return found


def test_no_private_sockserve_name_is_used_outside_core():
    """The built-in strategies, transports and plugins use what a third party can use."""
    files = _python_files(*OUTSIDE_CORE)
    assert any(p.parts[-2] == "concurrency" for p in files)
    used = [line for path in files for line in _private_names(path)]
    assert used == []


def test_the_private_name_check_sees_a_private_name(tmp_path):
    sample = ROOT / "tests" / "_sample_private.py"
    try:
        sample.write_text("x = server._sockserve_state\ny = getattr(server, '_sockserve_hooks')\n")
        assert len(_private_names(sample)) == 2
    finally:
        sample.unlink()


def test_the_prefork_strategy_is_a_supervisor_not_a_second_serve_loop():
    """At most half of the 365 lines it had when it carried its own loop, and no loop."""
    source = (ROOT / "concurrency" / "_prefork.py").read_text(encoding="utf-8")
    assert source.count("\n") <= 182
    # Its supervision is the public helpers a third-party process pool can use too.
    assert "from ._supervise import" in source
    assert "while " not in source, "prefork runs the one serve loop, not one of its own"


def test_the_library_is_loaded_once_whatever_the_checkout_folder_is_called():
    """Every module from the library's folders is a ``sockserve`` module (tests/checkout_root.py)."""
    library = [ROOT / "__init__.py", *(ROOT / d for d in ("core", "concurrency", "transports",
                                                         "plugins", "testing"))]
    import sockserve  # noqa: F401 - with the built-ins below loaded
    import sockserve.concurrency._prefork  # noqa: F401
    import sockserve.plugins._stats  # noqa: F401

    loaded = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and any(Path(file).resolve() == p or p in Path(file).resolve().parents
                        for p in library):
            loaded[name] = file
    # The suite tests this checkout, installed (pip install -e): not another copy.
    assert Path(sockserve.__file__).resolve() == ROOT / "__init__.py"
    assert {"sockserve", "sockserve.core._server", "sockserve.concurrency._prefork"} <= set(loaded)
    strays = sorted(name for name in loaded if name != "sockserve" and not name.startswith("sockserve."))
    assert not strays, f"library modules loaded under other names: {strays}"
