"""sockserve's conformance kit for plugin authors (DESIGN.md section 8).

A third-party distribution subclasses a test class, naming its plugin, and pytest runs the
shared scenarios against it, the same ones sockserve's own built-ins pass::

    from sockserve.testing import StrategyTests

    class TestProcessPool(StrategyTests):
        strategy = "processpool"
        options = {"workers": 2}
        transports = ("tcp", "tcp6", "unix")
        forks = True

- ``StrategyTests``: echo over each transport, prompt shutdown, the drain (with and
  without a deadline), handler errors, many connections with nothing leaked, after-fork
  hygiene, and the layer stage under the strategy (with ``KitLayer``).
- ``TransportTests``: echo under a few strategies, prompt shutdown, handler errors, many
  requests with nothing leaked, a closed server refusing clients.
- ``LayerTests``: what the layer returns reaches the handler, the hooks and the access log;
  the drain cuts off its connections; failing clients are denied in one line.
- ``Recorder``: a lifecycle plugin writing every hook, from every process, to a file.
- ``KitLayer`` / ``Wrapped`` / ``KIT_ADDRESS``: the kit's own test layer.

Importing this package imports pytest; importing ``sockserve`` does not import this package.
The kit uses only sockserve's public names, as a third party's tests would.
"""

from __future__ import annotations

import pytest

# Assertions in the scenarios get pytest's explanations (before the modules are imported).
pytest.register_assert_rewrite(
    "sockserve.testing._scenarios", "sockserve.testing._stage", "sockserve.testing._classes"
)

from ._classes import LayerTests, StrategyTests, TransportTests  # noqa: E402
from ._layer import KIT_ADDRESS, KitLayer, KitLayerOptions, Wrapped  # noqa: E402
from ._recorder import Recorder  # noqa: E402

__all__ = [
    "KIT_ADDRESS",
    "KitLayer",
    "KitLayerOptions",
    "LayerTests",
    "Recorder",
    "StrategyTests",
    "TransportTests",
    "Wrapped",
]

# Report the public home in reprs, tracebacks and pickles.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = __name__
del _name, _obj
