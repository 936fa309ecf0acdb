"""The ``prefork`` strategy: N supervised worker processes accept on the listening socket.

The parent binds and listens, then runs the normal ``serve_forever`` loop with accepting
paused: it only supervises, in ``service_actions`` (``WorkerSlots``: exited workers are
reported and replaced). Each worker is the same server after ``after_fork()``: it runs the
same loop with accepting on, with the inner strategy the class order gives
(``compose("tcp", "prefork", mixins=[ThreadpoolMixIn])``, or the short form
``inner="threadpool"``), on the shared socket or, with ``reuse_port``, a socket of its own;
a connection runs once readable (``first_byte_timeout``). A worker recycles itself after
``max_requests`` requests, and stops when its parent is gone. Stopping (``shutdown()``,
SIGTERM or SIGINT for a parent serving in its main thread) sends the workers SIGTERM; each
drains as its inner strategy does; after ``drain_timeout`` (None: as long as they take)
SIGKILL. Made of the public helpers in ``_supervise``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any, TYPE_CHECKING

import attrs

from ..core import FIRST_BYTE_TIMEOUT, LISTEN_BACKLOG, OptionError, count, declare_options, flag, text
from ._supervise import WorkerSlots, fork_worker, reuse_port_socket, stop_on_signals, with_inner_strategy

__all__ = ["PreforkMixIn"]

if TYPE_CHECKING:  # what type checkers see under the mixin: the server it is composed over
    from ..transports._stream import TCPServer as _ServerClass
else:
    _ServerClass = object

log = logging.getLogger("sockserve")

#: One worker per CPU by default: more only add context switches for CPU-bound handlers.
WORKERS = os.cpu_count() or 1
#: A worker's serve loop turns at least this often, to notice that its parent died.
POLL_INTERVAL = 0.5


@attrs.define
class PreforkOptions:
    """Options of the prefork strategy."""

    #: Number of worker processes.
    workers: int = count(1, default=WORKERS)
    #: The concurrency strategy inside each worker, by name, when the class order has
    #: none: ``"sync"``, ``"threading"``, ``"threadpool"`` or an installed third party's.
    inner: str = text(default="sync")
    #: A worker exits and is replaced after this many requests; 0 never.
    max_requests: int = count(0, default=0)
    #: Each worker binds its own SO_REUSEPORT socket instead of sharing the parent's.
    reuse_port: bool = flag(default=False)


@declare_options(PreforkOptions)
class PreforkMixIn(_ServerClass):
    """Serve with ``workers`` pre-forked, supervised processes; see the module docstring."""

    #: listen() backlog: large, unlike the documented classes' 5 (see LISTEN_BACKLOG).
    request_queue_size = LISTEN_BACKLOG
    first_byte_timeout: float | None = FIRST_BYTE_TIMEOUT
    # Options (PreforkOptions declares them and their defaults).
    workers: int
    inner: str
    max_requests: int
    reuse_port: bool
    #: The worker's slot in a worker process; None in the parent.
    worker_id: int | None = None
    _slots: WorkerSlots | None = None
    _served = 0

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(with_inner_strategy(cls, getattr(cls, "inner", "sync"), PreforkMixIn))

    def server_bind(self) -> None:
        if self.reuse_port:
            if self.address_family not in (socket.AF_INET, socket.AF_INET6):
                raise OptionError("reuse_port", True, "SO_REUSEPORT needs an inet transport")
            self.allow_reuse_port = True  # the workers' sockets join the parent's group
        super().server_bind()

    def server_activate(self) -> None:
        if self.reuse_port and self.socket_type == socket.SOCK_STREAM:
            # Bound, not listening: the kernel spreads connections over the workers' sockets.
            self.call_hook("server_activate")
            return
        super().server_activate()

    def serve_forever(self, poll_interval: float = POLL_INTERVAL) -> None:
        """Worker: serve as usual. Parent: start the workers and supervise them."""
        if self.worker_id is not None:
            super().serve_forever(poll_interval)
            return
        self._slots = WorkerSlots(self, self.workers, self._spawn)
        self._supervisor, self._stopped = threading.get_ident(), threading.Event()
        self.pause_accepting()  # the workers accept; the parent only supervises
        restore = stop_on_signals(self)
        try:
            self._slots.fill()
            if self.reuse_port and self.socket.type != socket.SOCK_STREAM:
                self.socket.close()  # in the group it would get a share of the datagrams
            super().serve_forever(poll_interval)
        finally:
            try:
                self._stop_workers()
            finally:
                self._stopped.set()
                restore()

    def shutdown(self) -> None:
        """Stop serving; in the parent, also wait until every worker is reaped."""
        super().shutdown()
        stopped = self.__dict__.get("_stopped")
        if self.worker_id is None and stopped is not None and self._supervisor != threading.get_ident():
            stopped.wait()

    def service_actions(self) -> None:
        """Parent: reap exited workers and replace them. Worker: notice an orphaning."""
        super().service_actions()
        if self.worker_id is not None:
            if os.getppid() != self._parent:
                log.warning("worker %d: parent %d is gone; stopping", self.worker_id, self._parent)
                self.shutdown()
        elif self._slots is not None:
            self._slots.supervise()

    def reload(self) -> bool:
        """Parent: reload, then replace the workers (forked anew, they get what was reloaded)."""
        done = super().reload()
        if self._slots is not None:  # None in a worker
            self._slots.replace()
        return done

    def _spawn(self, slot: int) -> int:
        parent = os.getpid()
        return fork_worker(lambda unblock: self._work(slot, parent, unblock))

    def _stop_workers(self) -> None:
        if self._slots is not None:  # counts workers: the parent does not see requests
            self.requests_cut_off += self._slots.stop()

    def server_close(self) -> None:
        """Close the server; in the parent, stop any worker still running."""
        super().server_close()
        self._stop_workers()  # _slots is None in a worker

    # Worker side:
    def _work(self, slot: int, parent: int, unblock: Any) -> int:
        self.after_fork()
        self.worker_id, self._parent, self._slots = slot, parent, None
        stop_on_signals(self, worker=True)
        unblock()  # a stop already sent runs now
        if self.reuse_port:
            reuse_port_socket(self)
        # Workers that lose the race for a connection get EAGAIN from accept(), not a block.
        self.socket.setblocking(False)
        self.call_hook("post_fork", worker_id=slot)
        try:
            self.serve_forever(POLL_INTERVAL)
        finally:
            self.server_close()  # the inner strategy drains; no close hooks in a worker
        return 0

    def process_request(self, request: Any, client_address: Any) -> None:
        """Worker: run it once readable (with ``inner="sync"``; the pools wait themselves)."""
        self.when_readable(request, client_address, super().process_request)

    def get_request(self) -> Any:
        """Accept; a worker recycles itself after ``max_requests`` requests."""
        request = super().get_request()
        self._served += 1
        if self.max_requests and self._served >= self.max_requests:
            self.shutdown()  # serving thread: the loop stops after this request
        return request


# Report the public home in reprs, tracebacks and pickles.
PreforkMixIn.__module__ = "sockserve"
