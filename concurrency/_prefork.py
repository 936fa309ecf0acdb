"""The ``prefork`` strategy: N supervised worker processes accept on the listening socket.

The parent binds and listens, then runs the normal ``serve_forever`` loop with accepting
paused: it only supervises, in ``service_actions``. A worker that exits is reaped and
replaced (``sockserve_worker_exit``, then a new fork in the same slot; one that dies at
once is replaced after ``RESPAWN_DELAY``). Each worker is the same server after
``after_fork()``: it runs the same loop with accepting on, with the inner strategy the
class order gives (``compose("tcp", "prefork", mixins=[ThreadpoolMixIn])``, or the short
form ``inner="threadpool"``), on the shared socket or, with ``reuse_port``, a socket of
its own. A worker recycles itself after ``max_requests`` requests, and stops when its
parent is gone. Stopping (``shutdown()``, SIGTERM or SIGINT for a parent serving in its
main thread) sends the workers SIGTERM; each stops accepting and drains as its inner
strategy does; after ``drain_timeout`` (None: as long as they take) SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import attrs

from ..core._errors import OptionError
from ..core._options import count, declare_options, flag, text
from ..core._registry import registry
from ..core._server import LISTEN_BACKLOG
from ._drain import drain_deadline, reap, stop_processes
from ._forking import exit_child

__all__ = ["PreforkMixIn"]

log = logging.getLogger("sockserve")

#: One worker per CPU by default: each runs one Python interpreter, so more than the
#: number of cores only adds context switches for CPU-bound handlers.
WORKERS = os.cpu_count() or 1
#: A worker that fails sooner than this after its fork is replaced only after this delay,
#: so a worker that crashes at start-up does not become a fork loop.
RESPAWN_DELAY = 1.0
#: A worker's serve loop turns at least this often, to notice that its parent died.
POLL_INTERVAL = 0.5
#: The signals that stop a worker gracefully.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


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
class PreforkMixIn:
    """Serve with ``workers`` pre-forked, supervised processes; see the module docstring."""

    #: listen() backlog: large, unlike the documented classes' 5 (see LISTEN_BACKLOG).
    request_queue_size = LISTEN_BACKLOG
    # Options (PreforkOptions declares them and their defaults).
    workers: int
    inner: str
    max_requests: int
    reuse_port: bool
    #: The worker's slot in a worker process; None in the parent.
    worker_id: int | None = None
    _children: dict[int, tuple[int, float]] | None = None  # pid -> (slot, started)
    _served = 0

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(_with_inner(cls))

    # ------------------------------------------------------------------ parent

    def server_bind(self: Any) -> None:
        if self.reuse_port:
            if self.address_family not in (socket.AF_INET, socket.AF_INET6):
                raise OptionError("reuse_port", True, "SO_REUSEPORT needs an inet transport")
            self.allow_reuse_port = True  # the workers' sockets join the parent's group
        super().server_bind()

    def server_activate(self: Any) -> None:
        if self.reuse_port and self.socket_type == socket.SOCK_STREAM:
            # Bound (the port stays ours) but not listening: the kernel spreads
            # connections over listening sockets only, which are the workers'.
            self.call_hook("server_activate")
            return
        super().server_activate()

    def serve_forever(self: Any, poll_interval: float = POLL_INTERVAL) -> None:
        """Worker: serve as usual. Parent: start the workers and supervise them."""
        if self.worker_id is not None:
            super().serve_forever(poll_interval)
            return
        self._children, self._respawn, self._stopping = {}, [], False
        self._supervisor, self._stopped = threading.get_ident(), threading.Event()
        self.pause_accepting()  # the workers accept; the parent only supervises
        restore = self._catch_signals()
        try:
            for slot in range(self.workers):
                self._spawn(slot)
            if self.reuse_port and self.socket.type != socket.SOCK_STREAM:
                # A datagram socket in the group would get its share of the traffic and
                # never read it; a stream one was never made to listen (server_activate).
                self.socket.close()
            super().serve_forever(poll_interval)
        finally:
            try:
                self._stop_workers()
            finally:
                self._stopped.set()
                restore()

    def shutdown(self: Any) -> None:
        """Stop serving; in the parent, also wait until every worker is reaped."""
        super().shutdown()
        stopped = self.__dict__.get("_stopped")
        if self.worker_id is None and stopped is not None and self._supervisor != threading.get_ident():
            stopped.wait()

    def _catch_signals(self: Any) -> Any:
        """In the main thread, make SIGTERM and SIGINT a graceful ``shutdown()``."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {
            sig: signal.signal(sig, _stop_handler(self))
            for sig in STOP_SIGNALS
            if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler)
        }
        return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]

    def service_actions(self: Any) -> None:
        """Parent: reap exited workers and replace them. Worker: notice an orphaning."""
        super().service_actions()
        if self.worker_id is not None:
            if os.getppid() != self._parent:
                log.warning("worker %d: parent %d is gone; stopping", self.worker_id, self._parent)
                self.shutdown()
            return
        children = self._children
        if children is None:
            return
        for pid, code in reap(set(children)):
            self._exited(pid, code)
        now = time.monotonic()
        due = [slot for t, slot in self._respawn if t <= now]
        if due and not self._stopping:
            self._respawn = [(t, s) for t, s in self._respawn if t > now]
            for slot in due:
                self._spawn(slot)

    def _exited(self: Any, pid: int, code: int) -> None:
        slot, started = self._children.pop(pid)
        self.call_hook("worker_exit", worker_id=slot, status=code)
        if self._stopping:
            return
        if code != 0:
            log.warning("worker %d (pid %d) exited with status %d; replacing it", slot, pid, code)
        quick = code != 0 and time.monotonic() - started < RESPAWN_DELAY
        self._respawn.append((time.monotonic() + (RESPAWN_DELAY if quick else 0.0), slot))

    def _spawn(self: Any, slot: int) -> None:
        self.call_hook("pre_fork", worker_id=slot)
        parent = os.getpid()
        # A stop that reached the child before it has its own handlers would kill it by
        # the default action (SIGTERM) or a KeyboardInterrupt (SIGINT): the stop signals
        # stay pending until the worker has set its handlers (_work).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
        finally:
            if os.getpid() == parent:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if pid:
            self._children[pid] = (slot, time.monotonic())
            return

        def work() -> int:
            try:
                return self._work(slot, parent, mask)
            except BaseException:
                log.exception("worker %d failed", slot)
                return 1

        exit_child(work)

    def _stop_workers(self: Any) -> None:
        self._stopping = True
        children = self._children
        if children:
            pids = set(children)
            late = stop_processes(self, pids, drain_deadline(self), term_first=True, on_exit=self._exited)
            # Workers, not requests: the parent does not see what a worker is running.
            self.requests_cut_off += late

    def server_close(self: Any) -> None:
        """Close the server; in the parent, stop any worker still running."""
        super().server_close()
        if self.worker_id is None and self._children:
            self._stop_workers()

    # ------------------------------------------------------------------ worker

    def _work(self: Any, slot: int, parent: int, mask: Any) -> int:
        self.after_fork()
        self.worker_id, self._parent, self._children = slot, parent, None
        stop = _stop_handler(self, worker=True)
        for sig in STOP_SIGNALS:
            signal.signal(sig, stop)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a stop already sent runs now
        if self.reuse_port:
            self._own_socket()
        # Every worker polls the same socket; the ones that lose the race for a
        # connection must get EAGAIN from accept(), not block in it.
        self.socket.setblocking(False)
        self.call_hook("post_fork", worker_id=slot)
        try:
            self.serve_forever(POLL_INTERVAL)
        finally:
            self.server_close()  # the inner strategy drains; no close hooks in a worker
        return 0

    def _own_socket(self: Any) -> None:
        shared = self.socket
        own = socket.socket(shared.family, shared.type)
        try:
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            own.bind(self.server_address)
            if own.type == socket.SOCK_STREAM:  # a datagram socket does not listen
                own.listen(self.request_queue_size)
        except BaseException:
            own.close()
            raise
        shared.close()
        self.socket = own

    def get_request(self: Any) -> Any:
        """Accept; a worker recycles itself after ``max_requests`` requests."""
        request = super().get_request()
        self._served += 1
        if self.max_requests and self._served >= self.max_requests:
            self.shutdown()  # serving thread: the loop stops after this request
        return request


def _stop_handler(server: Any, worker: bool = False) -> Any:
    """SIGTERM / SIGINT: a graceful ``shutdown()``; a second one ends the drain at once.

    In a worker, the drain deadline is enforced here too: when ``drain_timeout`` passes
    (SIGALRM), the requests still in flight are cut off, so that a handler blocked on its
    connection returns and the worker exits before the parent has to kill it.
    """
    signals = 0

    def stop(signum: int, frame: Any) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            server.end_drain()
            if worker:
                server.cut_off(server.in_flight)
        elif worker and server.drain_timeout is not None:
            signal.signal(signal.SIGALRM, lambda *_: server.cut_off(server.in_flight))
            signal.setitimer(signal.ITIMER_REAL, max(server.drain_timeout, 0.001))
        server.shutdown()  # from the serving thread: returns at once

    return stop


def _with_inner(cls: type) -> type:
    """*cls* with its ``inner`` strategy composed in, unless the class order has one."""
    inner = getattr(cls, "inner", "sync")
    if inner == "sync":
        return cls
    cached = cls.__dict__.get("_prefork_inner")
    if cached is not None and cached[0] == inner:
        return cached[1]
    mixin = (getattr(cls, "sockserve_registry", None) or registry).load("concurrency", inner)
    if mixin in cls.__mro__:
        return cls
    own: dict[str, Any] = {}  # settings made on cls or its bases win over the mixin's defaults
    for klass in reversed(cls.__mro__[: cls.__mro__.index(PreforkMixIn)]):
        own.update(
            (name, value)
            for name, value in vars(klass).items()
            if not name.startswith("__")
            and not callable(value)
            and not isinstance(value, (property, classmethod, staticmethod))
        )
    derived = type(cls.__name__, (mixin, cls), own)
    derived.__module__, derived.__qualname__ = cls.__module__, cls.__qualname__
    type.__setattr__(cls, "_prefork_inner", (inner, derived))
    return derived


# Report the public home in reprs, tracebacks and pickles.
PreforkMixIn.__module__ = "sockserve"
