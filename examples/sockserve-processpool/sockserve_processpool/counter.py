"""The ``request-counter`` lifecycle plugin: requests finished per process, logged at stop.

A process pool's workers are separate processes, each with its own copy of the plugin's
state, so the count is naturally per worker; each worker logs its count when it stops
serving (``sockserve_serve_stop`` fires in the worker when the pool shuts it down).
Under a threaded strategy several request threads finish at once, hence the lock.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import sockserve

__all__ = ["RequestCounter", "COUNTER"]

log = logging.getLogger("sockserve_processpool")


class RequestCounter:
    """Count the requests this process finished; log the count when serving stops."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self._lock = threading.Lock()

    @sockserve.hookimpl
    def sockserve_request_finish(self) -> None:
        pid = os.getpid()
        with self._lock:
            self.counts[pid] = self.counts.get(pid, 0) + 1

    @sockserve.hookimpl
    def sockserve_serve_stop(self, server: Any) -> None:
        pid = os.getpid()
        log.info("process %d handled %d requests", pid, self.counts.get(pid, 0))


COUNTER = RequestCounter()
