"""A pytest plugin (``-p checkout_root`` in pyproject.toml): the checkout is not a test package.

The repository root is the package root (``__init__.py`` at the top, installed as
``sockserve``). pytest would collect that folder as a test package and import its
``__init__.py`` by the folder's name: in a clone called ``sockserve-main`` that fails
("attempted relative import with no known parent package"), and in one called ``main`` it
loads the library a second time, as ``main``. Collected as a plain directory, the root is
never imported; the tests import the installed ``sockserve`` only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if path.resolve() == ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None
