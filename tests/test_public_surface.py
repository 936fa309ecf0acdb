"""The public surface: ``__all__`` of every public module, the public home of public objects,
the standard ``socketserver`` names and attributes, ``py.typed``, and no ``socketserver`` import."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import socketserver
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest

import sockserve
from support import script_path

PACKAGE_DIR = Path(sockserve.__file__).resolve().parent
#: Directories of the repository that are not part of the library.
NOT_LIBRARY = {"tests", "benchmarks", "docs", "build", "dist", ".git"}


def public_modules() -> list[str]:
    """Every importable module of sockserve whose dotted name has no private part."""
    found = ["sockserve"]
    for info in pkgutil.walk_packages(sockserve.__path__, "sockserve.", onerror=lambda name: None):
        parts = info.name.split(".")[1:]
        if parts[0] in NOT_LIBRARY or parts[0] == "examples":
            continue
        if any(part.startswith("_") for part in parts):
            continue
        found.append(info.name)
    return sorted(found)


def private_modules() -> list[str]:
    found = []
    for info in pkgutil.walk_packages(sockserve.__path__, "sockserve.", onerror=lambda name: None):
        parts = info.name.split(".")[1:]
        if parts[0] in NOT_LIBRARY or parts[0] == "examples" or info.name == "sockserve.__main__":
            continue
        if any(part.startswith("_") for part in parts):
            found.append(info.name)
    return sorted(found)


def defined_at_top_level(module: types.ModuleType) -> set[str]:
    """Names a module's own source defines (def, class, assignment), outside TYPE_CHECKING."""
    tree = ast.parse(inspect.getsource(module))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_the_public_modules_are_found():
    assert {"sockserve", "sockserve.core", "sockserve.core.hookspecs"} <= set(public_modules())


@pytest.mark.parametrize("name", public_modules())
def test_public_module_all_matches_what_it_defines(name):
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported)), f"{name}.__all__ has duplicates"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not have: {missing}"
    # Whatever the module's own source defines publicly is listed ...
    unlisted = sorted(
        n for n in defined_at_top_level(module) if not n.startswith("_") and n not in exported
    )
    assert not unlisted, f"{name} defines public names missing from __all__: {unlisted}"
    # ... and so is every sockserve class or function it re-exports.
    reexported = sorted(
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and isinstance(obj, (type, types.FunctionType))
        and getattr(obj, "__module__", "").split(".")[0] == "sockserve"
        and n not in exported
    )
    assert not reexported, f"{name} re-exports names missing from __all__: {reexported}"


@pytest.mark.parametrize("name", private_modules())
def test_private_module_all_names_only_what_it_has(name):
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert len(exported) == len(set(exported))
    assert [n for n in exported if not hasattr(module, n)] == []


def test_dir_of_sockserve_lists_everything_in_all():
    assert set(sockserve.__all__) <= set(dir(sockserve))


@pytest.mark.parametrize("name", sorted(sockserve.__all__))
def test_public_objects_report_sockserve_as_their_module(name):
    obj = getattr(sockserve, name)
    if isinstance(obj, (type, types.FunctionType)):
        assert obj.__module__ == "sockserve"
        assert repr(obj).startswith(("<class 'sockserve.", "<function ")), repr(obj)
        if isinstance(obj, type):
            assert obj.__qualname__ == obj.__name__ == name


# --------------------------------------------------------------------------- the standard names


def test_sockserve_has_every_name_of_the_standard_module():
    missing = [n for n in socketserver.__all__ if n not in sockserve.__all__ or not hasattr(sockserve, n)]
    assert missing == []
    assert set(socketserver.__all__) <= set(sockserve.STANDARD_NAMES)


STANDARD_CLASSES = [
    name for name in socketserver.__all__ if isinstance(getattr(socketserver, name), type)
]


@pytest.mark.parametrize("name", STANDARD_CLASSES)
def test_standard_class_has_every_public_attribute_of_the_standard_one(name):
    theirs = getattr(socketserver, name)
    ours = getattr(sockserve, name)
    public = sorted(a for a in dir(theirs) if not a.startswith("_"))
    assert [a for a in public if not hasattr(ours, a)] == []
    differs = [a for a in public if callable(getattr(theirs, a)) != callable(getattr(ours, a))]
    assert differs == [], f"{name}: callable in one and not the other: {differs}"


@pytest.mark.parametrize("name", STANDARD_CLASSES)
def test_standard_class_keeps_the_standard_class_attribute_values(name):
    """Documented defaults (backlog 5, timeout, max_packet_size, ...) are the standard ones."""
    theirs = getattr(socketserver, name)
    ours = getattr(sockserve, name)
    for attribute in sorted(a for a in dir(theirs) if not a.startswith("_")):
        value = getattr(theirs, attribute)
        if callable(value) or isinstance(value, property):
            continue
        assert getattr(ours, attribute) == value, f"{name}.{attribute}"


@pytest.mark.parametrize(
    "name", [n for n in STANDARD_CLASSES if n != "BaseServer" and not n.endswith("MixIn")]
)
def test_standard_class_methods_take_the_standard_arguments(name):
    theirs = getattr(socketserver, name)
    ours = getattr(sockserve, name)
    for attribute in sorted(a for a in dir(theirs) if not a.startswith("_") or a == "__init__"):
        member = getattr(theirs, attribute)
        if not inspect.isfunction(member):
            continue
        expected = [p.name for p in inspect.signature(member).parameters.values()]
        actual = [p.name for p in inspect.signature(getattr(ours, attribute)).parameters.values()]
        assert actual[: len(expected)] == expected, f"{name}.{attribute}{tuple(actual)}"


# --------------------------------------------------------------------------- shipping


def test_py_typed_is_shipped():
    assert (PACKAGE_DIR / "py.typed").is_file()
    with open(PACKAGE_DIR / "pyproject.toml", "rb") as f:
        config = tomllib.load(f)
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["sockserve"]


def library_sources() -> list[Path]:
    sources = []
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(PACKAGE_DIR).parts
        if parts[0] in NOT_LIBRARY or "build" in parts:
            continue
        sources.append(path)
    return sorted(sources)


def imports_of(path: Path) -> list[str]:
    """Every module an import statement or an import_module("...") call in *path* names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.append(arg.value)
    return found


def test_library_sources_never_import_socketserver():
    sources = library_sources()
    assert PACKAGE_DIR / "core" / "_server.py" in sources
    offenders = [
        f"{path.relative_to(PACKAGE_DIR)}: {module}"
        for path in sources
        for module in imports_of(path)
        if module.split(".")[0] == "socketserver"
    ]
    assert offenders == []


def test_using_every_part_of_sockserve_does_not_import_socketserver(tmp_path):
    proc = subprocess.run(
        [sys.executable, script_path("no_socketserver_import.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) is False
