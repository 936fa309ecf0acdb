"""The ``threading`` strategy: a new thread per request (``ThreadingMixIn``)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import attrs

from ..core._options import flag

__all__ = ["ThreadingMixIn"]

log = logging.getLogger("sockserve")

#: Seconds a request thread gets to return after its connection was cut off at the drain
#: deadline: enough for a handler blocked in recv/send to see the error and unwind.
CUT_OFF_GRACE = 1.0


class _RequestThread(threading.Thread):
    """A request's thread; it drops out of its server's set when it ends.

    The standard module keeps finished threads in a list until the next request prunes
    it; removing each thread as it ends keeps nothing around and costs O(1).
    """

    def __init__(self, owner: _Threads | None, target: Any, request: Any, client_address: Any):
        super().__init__(target=target, args=(request, client_address))
        self._owner = owner
        self.request = request

    def run(self) -> None:
        try:
            super().run()
        finally:
            owner = self._owner
            if owner is not None:
                owner.discard(self)


class _Threads(set):  # type: ignore[type-arg]
    """The running request threads of one server, joined on close."""

    def join(self, server: Any, deadline: float | None) -> None:
        """Wait for every thread, until *deadline* (a monotonic time) if given.

        Threads still running at the deadline get their connections shut down, which
        makes a handler blocked on the socket return; they get ``CUT_OFF_GRACE`` seconds
        more, and any still running after that is left behind (and logged).
        """
        for thread in self.copy():  # set.copy is atomic; threads discard themselves
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        late = [t for t in self.copy() if t.is_alive()]
        if not late:
            return
        server._sockserve_cut_off([t.request for t in late])
        grace_end = time.monotonic() + CUT_OFF_GRACE
        for thread in late:
            thread.join(max(0.0, grace_end - time.monotonic()))
        stuck = sum(t.is_alive() for t in late)
        if stuck:
            log.error("%s: %d request thread(s) still running after cut-off", type(server).__name__, stuck)


@attrs.define
class ThreadingOptions:
    """Options of the threading strategy."""

    daemon_threads: bool = flag()
    block_on_close: bool = flag()


class ThreadingMixIn:
    """Handle each request in a new thread.

    ``server_close()`` waits for the (non-daemon) request threads when ``block_on_close`` is true
    (the default), at most ``drain_timeout`` seconds when that is set; threads still
    running then have their connections shut down (logged and counted).
    """

    sockserve_options = ThreadingOptions
    #: Make request threads daemon threads (they do not keep the process alive).
    daemon_threads = False
    #: server_close() waits for the request threads to finish.
    block_on_close = True
    _threads: _Threads | None = None

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Run one request in its thread: finish, handle errors, shut down."""
        self.run_request(request, client_address)  # type: ignore[attr-defined]

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a new thread to process the request."""
        threads = self._threads
        if threads is None and self.block_on_close:
            threads = self._threads = _Threads()
        if self.daemon_threads:
            threads = None  # daemon threads are not waited for, as documented
        thread = _RequestThread(threads, self.process_request_thread, request, client_address)
        thread.daemon = self.daemon_threads
        if threads is not None:
            threads.add(thread)
        try:
            thread.start()
        except BaseException:
            if threads is not None:
                threads.discard(thread)
            raise

    def server_close(self) -> None:
        """Close the server, then wait for the request threads (see ``block_on_close``)."""
        super().server_close()  # type: ignore[misc]
        threads = self._threads
        if threads:
            drain = self.drain_timeout  # type: ignore[attr-defined]
            deadline = None if drain is None else time.monotonic() + drain
            threads.join(self, deadline)


# Report the public home in reprs, tracebacks and pickles.
ThreadingMixIn.__module__ = "sockserve"
