"""The pieces of a strategy that runs supervised worker processes, public for third parties.

prefork is made of them, and so can a third party's process pool be:

- ``exit_child(body)``: how a forked child ends, whatever happens in it.
- ``fork_worker(body)``: fork with the stop signals blocked, so that a SIGTERM sent while
  the child is still the parent's copy waits until the child has its own handlers (the
  child calls the ``unblock`` it is given); the child leaves through ``exit_child``.
- ``stop_on_signals(server)``: SIGTERM and SIGINT become a graceful ``shutdown()``, a
  second one ends the drain at once; in a worker, the drain deadline also cuts off what
  is still in flight, so a blocked handler returns before the parent has to kill it.
- ``WorkerSlots``: a fixed number of worker slots kept filled: reaps and reports exited
  workers (``sockserve_worker_exit``), replaces them (after ``RESPAWN_DELAY`` if they died
  young), stops them all (SIGTERM, the drain deadline, SIGKILL).
- ``reuse_port_socket(server)``: a worker's own ``SO_REUSEPORT`` socket instead of the
  shared one.
- ``with_inner_strategy(cls, name, above)``: *cls* with another strategy composed in below
  *above* (prefork's ``inner``), unless the class order has it already.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

from ..core import Server, registry
from ._drain import drain_deadline, reap, stop_processes

__all__ = [
    "RESPAWN_DELAY",
    "STOP_SIGNALS",
    "WorkerSlots",
    "exit_child",
    "fork_worker",
    "reuse_port_socket",
    "stop_on_signals",
    "with_inner_strategy",
]

log = logging.getLogger("sockserve")

#: The signals that stop a server (and each of its workers) gracefully.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
#: A worker that fails sooner than this after its fork is replaced only after this delay,
#: so a worker that crashes at start-up does not become a fork loop.
RESPAWN_DELAY = 1.0


def exit_child(body: Callable[[], int]) -> NoReturn:
    """In a forked child: run *body*, then leave through ``os._exit`` with its status.

    Whatever happens (an exception, SystemExit, KeyboardInterrupt), the child never
    returns into the parent's serve loop; it exits 1 when *body* did not return.
    Standard streams are flushed first, because ``os._exit`` skips that.
    """
    status = 1
    try:
        status = body()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def fork_worker(body: Callable[[Callable[[], None]], int]) -> int:
    """Fork a worker; return its pid in the parent. The child runs ``body(unblock)``.

    The stop signals are blocked in the child until it calls ``unblock()`` (after setting
    its own handlers: ``stop_on_signals(server, worker=True)``); a stop sent before that
    runs then. The child exits with what *body* returns (1 if it raised, logged).
    """
    parent = os.getpid()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pid = os.fork()
    finally:
        if os.getpid() == parent:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if pid:
        return pid

    def unblock() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def run() -> int:
        try:
            return body(unblock)
        except BaseException:
            log.exception("worker process %d failed", os.getpid())
            return 1

    exit_child(run)


def stop_on_signals(server: Server, *, worker: bool = False) -> Callable[[], None]:
    """Make SIGTERM and SIGINT stop *server* gracefully; return what restores them.

    The first signal calls ``server.shutdown()`` (from the serving thread, it returns at
    once); a second ends the drain (``server.end_drain()``). In a *worker*, the handlers
    replace whatever the fork copied, and the drain deadline is enforced here too: when
    ``drain_timeout`` passes (SIGALRM) the requests in flight are cut off. Outside a
    worker, only the main thread's default handlers are replaced (an application's own
    handler is left alone).
    """
    if not worker and threading.current_thread() is not threading.main_thread():
        return lambda: None
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
        server.shutdown()

    defaults = (signal.SIG_DFL, signal.default_int_handler)
    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS
                if worker or signal.getsignal(sig) in defaults}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


class WorkerSlots:
    """*count* worker slots of *server*, each filled by ``start(slot) -> pid``.

    ``fill()`` starts them; ``supervise()`` (from ``service_actions``) reaps exited
    workers, reports each (``sockserve_worker_exit``, a warning for a failure) and starts
    a replacement in its slot; ``stop()`` sends every worker SIGTERM and waits until the
    drain deadline, then SIGKILL. ``sockserve_pre_fork`` fires before each start.
    """

    def __init__(self, server: Server, count: int, start: Callable[[int], int]) -> None:
        self.server, self.count, self._start = server, count, start
        #: pid -> (slot, monotonic start time) of the running workers.
        self.children: dict[int, tuple[int, float]] = {}
        self._due: list[tuple[float, int]] = []  # (monotonic time, slot) to restart
        self.stopping = False

    def fill(self) -> None:
        """Start a worker in every slot."""
        for slot in range(self.count):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        self.server.call_hook("pre_fork", worker_id=slot)
        self.children[self._start(slot)] = (slot, time.monotonic())

    def supervise(self) -> None:
        """Reap exited workers and start the replacements that are due."""
        for pid, code in reap(set(self.children)):
            self._exited(pid, code)
        now = time.monotonic()
        due = [slot for t, slot in self._due if t <= now]
        if due and not self.stopping:
            self._due = [(t, s) for t, s in self._due if t > now]
            for slot in due:
                self._spawn(slot)

    def _exited(self, pid: int, code: int) -> None:
        slot, started = self.children.pop(pid)
        reason = "stop" if self.stopping else "crash" if code != 0 else "max_requests"
        self.server.call_hook("worker_exit", worker_id=slot, status=code, reason=reason)
        if self.stopping:
            return
        if code != 0:
            log.warning("worker %d (pid %d) exited with status %d; replacing it", slot, pid, code)
        young = code != 0 and time.monotonic() - started < RESPAWN_DELAY
        self._due.append((time.monotonic() + (RESPAWN_DELAY if young else 0.0), slot))

    def replace(self) -> None:
        """Ask every worker to stop gracefully (SIGTERM: it drains its requests); each is
        replaced by a new one forked from the server as it is now (after a reload, with
        the new certificates). Any thread. The others accept meanwhile; with one worker
        the listen backlog holds new clients until its replacement runs."""
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:  # exited meanwhile: supervise() replaces it
                pass

    def stop(self) -> int:
        """Stop every worker (SIGTERM, then SIGKILL at the drain deadline); return how
        many had to be killed."""
        self.stopping = True
        if not self.children:
            return 0
        return stop_processes(self.server, set(self.children), drain_deadline(self.server),
                              term_first=True, on_exit=self._exited)


def reuse_port_socket(server: Any) -> None:
    """Give *server* (in a worker) its own ``SO_REUSEPORT`` socket on its address.

    The new socket is bound (and listening, for a stream one) before the shared one is
    closed; on failure the shared one is kept and the error raised.
    """
    shared = server.socket
    own = socket.socket(shared.family, shared.type)
    try:
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        own.bind(server.server_address)
        if own.type == socket.SOCK_STREAM:  # a datagram socket does not listen
            own.listen(server.request_queue_size)
    except BaseException:
        own.close()
        raise
    shared.close()
    server.socket = own


def with_inner_strategy(cls: type, name: str, above: type) -> type:
    """Return *cls* with concurrency strategy *name* composed in below *above*.

    *cls* itself when *name* is ``"sync"`` or the class order has that strategy already.
    Settings made on *cls* or on its bases before *above* win over the strategy's
    defaults. The result is kept on *cls*: asking again gives the same class.
    """
    if name == "sync":
        return cls
    cached = cls.__dict__.get("_inner_strategy")
    if cached is not None and cached[0] == name:
        return cached[1]
    mixin = (getattr(cls, "sockserve_registry", None) or registry).load("concurrency", name)
    if mixin in cls.__mro__:
        return cls
    own: dict[str, Any] = {}
    for klass in reversed(cls.__mro__[: cls.__mro__.index(above)]):
        own.update(
            (key, value)
            for key, value in vars(klass).items()
            if not key.startswith("__")
            and not callable(value)
            and not isinstance(value, (property, classmethod, staticmethod))
        )
    derived = type(cls.__name__, (mixin, cls), own)
    derived.__module__, derived.__qualname__ = cls.__module__, cls.__qualname__
    type.__setattr__(cls, "_inner_strategy", (name, derived))
    return derived
