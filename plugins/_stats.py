"""The ``stats`` plugin: request counters and a duration histogram per server.

Opt-in by name. Counts are kept in memory shared across forked children, so they are
complete for every strategy: ``accepted`` (past accept), ``denied`` (refused after
accept: by ``verify_request`` or a plugin, by a layer, or dropped unrun at close),
``finished`` (handler returned), ``failed`` (handler raised). ``Stats.snapshot(server)``
reads them from Python; once the server has closed and drained
(``sockserve_server_closed``), one summary line is logged on ``sockserve.stats``
(``sockserve serve`` prints it on exit).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Generator
from typing import Any

from ..core import SharedCounters, hookimpl, plugin_state

__all__ = ["Stats", "STATS", "BUCKETS"]

#: Upper bounds of the duration histogram's buckets, in seconds (the last bucket is
#: everything slower). Decades from 100 µs to 10 s: request times in a socket server span
#: that range, and a decade per bucket keeps the summary one readable line.
BUCKETS = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0)
COUNTERS = ("accepted", "denied", "finished", "failed")
#: The histogram's counters: one per bucket, the last one for "slower".
_BUCKET_NAMES = tuple(f"bucket{i}" for i in range(len(BUCKETS) + 1))


class Stats:
    """Count requests by outcome and time them; see the module docstring."""

    sockserve_autoload = False

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("sockserve.stats")
        self._local = threading.local()

    def _counters(self, server: Any) -> SharedCounters:
        # Kept per server with the public helpers a third-party plugin would use: made at
        # activation, before any child is forked, so that forked children add to it.
        return plugin_state(server, self, lambda: SharedCounters(COUNTERS + _BUCKET_NAMES))

    def snapshot(self, server: Any) -> dict[str, Any]:
        """Return the counters and the histogram (bucket upper bound -> count) of *server*."""
        values = self._counters(server).snapshot()
        histogram = dict(zip((*BUCKETS, float("inf")), (values[n] for n in _BUCKET_NAMES)))
        return {**{name: values[name] for name in COUNTERS}, "durations": histogram}

    @hookimpl
    def sockserve_server_activate(self, server: Any) -> None:
        self._counters(server)  # create the shared memory before any child is forked

    @hookimpl(wrapper=True)
    def sockserve_verify_request(
        self, server: Any, request: Any, client_address: Any
    ) -> Generator[None, Any, bool]:
        # A wrapper sees the verdict of every other plugin; when none decided, it asks the
        # server's own verify_request, so the count of denials is complete.
        verdict = yield
        if verdict is None:
            verdict = bool(server.verify_request(request, client_address))
        self._counters(server).add("accepted")
        return verdict

    @hookimpl
    def sockserve_request_denied(self, server: Any) -> None:
        self._counters(server).add("denied")

    @hookimpl
    def sockserve_request_start(self) -> None:
        self._local.started = time.perf_counter()

    @hookimpl
    def sockserve_request_finish(self, server: Any, exc: BaseException | None) -> None:
        counters = self._counters(server)
        started = getattr(self._local, "started", None)
        counters.add("finished" if exc is None else "failed")
        if started is not None:
            bucket = bisect.bisect_left(BUCKETS, time.perf_counter() - started)
            counters.add(_BUCKET_NAMES[bucket])

    @hookimpl
    def sockserve_server_closed(self, server: Any) -> None:
        snap = self.snapshot(server)
        histogram = " ".join(
            f"<={bound * 1000:g}ms:{n}" if bound != float("inf") else f"slower:{n}"
            for bound, n in snap["durations"].items()
        )
        self.logger.info(
            "%s: accepted %d, denied %d, finished %d, failed %d; durations %s",
            type(server).__name__,
            snap["accepted"],
            snap["denied"],
            snap["finished"],
            snap["failed"],
            histogram,
        )


#: The instance the ``stats`` entry point names.
STATS = Stats()
