"""The ``threadpool`` strategy: a fixed set of worker threads fed by the accept loop."""

from __future__ import annotations

import os
from typing import Any, TYPE_CHECKING

import attrs

from ..core._contract import Server
from ..core._options import count, declare_options, flag
from ..core._server import FIRST_BYTE_TIMEOUT, LISTEN_BACKLOG
from ._drain import drain_deadline
from ._pool import ThreadPool

__all__ = ["ThreadpoolMixIn"]

if TYPE_CHECKING:  # what type checkers see under the mixin: the server it is composed over
    from ..core import BaseServer as _ServerClass
else:
    _ServerClass = object

#: Worker threads by default: concurrent.futures' choice for I/O-bound work (a handler
#: mostly waits on its socket), at least 5 and at most 32.
THREADS = min(32, (os.cpu_count() or 1) + 4)
#: Accepted connections that may wait for a free thread: a short queue smooths bursts;
#: a long one only adds latency (the kernel's listen backlog holds the rest).
BACKLOG = 64


@attrs.define
class ThreadpoolOptions:
    """Options of the threadpool strategy."""

    #: Number of worker threads.
    threads: int = count(1, default=THREADS)
    #: Accepted requests that may wait for a thread.
    backlog: int = count(0, default=BACKLOG)
    #: Make the worker threads daemon threads.
    daemon_threads: bool = flag(default=False)
    #: server_close() waits for queued and running requests.
    block_on_close: bool = flag(default=True)
    # 0.1 called the thread count ``workers`` (prefork's ``workers`` counts processes).
    sockserve_renamed = {"workers": "threads"}


@declare_options(ThreadpoolOptions)
class ThreadpoolMixIn(_ServerClass):
    """Handle requests on a fixed pool of ``threads`` threads.

    A connection goes to the pool only once it is readable: until its first byte it waits
    in the serve loop's poller (``first_byte_timeout``, 10 s here), so idle clients hold
    descriptors, not threads. At most ``threads`` handlers run at once and at most
    ``backlog`` accepted requests wait; when both are full the server pauses accepting until a thread frees up (the
    serving thread never blocks). ``server_close()`` lets queued and running requests
    finish when ``block_on_close`` is true (bounded by ``drain_timeout``: then queued
    requests are denied and running ones cut off); otherwise queued requests are denied
    (``sockserve_request_denied``, reason ``closing``) and the threads stop after their
    current request. Works with stream and datagram transports.

    ``workers``, the 0.1 name of ``threads``, still works with a DeprecationWarning.
    """

    #: listen() backlog: large, unlike the documented classes' 5 (see LISTEN_BACKLOG).
    request_queue_size = LISTEN_BACKLOG
    #: A silent client is closed after this long; until then it holds a descriptor in
    #: the serve loop, not a thread (``first_byte_timeout``, None for the other classes).
    first_byte_timeout: float | None = FIRST_BYTE_TIMEOUT
    # Options (ThreadpoolOptions declares them and their defaults).
    threads: int
    backlog: int
    daemon_threads: bool
    block_on_close: bool
    _pool: ThreadPool | None = None

    def _threadpool(self) -> ThreadPool:
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPool(self, self.threads, self.backlog, self.daemon_threads)
        return pool

    @property
    def threads_busy(self) -> int:
        """Pool threads running a request now, in this process (0 before the first one)."""
        pool = self._pool
        return 0 if pool is None else pool.busy

    @property
    def requests_queued(self) -> int:
        """Accepted requests waiting for a pool thread now, in this process."""
        pool = self._pool
        return 0 if pool is None else pool.queued

    def process_request(self, request: Any, client_address: Any) -> None:
        """Queue the request for the pool once it is readable (``when_readable``)."""
        self.when_readable(request, client_address, self._threadpool().submit)

    def server_close(self) -> None:
        """Close the server, then drain and stop the pool (see ``block_on_close``)."""
        server: Server = self
        super().server_close()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(self.block_on_close, drain_deadline(server))


# Report the public home in reprs, tracebacks and pickles.
ThreadpoolMixIn.__module__ = "sockserve"
