"""A bounded pool of request threads, shared by the ``threadpool`` and ``prefork`` strategies.

The serving thread submits accepted requests; a fixed set of worker threads runs them.
At most ``size`` requests run at once and at most ``backlog`` more wait in the queue;
beyond that the serving thread waits before it accepts, so the kernel's listen backlog
holds the rest instead of memory growing without bound.

The hand-off goes through two ``queue.SimpleQueue`` objects (implemented in C): one of
requests, and one of free places ("room"), filled with ``size + backlog`` tokens. The
serving thread takes a token before it accepts and a worker gives it back when its
request is done: four C calls per request. The ``threading.Condition`` version this
replaced took the pool lock about five times per request and allocated a lock per wait;
benchmarks/THROUGHPUT.md has the profile and the measured difference.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

__all__ = ["ThreadPool"]

log = logging.getLogger("sockserve")

#: Seconds a worker gets to return after its connection was cut off at the drain deadline.
CUT_OFF_GRACE = 1.0

#: In the request queue: the worker that gets it stops.
_STOP = None


class ThreadPool:
    """Run ``server.run_request`` for submitted requests on *size* threads.

    :param server: the server whose requests run here.
    :param size: number of worker threads.
    :param backlog: requests that may wait for a free worker.
    :param daemon: make the worker threads daemon threads.
    """

    def __init__(self, server: Any, size: int, backlog: int, daemon: bool = False) -> None:
        self._server = server
        # Items: (request, client_address, holds_a_token), or _STOP.
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # One True per free place; interrupt() adds a False to wake the serving thread.
        self._room: queue.SimpleQueue[bool] = queue.SimpleQueue()
        for _ in range(size + backlog):
            self._room.put(True)
        self._reserved = False  # the serving thread holds a token for its next request
        self._dropping = False  # close(): shut queued requests down instead of running them
        self._dropped = 0
        self._dropped_lock = threading.Lock()
        #: The request each worker is running (None when idle), for cut-off at a deadline.
        self.running: dict[threading.Thread, Any] = {}
        self._threads = [
            threading.Thread(target=self._work, name=f"sockserve-pool-{i}", daemon=daemon)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def _take_room(self) -> bool:
        """Take a free place, waiting for one; False once the server's shutdown is asked for.

        A False token (from ``interrupt()``) only wakes the wait: without a shutdown
        request (a stale one, from a shutdown that found the loop elsewhere) it is dropped.
        """
        server = self._server
        get = self._room.get
        while not server._sockserve_shutdown_request:
            if get():
                return True
        return False

    def wait_for_room(self) -> bool:
        """Wait until another request fits in the pool; False once shutdown is asked for.

        The serving thread calls this before it accepts, so that a full pool leaves new
        connections in the kernel's listen backlog instead of accepting and holding them.
        The place is kept for the next ``submit`` (also when the accept then fails).
        """
        if not self._reserved:
            self._reserved = self._take_room()
        return self._reserved

    def submit(self, request: Any, client_address: Any) -> None:
        """Queue a request in the place ``wait_for_room`` kept (else wait for one).

        Once the server's shutdown has been asked for, the request is queued over the
        limit instead, so that a shutdown is not held up by a full pool and nothing
        accepted is lost.
        """
        token = self._reserved or self._take_room()
        self._reserved = False
        self._requests.put((request, client_address, token))

    def interrupt(self) -> None:
        """Wake the serving thread waiting for room (``shutdown()`` has set its flag)."""
        # Only the serving thread takes tokens: if any is left, its wait ends anyway.
        if self._room.empty():
            self._room.put(False)

    def _work(self) -> None:
        me = threading.current_thread()
        get = self._requests.get
        run = self._server.run_request
        give_back = self._room.put
        running = self.running
        while True:
            item = get()
            if item is _STOP:
                return
            request, client_address, token = item
            if self._dropping:
                self._drop(request)
            else:
                running[me] = request
                try:
                    run(request, client_address)
                except BaseException:  # run_request handled Exceptions; keep the worker alive
                    log.exception("request thread %s: unexpected error", me.name)
                finally:
                    running[me] = None
            if token:
                give_back(True)

    def _drop(self, request: Any) -> None:
        self._server.shutdown_request(request)
        with self._dropped_lock:
            self._dropped += 1

    def _drop_queued(self) -> None:
        """Shut down every request still queued; stop signals already queued stay queued."""
        stops = 0
        while True:
            try:
                item = self._requests.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stops += 1
            else:
                self._drop(item[0])
        for _ in range(stops):
            self._requests.put(_STOP)

    def close(self, wait: bool, deadline: float | None) -> int:
        """Stop the workers; with *wait*, let queued and running requests finish first.

        Without *wait*, requests still queued are shut down unhandled. With *deadline*
        (a monotonic time), requests still running then have their connections cut off.

        :returns: the number of queued requests dropped unhandled (requests cut off while
            running are counted by the server's ``requests_cut_off``).
        """
        if not wait:
            self._dropping = True
            self._drop_queued()
        for _ in self._threads:
            self._requests.put(_STOP)  # after the queued requests: those run first
        if not wait:
            return self._dropped
        for thread in self._threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        late = [t for t in self._threads if t.is_alive()]
        if not late:
            return self._dropped
        self._dropping = True  # not started by the deadline: drop them
        self._drop_queued()
        running = [r for t in late if (r := self.running.get(t)) is not None]
        self._server._sockserve_cut_off(running)
        grace_end = time.monotonic() + CUT_OFF_GRACE
        for thread in late:
            thread.join(max(0.0, grace_end - time.monotonic()))
        return self._dropped
