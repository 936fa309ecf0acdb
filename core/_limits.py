"""Per-request deadlines and connection limits (issue 9, item 4).

- ``RequestDeadlines``: one watcher thread per server and process, started on the first
  request when ``request_timeout`` is set, that shuts down the connection of a handler
  still running at its deadline, so that a blocked read returns. Stopped at
  ``server_close()``; a forked child starts its own.
- ``Limits``: the stream connections this process holds (accepted and neither ended nor
  moved to another process), and how many of them come from each client host, for
  ``max_connections`` and ``max_connections_per_ip``; and the watcher above.
"""

from __future__ import annotations

import collections
import heapq
import logging
import socket
import threading
import time
from typing import Any

__all__ = ["RequestDeadlines", "Limits", "client_host"]

log = logging.getLogger("sockserve")


def client_host(client_address: Any) -> Any:
    """The part of a client address that names the client (the IP of an inet address)."""
    if isinstance(client_address, tuple) and client_address:
        return client_address[0]
    return client_address


class RequestDeadlines:
    """Shut connections down when their handlers pass their deadline (see the module)."""

    def __init__(self, server: Any) -> None:
        self._server = server
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Any]] = []
        self._live: dict[int, Any] = {}  # seq -> request
        self._seq = 0
        self._stopped = False
        self._thread: threading.Thread | None = None
        #: Connections shut down at their deadline.
        self.expired = 0

    def add(self, request: Any, seconds: float) -> int:
        """Watch *request* for *seconds*; returns the token to ``remove`` it with."""
        with self._cond:
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(
                    target=self._watch, name="sockserve-request-timeout", daemon=True
                )
                self._thread.start()
            self._seq += 1
            self._live[self._seq] = request
            heapq.heappush(self._heap, (time.monotonic() + seconds, self._seq, request))
            if self._heap[0][1] == self._seq:
                self._cond.notify()
            return self._seq

    def remove(self, token: int) -> None:
        with self._cond:
            self._live.pop(token, None)

    def _watch(self) -> None:
        cond, heap, live = self._cond, self._heap, self._live
        while True:
            due = []
            with cond:
                while not self._stopped:
                    while heap and heap[0][1] not in live:
                        heapq.heappop(heap)
                    if heap and heap[0][0] <= time.monotonic():
                        break
                    cond.wait(None if not heap else heap[0][0] - time.monotonic())
                if self._stopped:
                    return
                now = time.monotonic()
                while heap and heap[0][0] <= now:
                    _, seq, request = heapq.heappop(heap)
                    if live.pop(seq, None) is not None:
                        due.append(request)
            for request in due:
                self._expire(request)

    def _expire(self, request: Any) -> None:
        server = self._server
        server._sockserve_state.cut.add(id(request))  # its handler's error is expected
        try:
            request.shutdown(socket.SHUT_RDWR)
        except OSError:
            return  # ended meanwhile
        self.expired += 1
        with server._sockserve_state.lock:
            server.requests_timed_out["request"] += 1
        log.warning(
            "%s: request_timeout of %ss passed; shut the connection down",
            type(server).__name__, server.request_timeout,
        )

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()


class Limits:
    """One server's limit bookkeeping in one process (see the module docstring)."""

    __slots__ = ("held", "by_host", "paused", "deadlines")

    def __init__(self, server: Any) -> None:
        #: id(request) of the stream connections held (max_connections).
        self.held: set[int] = set()
        #: client host -> connections running from it, after the layers.
        self.by_host: collections.Counter[Any] = collections.Counter()
        #: Accepting was paused by max_connections (and is to be resumed by it).
        self.paused = False
        #: The request_timeout watcher (its thread starts with the first request).
        self.deadlines = RequestDeadlines(server)
