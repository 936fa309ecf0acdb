"""The ``prefork`` strategy: N supervised worker processes accept on the listening socket.

The parent binds and listens, then forks ``workers`` processes. Each worker accepts on
the shared listening socket (or, with ``reuse_port``, on a socket of its own bound with
``SO_REUSEPORT`` so the kernel spreads connections) and serves with an inner strategy:
``sync`` (one request at a time) or ``threadpool`` (``threads`` worker threads).

The parent only supervises, in its ``serve_forever`` loop: a worker that exits is reaped
and replaced (``sockserve_worker_exit``, then a new fork in the same slot); a worker
recycles itself after ``max_requests`` requests. ``shutdown()``, and SIGTERM or SIGINT
delivered to a parent serving in its main thread, stop the workers gracefully: each gets
SIGTERM, stops accepting and finishes its in-flight requests; after ``drain_timeout``
(``STOP_TIMEOUT`` if unset) the stragglers get SIGKILL. Every worker is reaped before
``serve_forever`` returns. A worker whose parent dies (even by SIGKILL) notices within
``poll_interval`` and exits the same graceful way.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from typing import Any

import attrs

from ..core._errors import OptionError
from ..core._hooks import call_hook
from ..core._options import count, flag
from ..core._server import LISTEN_BACKLOG
from ._forking import exit_child
from ._pool import ThreadPool
from ._threadpool import BACKLOG as THREADPOOL_BACKLOG
from ._threadpool import WORKERS as THREADPOOL_WORKERS

__all__ = ["PreforkMixIn"]

log = logging.getLogger("sockserve")

#: One worker per CPU by default: each runs one Python interpreter, so more than the
#: number of cores only adds context switches for CPU-bound handlers.
WORKERS = os.cpu_count() or 1
#: Seconds the parent waits for workers to finish in-flight requests when stopping and
#: ``drain_timeout`` is unset; after it, SIGKILL. Long requests should set drain_timeout.
STOP_TIMEOUT = 30.0
#: A worker that exits sooner than this after its fork is replaced only after this delay,
#: so a worker that crashes at start-up does not become a fork loop.
RESPAWN_DELAY = 1.0
#: How often the parent looks for exited workers while stopping them.
REAP_INTERVAL = 0.01

INNER_STRATEGIES = ("sync", "threadpool")
#: The signals that stop a worker gracefully.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


@attrs.define
class PreforkOptions:
    """Options of the prefork strategy."""

    workers: int = count(1)
    inner: str = attrs.field(validator=attrs.validators.in_(INNER_STRATEGIES))
    threads: int = count(1)
    backlog: int = count(0)
    max_requests: int = count(0)
    reuse_port: bool = flag()


class PreforkMixIn:
    """Serve with ``workers`` pre-forked, supervised processes; see the module docstring."""

    sockserve_options = PreforkOptions
    #: Number of worker processes.
    workers = WORKERS
    #: listen() backlog: large, unlike the documented classes' 5 (see LISTEN_BACKLOG).
    request_queue_size = LISTEN_BACKLOG
    #: Strategy inside each worker: ``"sync"`` or ``"threadpool"``.
    inner = "sync"
    #: Threads per worker with ``inner="threadpool"``.
    threads = THREADPOOL_WORKERS
    #: Queued requests per worker with ``inner="threadpool"``.
    backlog = THREADPOOL_BACKLOG
    #: A worker exits and is replaced after this many requests; 0 never.
    max_requests = 0
    #: Each worker binds its own SO_REUSEPORT socket instead of sharing the parent's.
    reuse_port = False
    #: The worker's slot in a worker process; None in the parent.
    worker_id: int | None = None
    _prefork_children: dict[int, tuple[int, float]] | None = None  # pid -> (slot, started)
    _prefork_stopping = False

    # ------------------------------------------------------------------ parent

    def server_bind(self) -> None:
        if self.reuse_port:
            if self.address_family not in (socket.AF_INET, socket.AF_INET6):  # type: ignore[attr-defined]
                raise OptionError("reuse_port", True, "SO_REUSEPORT needs an inet transport")
            self.allow_reuse_port = True  # the workers' sockets join the parent's group
        super().server_bind()  # type: ignore[misc]

    def server_activate(self) -> None:
        if self.reuse_port and self.socket_type == socket.SOCK_STREAM:  # type: ignore[attr-defined]
            # Bound (the port stays ours) but not listening: the kernel spreads
            # connections over listening sockets only, which are the workers'.
            hook = self._sockserve_hooks.server_activate  # type: ignore[attr-defined]
            if hook is not None:
                call_hook(self, hook)
            return
        super().server_activate()  # type: ignore[misc]

    def _sockserve_loop(self, wake_r: socket.socket, poll_interval: float | None) -> None:
        if self.worker_id is not None:  # a worker: accept and serve as usual
            super()._sockserve_loop(wake_r, poll_interval)  # type: ignore[misc]
            return
        self._prefork_children = {}
        self._prefork_stopping = False
        self._prefork_respawn: list[tuple[float, int]] = []
        restore = self._prefork_catch_signals()
        try:
            for slot in range(self.workers):
                self._prefork_spawn(slot)
            if self.reuse_port and self.socket.type != socket.SOCK_STREAM:  # type: ignore[attr-defined]
                # A datagram socket in the group would get its share of the traffic and
                # never read it; a stream one was never made to listen (server_activate).
                self.socket.close()  # type: ignore[attr-defined]
            timeout = None if poll_interval is None else poll_interval
            while not self._sockserve_shutdown_request:  # type: ignore[attr-defined]
                wait = timeout
                if self._prefork_respawn:
                    due = min(t for t, _ in self._prefork_respawn) - time.monotonic()
                    wait = max(0.0, due if wait is None else min(wait, due))
                _wait_readable(wake_r, wait)
                if self._sockserve_shutdown_request:  # type: ignore[attr-defined]
                    break
                self.service_actions()  # type: ignore[attr-defined]
                hook = self._sockserve_hooks.service_actions  # type: ignore[attr-defined]
                if hook is not None:
                    call_hook(self, hook)
        finally:
            try:
                self._prefork_stop()
            finally:
                restore()

    def _prefork_catch_signals(self) -> Any:
        """In the main thread, make SIGTERM and SIGINT a graceful ``shutdown()``."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def stop(signum: int, frame: Any) -> None:
            self.shutdown()  # type: ignore[attr-defined]  # serving thread: returns at once

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                previous[sig] = signal.signal(sig, stop)

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def service_actions(self) -> None:
        """Parent: reap exited workers and replace them. Worker: notice an orphaning."""
        super().service_actions()  # type: ignore[misc]
        if self.worker_id is not None:
            if os.getppid() != self._prefork_parent:
                log.warning("worker %d: parent %d is gone; stopping", self.worker_id, self._prefork_parent)
                self.shutdown()  # type: ignore[attr-defined]
            return
        self._prefork_reap(block=False)
        now = time.monotonic()
        due = [slot for t, slot in self._prefork_respawn if t <= now]
        if due and not self._prefork_stopping:
            self._prefork_respawn = [(t, s) for t, s in self._prefork_respawn if t > now]
            for slot in due:
                self._prefork_spawn(slot)

    def _prefork_reap(self, block: bool) -> None:
        """Reap exited workers (with *block*, wait for one); schedule their replacements.

        Waits on our workers' pids only: waitpid(-1) would also reap children that other
        code in this process started.
        """
        children = self._prefork_children
        for pid in list(children or ()):
            try:
                reaped, status = os.waitpid(pid, 0 if block else os.WNOHANG)
            except ChildProcessError:  # reaped by someone else; its status is lost
                reaped, status = pid, 0
            if reaped == 0:
                continue
            slot, started = children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            hook = self._sockserve_hooks.worker_exit  # type: ignore[attr-defined]
            if hook is not None:
                call_hook(self, hook, worker_id=slot, status=code)
            if block:
                return
            if self._prefork_stopping:
                continue
            if code != 0:
                log.warning("worker %d (pid %d) exited with status %d; replacing it", slot, pid, code)
            quick = time.monotonic() - started < RESPAWN_DELAY and code != 0
            self._prefork_respawn.append((time.monotonic() + (RESPAWN_DELAY if quick else 0.0), slot))

    def _prefork_spawn(self, slot: int) -> None:
        hooks = self._sockserve_hooks  # type: ignore[attr-defined]
        if hooks.pre_fork is not None:
            call_hook(self, hooks.pre_fork, worker_id=slot)
        parent = os.getpid()
        # A stop that reached the child before it has its own handlers would kill it by
        # the default action (SIGTERM) or a KeyboardInterrupt (SIGINT): the stop signals
        # stay pending until the worker has set its handlers (_prefork_worker).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            self._prefork_children[pid] = (slot, time.monotonic())  # type: ignore[index]
            return

        def work() -> int:
            try:
                return self._prefork_worker(slot, parent, mask)
            except BaseException:
                log.exception("worker %d failed", slot)
                return 1

        exit_child(work)

    def _prefork_stop(self) -> None:
        children = self._prefork_children
        self._prefork_stopping = True
        if not children:
            return
        for pid in list(children):
            _kill(pid, signal.SIGTERM)
        drain = self.drain_timeout  # type: ignore[attr-defined]
        deadline = time.monotonic() + (STOP_TIMEOUT if drain is None else drain)
        while children and time.monotonic() < deadline:
            self._prefork_reap(block=False)
            if children:
                time.sleep(REAP_INTERVAL)
        if children:
            # Workers, not requests: the parent does not see what a worker is running.
            self.requests_cut_off += len(children)  # type: ignore[attr-defined]
            log.warning("%d worker(s) still running at the stop deadline; killing them", len(children))
            for pid in list(children):
                _kill(pid, signal.SIGKILL)
            while children:
                self._prefork_reap(block=True)

    def server_close(self) -> None:
        """Close the server; stop any worker still running."""
        super().server_close()  # type: ignore[misc]
        if self.worker_id is None and self._prefork_children:
            self._prefork_stop()

    # ------------------------------------------------------------------ worker

    def _prefork_worker(self, slot: int, parent: int, mask: Any) -> int:
        self.worker_id = slot
        self._prefork_parent = parent
        self._prefork_children = None
        self._prefork_served = 0
        self._sockserve_after_fork()  # type: ignore[attr-defined]

        def stop(signum: int, frame: Any) -> None:
            self.shutdown()  # type: ignore[attr-defined]  # serving thread: returns at once

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a stop already sent runs now
        if self.reuse_port:
            self._prefork_own_socket()
        # Every worker polls the same socket; the ones that lose the race for a
        # connection must get EAGAIN from accept(), not block in it.
        self.socket.setblocking(False)  # type: ignore[attr-defined]
        hook = self._sockserve_hooks.post_fork  # type: ignore[attr-defined]
        if hook is not None:
            call_hook(self, hook, worker_id=slot)
        self._prefork_pool = (
            ThreadPool(self, self.threads, self.backlog) if self.inner == "threadpool" else None
        )
        try:
            self.serve_forever(POLL_INTERVAL)  # type: ignore[attr-defined]
        finally:
            pool = self._prefork_pool
            if pool is not None:
                drain = self.drain_timeout  # type: ignore[attr-defined]
                deadline = None if drain is None else time.monotonic() + drain
                pool.close(True, deadline)
        return 0

    def _prefork_own_socket(self) -> None:
        shared = self.socket  # type: ignore[attr-defined]
        own = socket.socket(shared.family, shared.type)
        try:
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            own.bind(self.server_address)  # type: ignore[attr-defined]
            if own.type == socket.SOCK_STREAM:  # a datagram socket does not listen
                own.listen(self.request_queue_size)  # type: ignore[attr-defined]
        except BaseException:
            own.close()
            raise
        shared.close()
        self.socket = own

    def _sockserve_wake_loop(self) -> None:
        """Wake the serve loop, also where a worker waits for room in its full thread pool."""
        super()._sockserve_wake_loop()  # type: ignore[misc]
        pool = getattr(self, "_prefork_pool", None)
        if pool is not None:
            pool.interrupt()

    def get_request(self) -> Any:
        """In a worker with a thread pool, accept only when the pool has room."""
        pool = getattr(self, "_prefork_pool", None)
        if pool is not None and not pool.wait_for_room():
            raise InterruptedError("shutting down while the pool was full")
        return super().get_request()  # type: ignore[misc]

    def process_request(self, request: Any, client_address: Any) -> None:
        """In a worker: run the request with the inner strategy; count for max_requests."""
        pool = self._prefork_pool
        if pool is None:
            super().process_request(request, client_address)  # type: ignore[misc]
        else:
            pool.submit(request, client_address)
        self._prefork_served += 1
        if self.max_requests and self._prefork_served >= self.max_requests:
            self.shutdown()  # type: ignore[attr-defined]  # recycle: exit, the parent replaces us


#: A worker's own serve loop turns at least this often, to notice that its parent died.
POLL_INTERVAL = 0.5


def _wait_readable(sock: socket.socket, timeout: float | None) -> None:
    import select

    try:
        select.select([sock], [], [], timeout)
    except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
        pass


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# Report the public home in reprs, tracebacks and pickles.
PreforkMixIn.__module__ = "sockserve"
