"""The pieces of a strategy that runs supervised worker processes, public for third parties.

prefork is made of them, and so can a third party's process pool be:

- ``exit_child(body)``: how a forked child ends, whatever happens in it.
- ``fork_worker(body)``: fork with the stop signals blocked, so that a SIGTERM sent while
  the child is still the parent's copy waits until the child has its own handlers (the
  child calls the ``unblock`` it is given); the child leaves through ``exit_child``.
- ``stop_on_signals(server)``: SIGTERM and SIGINT become a graceful ``shutdown()``, a
  second one ends the drain at once; in a worker, the drain deadline also cuts off what
  is still in flight, so a blocked handler returns before the parent has to kill it.
- ``WorkerSlots`` (in ``_slots``): the parent's supervision of its worker slots.
- ``reuse_port_socket(server)``: a worker's own ``SO_REUSEPORT`` socket instead of the
  shared one; ``check_reuse_port(server)``, in the parent, refuses ``reuse_port`` for a
  server with more than one listening socket.
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
from collections.abc import Callable
from typing import Any, NoReturn

from ..core import OptionError, Server, registry

__all__ = [
    "STOP_SIGNALS",
    "check_reuse_port",
    "exit_child",
    "fork_worker",
    "reuse_port_socket",
    "stop_listening",
    "stop_on_signals",
    "with_inner_strategy",
]

log = logging.getLogger("sockserve")

#: The signals that stop a server (and each of its workers) gracefully.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


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
    once); a second ends the drain (``server.end_drain()``). In a *worker*, the first also
    closes its copies of the stream listening sockets at once (``stop_listening``), the
    handlers replace whatever the fork copied, and the drain deadline is enforced here
    too: when ``drain_timeout`` passes (SIGALRM) the requests in flight are cut off.
    Outside a worker, only the main thread's default handlers are replaced (an application's own
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
        elif worker:
            stop_listening(server)  # a sync worker's loop may be inside a long request
            if server.drain_timeout is not None:
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


def stop_listening(server: Any) -> None:
    """Close this process's copies of *server*'s stream listening sockets, now.

    For a process that stops: a connection the kernel queues on a socket nobody accepts
    from any more is reset when the last copy closes, a load balancer sees an empty
    response; once every copy is closed, a new connection is refused, which it retries at
    once elsewhere. Datagram sockets stay open: a handler replies through them.
    """
    for sock in getattr(server, "listeners", ()):
        if sock.type == socket.SOCK_STREAM:
            sock.close()


def check_reuse_port(server: Any) -> None:
    """Raise ``OptionError`` when *server* sets ``reuse_port`` and has listening sockets
    besides its own.

    ``reuse_port_socket`` gives a worker its own socket for ``server.socket`` only; the
    others would stay shared (and listen in the parent), half of what ``reuse_port`` says.
    """
    if not getattr(server, "reuse_port", False) or len(server.listeners) < 2:
        return
    extra = [sock.getsockname() for sock in server.listeners[1:]]
    raise OptionError("reuse_port", True, f"one socket per worker serves one address; this server also "
                      f"listens on {', '.join(map(str, extra))}: turn reuse_port off to share them all")


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
