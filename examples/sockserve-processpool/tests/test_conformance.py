"""The process pool through sockserve's conformance kit, as any third-party strategy's
tests would run it: the shared scenarios of ``sockserve.testing.StrategyTests``."""

from __future__ import annotations

from sockserve.testing import StrategyTests
from sockserve_processpool.pool import ProcessPoolMixIn


class TestProcessPool(StrategyTests):
    # The class itself rather than its entry-point name: the tests also run from a
    # checkout where the example is not installed.
    strategy = ProcessPoolMixIn
    options = {"workers": 2}
    # Stream transports only: a connection is handed to a worker as a descriptor.
    transports = ("tcp", "tcp6", "unix")
    forks = True
