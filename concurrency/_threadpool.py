"""The ``threadpool`` strategy: a fixed set of worker threads fed by the accept loop."""

from __future__ import annotations

import os
import time
from typing import Any

import attrs

from ..core._options import count, flag
from ..core._server import LISTEN_BACKLOG
from ._pool import ThreadPool

__all__ = ["ThreadpoolMixIn"]

#: Worker threads by default: concurrent.futures' choice for I/O-bound work (a handler
#: mostly waits on its socket), at least 5 and at most 32.
WORKERS = min(32, (os.cpu_count() or 1) + 4)
#: Accepted connections that may wait for a free worker: a short queue smooths bursts;
#: a long one only adds latency (the kernel's listen backlog holds the rest).
BACKLOG = 64


@attrs.define
class ThreadpoolOptions:
    """Options of the threadpool strategy."""

    workers: int = count(1)
    backlog: int = count(0)
    daemon_threads: bool = flag()
    block_on_close: bool = flag()


class ThreadpoolMixIn:
    """Handle requests on a fixed pool of ``workers`` threads.

    At most ``workers`` handlers run at once and at most ``backlog`` accepted requests
    wait; when both are full the serving thread stops accepting until a worker frees up.
    ``server_close()`` lets queued and running requests finish when ``block_on_close``
    is true (bounded by ``drain_timeout``: then queued requests are dropped and running
    ones cut off, all counted in ``requests_cut_off``); otherwise queued requests are
    dropped and the workers stop after their current request. Works with stream and
    datagram transports.
    """

    sockserve_options = ThreadpoolOptions
    #: Number of worker threads.
    workers = WORKERS
    #: listen() backlog: large, unlike the documented classes' 5 (see LISTEN_BACKLOG).
    request_queue_size = LISTEN_BACKLOG
    #: Accepted requests that may wait for a worker.
    backlog = BACKLOG
    #: Make the worker threads daemon threads.
    daemon_threads = False
    #: server_close() waits for queued and running requests.
    block_on_close = True
    _pool: ThreadPool | None = None

    def _threadpool(self) -> ThreadPool:
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPool(self, self.workers, self.backlog, self.daemon_threads)
        return pool

    def get_request(self) -> Any:
        """Wait for room in the pool, then accept (a full pool accepts nothing)."""
        if not self._threadpool().wait_for_room():
            raise InterruptedError("shutting down while the pool was full")
        return super().get_request()  # type: ignore[misc]

    def process_request(self, request: Any, client_address: Any) -> None:
        """Queue the request for the pool."""
        self._threadpool().submit(request, client_address)

    def _sockserve_wake_loop(self) -> None:
        """Wake the serve loop, also where it waits for room in a full pool."""
        super()._sockserve_wake_loop()  # type: ignore[misc]
        pool = self._pool
        if pool is not None:
            pool.interrupt()

    def server_close(self) -> None:
        """Close the server, then drain and stop the pool (see ``block_on_close``)."""
        super().server_close()  # type: ignore[misc]
        pool, self._pool = self._pool, None
        if pool is None:
            return
        drain = self.drain_timeout  # type: ignore[attr-defined]
        deadline = None if drain is None else time.monotonic() + drain
        dropped = pool.close(self.block_on_close, deadline)
        self.requests_cut_off += dropped  # type: ignore[attr-defined]


# Report the public home in reprs, tracebacks and pickles.
ThreadpoolMixIn.__module__ = "sockserve"
