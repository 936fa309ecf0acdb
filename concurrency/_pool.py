"""A bounded pool of request threads, shared by the ``threadpool`` and ``prefork`` strategies.

The serving thread submits accepted requests; a fixed set of worker threads runs them.
At most ``size`` requests run at once and at most ``backlog`` more wait in the queue;
beyond that ``submit`` blocks, so the serving thread stops accepting and the kernel's
listen backlog holds the rest instead of memory growing without bound.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

__all__ = ["ThreadPool"]

log = logging.getLogger("sockserve")

#: Seconds a worker gets to return after its connection was cut off at the drain deadline.
CUT_OFF_GRACE = 1.0


class ThreadPool:
    """Run ``server.run_request`` for submitted requests on *size* threads.

    :param server: the server whose requests run here.
    :param size: number of worker threads.
    :param backlog: requests that may wait for a free worker.
    :param daemon: make the worker threads daemon threads.
    """

    def __init__(self, server: Any, size: int, backlog: int, daemon: bool = False) -> None:
        self._server = server
        self._size = size
        self._queue: deque[tuple[Any, Any]] = deque()
        # Running plus waiting requests may not exceed size + backlog.
        self._limit = size + backlog
        self._in_pool = 0
        # Reentrant: a prefork worker's SIGTERM handler calls shutdown() -> interrupt() in
        # the serving thread, which may be interrupted while it holds this lock in submit().
        lock = threading.RLock()
        self._ready = threading.Condition(lock)  # workers wait here for requests
        self._space = threading.Condition(lock)  # submit waits here for room
        self._closing = False
        #: The request each worker is running (None when idle), for cut-off at a deadline.
        self.running: dict[threading.Thread, Any] = {}
        self._threads = [
            threading.Thread(target=self._work, name=f"sockserve-pool-{i}", daemon=daemon)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, request: Any, client_address: Any) -> None:
        """Queue a request; block while ``size + backlog`` requests are in the pool.

        Once the server's shutdown has been asked for, the request is queued over the
        limit instead, so that a shutdown is not held up by a full pool and nothing
        accepted is lost.
        """
        server = self._server
        with self._ready:
            while self._in_pool >= self._limit and not server._sockserve_shutdown_request:
                self._space.wait()
            self._in_pool += 1
            self._queue.append((request, client_address))
            self._ready.notify()

    def wait_for_room(self) -> bool:
        """Wait until another request fits in the pool; False once shutdown is asked for.

        The serving thread calls this before it accepts, so that a full pool leaves new
        connections in the kernel's listen backlog instead of accepting and holding them.
        """
        server = self._server
        with self._ready:
            while self._in_pool >= self._limit:
                # Read under the pool's lock: interrupt() takes it after shutdown() set
                # the flag, so either we see the flag here or its notify wakes us.
                if server._sockserve_shutdown_request:
                    return False
                self._space.wait()
            return True

    def interrupt(self) -> None:
        """Wake the serving thread waiting for room (shutdown() has set its flag)."""
        with self._ready:
            self._space.notify_all()

    def _work(self) -> None:
        me = threading.current_thread()
        queue = self._queue
        ready = self._ready
        run = self._server.run_request
        space = self._space
        while True:
            with ready:
                while not queue:
                    if self._closing:
                        return
                    ready.wait()
                request, client_address = queue.popleft()
                self.running[me] = request
            try:
                run(request, client_address)
            except BaseException:  # run_request handled Exceptions; keep the worker alive
                log.exception("request thread %s: unexpected error", me.name)
            finally:
                self.running[me] = None
                with ready:
                    self._in_pool -= 1
                    space.notify()

    def close(self, wait: bool, deadline: float | None) -> int:
        """Stop the workers; with *wait*, let queued and running requests finish first.

        Without *wait*, requests still queued are shut down unhandled. With *deadline*
        (a monotonic time), requests still running then have their connections cut off.

        :returns: the number of queued requests dropped unhandled (requests cut off while
            running are counted by the server's ``requests_cut_off``).
        """
        dropped = 0
        with self._ready:
            self._closing = True
            if not wait:
                while self._queue:
                    request, _ = self._queue.popleft()
                    self._server.shutdown_request(request)
                    self._in_pool -= 1
                    dropped += 1
            self._ready.notify_all()
        if not wait:
            return dropped
        for thread in self._threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        late = [t for t in self._threads if t.is_alive()]
        if not late:
            return dropped
        with self._ready:
            while self._queue:  # not started by the deadline: drop them
                request, _ = self._queue.popleft()
                self._server.shutdown_request(request)
                self._in_pool -= 1
                dropped += 1
        running = [r for t in late if (r := self.running.get(t)) is not None]
        self._server._sockserve_cut_off(running)
        grace_end = time.monotonic() + CUT_OFF_GRACE
        for thread in late:
            thread.join(max(0.0, grace_end - time.monotonic()))
        return dropped
