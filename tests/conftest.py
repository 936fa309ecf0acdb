"""Suite-wide fixtures: the hang guard."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

#: Seconds any one test may run before it is failed with the stacks of every thread:
#: no test may hang (a hung test would stall CI until its global limit).
TEST_TIME_LIMIT = 120


@pytest.fixture(autouse=True)
def _time_limit(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that runs longer than TEST_TIME_LIMIT instead of hanging CI."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        import faulthandler
        import sys

        faulthandler.dump_traceback(file=sys.stderr)
        # Not TimeoutError: that is an OSError, which server code catches and goes on.
        pytest.fail(f"{request.node.nodeid} ran longer than {TEST_TIME_LIMIT}s", pytrace=False)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_TIME_LIMIT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
