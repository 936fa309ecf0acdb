"""The example's tests run against the example as installed, or from this checkout.

Installed (``pip install ./examples/sockserve-processpool``), ``sockserve_processpool`` is
imported from the environment and its entry points are there. Run from a checkout of
sockserve without installing it, the package is imported from the folder above this one;
the tests name its classes directly, so they need no entry points.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("sockserve_processpool") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
