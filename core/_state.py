"""The serving state of one server in one process, and the poller the serve loop uses.

Everything that belongs to "this process serving this server" lives in one
``ServingState`` object: the lock, the shutdown flag, the wake-up socket pair, whether
the listening socket is polled, the accept back-off, the requests in flight. A forked
child gets a fresh one (``BaseServer.after_fork``) instead of ten fields reset one by one.
"""

from __future__ import annotations

import errno
import math
import os
import select
import selectors
import socket
import threading
from typing import Any

from ._waiting import WaitingRoom

__all__ = [
    "ServingState",
    "Poller",
    "READ",
    "poll_timeout",
    "RESOURCE_ERRNOS",
    "ACCEPT_BACKOFF_MIN",
    "ACCEPT_BACKOFF_MAX",
]

#: accept() errors that mean "out of descriptors or memory right now". Retrying at once
#: spins at 100% CPU (the listening socket stays readable), so the loop backs off instead.
RESOURCE_ERRNOS = frozenset(
    e for e in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) if e is not None
)
#: First and longest pause after a resource error on accept: short enough that service
#: resumes quickly once a descriptor frees up, long enough to take the loop off the CPU.
ACCEPT_BACKOFF_MIN = 0.005
ACCEPT_BACKOFF_MAX = 0.5

if hasattr(select, "poll"):
    Poller: Any = select.poll
    READ = select.POLLIN

    def poll_timeout(seconds: float | None) -> float | None:
        """poll() takes milliseconds; round up so that a short interval never becomes 0."""
        return None if seconds is None else max(0, math.ceil(seconds * 1000))

else:  # pragma: no cover - Windows: the same interface over a selector

    class _SelectPoller:
        def __init__(self) -> None:
            self._selector = selectors.SelectSelector()

        def register(self, fileobj: Any, events: int) -> None:
            self._selector.register(fileobj, selectors.EVENT_READ)

        def unregister(self, fileobj: Any) -> None:
            self._selector.unregister(fileobj)

        def poll(self, timeout: float | None) -> list[tuple[int, int]]:
            return [(key.fd, ev) for key, ev in self._selector.select(timeout)]

    Poller = _SelectPoller
    READ = selectors.EVENT_READ

    def poll_timeout(seconds: float | None) -> float | None:
        return seconds


class ServingState:
    """One server's serving state in one process (see the module docstring)."""

    __slots__ = (
        "lock",
        "owner_pid",
        "shutdown_request",
        "is_shut_down",
        "serving_thread",
        "wake_r",
        "wake_w",
        "accepting",
        "paused_by",
        "accept_failures",
        "backoff",
        "in_flight",
        "drain_end",
        "sync_ran",
        "close_depth",
        "closed",
        "cut",
        "waiting",
        "limits",
    )

    def __init__(self, owner_pid: int | None = None) -> None:
        # Reentrant: a signal handler that calls shutdown() (prefork workers, sockserve
        # serve) runs in the serving thread and may interrupt it while it holds the lock.
        self.lock = threading.RLock()
        #: The process that created the server: only it fires the close hooks and
        #: removes what the server created (a Unix socket file).
        self.owner_pid = os.getpid() if owner_pid is None else owner_pid
        self.shutdown_request = False
        self.is_shut_down = threading.Event()
        self.is_shut_down.set()
        self.serving_thread: int | None = None
        self.wake_r: socket.socket | None = None
        self.wake_w: socket.socket | None = None
        #: The serve loop polls the listening socket (pause_accepting clears it).
        self.accepting = True
        #: Why accepting is paused (pause_accepting's reasons); empty: it is not.
        self.paused_by: set[str] = set()
        self.accept_failures = 0
        self.backoff = 0.0
        #: id(request) -> request, for the requests running now in this process.
        self.in_flight: dict[int, Any] = {}
        self.drain_end = threading.Event()
        #: The sync process_request ran the request (it is shut down already).
        self.sync_ran = False
        self.close_depth = 0
        self.closed = False
        #: ids of the in-flight requests cut off: their handlers' errors are expected.
        self.cut: set[int] = set()
        #: Accepted connections waiting in the serve loop's poller for their first byte.
        self.waiting = WaitingRoom()
        #: max_connections / per-IP counts and the request_timeout watcher, once needed.
        self.limits: Any = None

    @property
    def is_owner(self) -> bool:
        return self.owner_pid == os.getpid()

    def open_wake(self) -> socket.socket:
        """Make the wake-up socket pair; return the end the loop polls."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self.wake_r, self.wake_w = wake_r, wake_w
        return wake_r

    def close_wake(self) -> None:
        wake_r, wake_w = self.wake_r, self.wake_w
        self.wake_r = self.wake_w = None
        for sock in (wake_w, wake_r):
            if sock is not None:
                sock.close()

    def wake(self) -> None:
        """Wake the serve loop where it polls (any thread; nothing when not serving)."""
        wake_w = self.wake_w
        if wake_w is not None:
            try:
                wake_w.send(b"\0")
            except OSError:  # buffer full (a wake-up is pending) or closed meanwhile
                pass

    def drain_wake(self) -> None:
        """Read the pending wake-up bytes (serving thread)."""
        wake_r = self.wake_r
        if wake_r is None:
            return
        try:
            while wake_r.recv(4096):
                pass
        except OSError:  # BlockingIOError: nothing more to read
            pass
