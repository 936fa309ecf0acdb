"""The ``prefork`` strategy: N supervised worker processes accept on the listening socket.

The parent binds and listens, then runs the normal ``serve_forever`` loop with accepting
paused: it only supervises, in ``service_actions`` (``WorkerSlots``, in ``_slots``). Each
worker is the same server after ``after_fork()``: it runs the same loop with accepting on,
with the inner strategy the class order gives (or ``inner="threadpool"``, say), on the
shared socket or, with ``reuse_port``, its own; a connection runs once readable
(``first_byte_timeout``). A worker recycles itself after ``max_requests`` (+ jitter)
requests, and stops when its parent is gone. ``reload()`` (SIGHUP) replaces the workers
one at a time. Stopping (``shutdown()``, SIGTERM or SIGINT for a parent serving in its main
thread) sends the workers SIGTERM; each drains as its inner strategy does; after
``drain_timeout`` (None: as long as they take) SIGKILL. Made of public helpers.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any, TYPE_CHECKING

import attrs

from ..core import FIRST_BYTE_TIMEOUT, LISTEN_BACKLOG, OptionError, count, declare_options, flag, text
from ._slots import (SUPERVISE_INTERVAL, SupervisionOptions, WorkerSlots, WorkerStatus, heartbeat_interval,
                     request_limit, run_worker)
from ._supervise import check_reuse_port, fork_worker, reuse_port_socket, stop_on_signals, with_inner_strategy

__all__ = ["PreforkMixIn"]

log = logging.getLogger("sockserve")

#: One worker per CPU by default: more only add context switches for CPU-bound handlers.
WORKERS = os.cpu_count() or 1
#: A worker's serve loop turns at least this often, to notice that its parent died.
POLL_INTERVAL = 0.5


@attrs.define
class PreforkOptions(SupervisionOptions):
    """Options of the prefork strategy (and those of every supervised pool)."""

    #: Number of worker processes.
    workers: int = count(1, default=WORKERS)
    #: The concurrency strategy inside each worker, by name, when the class order has
    #: none: ``"sync"``, ``"threading"``, ``"threadpool"`` or an installed third party's.
    inner: str = text(default="sync")
    #: Each worker binds its own SO_REUSEPORT socket instead of sharing the parent's.
    reuse_port: bool = flag(default=False)


if TYPE_CHECKING:  # what type checkers see under the mixin: the server it is composed over,
    from ..transports._stream import TCPServer  # with the options as attributes

    class _ServerClass(TCPServer, PreforkOptions): ...
else:
    _ServerClass = object


@declare_options(PreforkOptions)
class PreforkMixIn(_ServerClass):
    """Serve with ``workers`` pre-forked, supervised processes; see the module docstring."""

    #: listen() backlog: large, unlike the documented classes' 5 (see LISTEN_BACKLOG).
    request_queue_size = LISTEN_BACKLOG
    first_byte_timeout: float | None = FIRST_BYTE_TIMEOUT
    #: The worker's slot in a worker process; None in the parent.
    worker_id: int | None = None
    _slots: WorkerSlots | None = None
    _served = _limit = 0

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(with_inner_strategy(cls, getattr(cls, "inner", "sync"), PreforkMixIn))

    def server_bind(self) -> None:
        if self.reuse_port:
            if self.address_family not in (socket.AF_INET, socket.AF_INET6):
                raise OptionError("reuse_port", True, "SO_REUSEPORT needs an inet transport")
            self.allow_reuse_port = True  # the workers' sockets join the parent's group
        super().server_bind()

    def server_activate(self) -> None:
        if not (self.reuse_port and self.socket_type == socket.SOCK_STREAM):
            super().server_activate()
        else:  # bound, not listening: the kernel spreads connections over the workers' sockets
            self.call_hook("server_activate")

    def serve_forever(self, poll_interval: float = POLL_INTERVAL) -> None:
        """Worker: serve as usual. Parent: start the workers and supervise them."""
        if self.worker_id is not None:
            super().serve_forever(poll_interval)
            return
        check_reuse_port(self)
        self._slots = WorkerSlots(self, self.workers, self._spawn, timeout=self.worker_timeout,
                                  boot_timeout=self.worker_boot_timeout)
        self._supervisor, self._stopped = threading.get_ident(), threading.Event()
        self.pause_accepting()  # the workers accept; the parent only supervises
        restore = self._slots.signals()
        try:
            self._slots.fill()
            if self.reuse_port and self.socket.type != socket.SOCK_STREAM:
                self.socket.close()  # in the group it would get a share of the datagrams
            super().serve_forever(min(poll_interval, SUPERVISE_INTERVAL))
        finally:
            try:
                self._stop_workers()
            finally:
                self._stopped.set()
                restore()

    def shutdown(self) -> None:
        """Stop serving; in the parent, also wait until every worker is reaped."""
        super().shutdown()
        if self.worker_id is None and "_stopped" in vars(self) and self._supervisor != threading.get_ident():
            self._stopped.wait()

    def service_actions(self) -> None:
        """Parent: reap exited workers and replace them. Worker: notice an orphaning."""
        super().service_actions()
        if self.worker_id is not None and not self._status.beat():
            log.warning("worker %d: parent %d is gone; stopping", self.worker_id, self._status.parent)
            self.shutdown()
        elif self._slots is not None:  # the parent's (a worker's is None)
            self._slots.supervise()

    def reload(self) -> bool:
        """Parent: reload, then replace the workers one at a time (forked anew, they get
        what was reloaded); from another thread, wait until that is done or aborted."""
        done, slots = super().reload(), self._slots  # None in a worker
        if slots is not None:
            on_loop = threading.get_ident() == self.__dict__.get("_supervisor")
            done = slots.replace(None if on_loop else (self.worker_boot_timeout or 60.0) * (slots.count + 1)) and done
        return done

    def _spawn(self, slot: int, status_fd: int) -> int:
        parent = os.getpid()
        return fork_worker(lambda unblock: self._work(slot, parent, unblock, status_fd))

    def _stop_workers(self) -> None:
        if self._slots is not None:  # None in a worker; counts workers, not requests
            self.requests_cut_off += self._slots.stop()

    def server_close(self) -> None:
        """Close the server; in the parent, stop any worker still running."""
        super().server_close()
        self._stop_workers()

    def _work(self, slot: int, parent: int, unblock: Any, status_fd: int) -> int:
        status = WorkerStatus(status_fd, parent, heartbeat_interval(self.worker_timeout))

        def start() -> None:
            if self._slots is not None:
                self._slots.close_in_child()
            self.after_fork()
            self.worker_id, self._slots, self._status = slot, None, status
            stop_on_signals(self, worker=True)
            if self.reuse_port:
                reuse_port_socket(self)
            # Workers that lose the race for a connection get EAGAIN from accept(), not a block.
            self.socket.setblocking(False)
            self._limit = request_limit(self)
            unblock()  # a stop already sent runs now (it closes the listening sockets)
            self.call_hook("post_fork", worker_id=slot)

        return run_worker(self, status, start, lambda: self.serve_forever(POLL_INTERVAL))

    def process_request(self, request: Any, client_address: Any) -> None:
        """Worker: run it once readable (with ``inner="sync"``; the pools wait themselves)."""
        self.when_readable(request, client_address, super().process_request)

    def get_request(self) -> Any:
        """Accept; a worker recycles itself after ``max_requests`` (+ jitter) requests."""
        request = super().get_request()
        self._served += 1
        if self._limit and self._served >= self._limit:
            self.shutdown()  # serving thread: the loop stops after this request
        return request


# Report the public home in reprs, tracebacks and pickles.
PreforkMixIn.__module__ = "sockserve"
