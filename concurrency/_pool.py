"""A bounded pool of request threads, for the ``threadpool`` strategy (and prefork's workers).

The serving thread submits accepted requests; a fixed set of worker threads runs them.
At most ``size`` requests run at once and at most ``backlog`` more wait in the queue.
When the pool is full the server pauses accepting (``pause_accepting``) and a worker
that frees a place resumes it, so the kernel's listen backlog holds the rest instead of
memory growing without bound, and the serving thread never blocks: shutdown, wake-ups
and ``service_actions`` go on while the pool is full.

The hand-off goes through two ``queue.SimpleQueue`` objects (implemented in C): one of
requests, and one of free places ("room"), filled with ``size + backlog`` tokens. The
serving thread takes a token with each request and a worker gives it back when the
request is done: a few C calls per request (benchmarks/THROUGHPUT.md has the profile).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from ..core._contract import Server
from ._drain import wait_threads

__all__ = ["ThreadPool"]

log = logging.getLogger("sockserve")

#: In the request queue: the worker that gets it stops.
_STOP = None


class ThreadPool:
    """Run ``server.run_request`` for submitted requests on *size* threads.

    :param server: the server whose requests run here.
    :param size: number of worker threads.
    :param backlog: requests that may wait for a free worker.
    :param daemon: make the worker threads daemon threads.
    """

    def __init__(self, server: Server, size: int, backlog: int, daemon: bool = False) -> None:
        self._server = server
        # Items: (request, client_address, holds_a_token), or _STOP.
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._room: queue.SimpleQueue[bool] = queue.SimpleQueue()
        for _ in range(size + backlog):
            self._room.put(True)
        self._size, self._backlog = size, backlog
        self._paused = False  # the pool paused accepting; the next free place resumes it
        self._dropping = False  # close(): deny queued requests instead of running them
        self._threads = [
            threading.Thread(target=self._work, name=f"sockserve-pool-{i}", daemon=daemon)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for a thread now (read-only; for metrics, any thread)."""
        return self._requests.qsize()

    @property
    def busy(self) -> int:
        """Threads running a request now (read-only; for metrics, any thread).

        Derived from the two queues, so that the request path pays nothing for it: while
        requests wait every thread is busy, otherwise each place taken is a running one.
        """
        if self._requests.qsize():
            return self._size
        return min(self._size, self._size + self._backlog - self._room.qsize())

    def submit(self, request: Any, client_address: Any) -> None:
        """Queue a request (serving thread); pause accepting when that filled the pool.

        Never blocks. A request that arrives with the pool full (accepted before the
        pause took effect) is queued over the limit: nothing accepted is lost.
        """
        room = self._room
        try:
            token = room.get_nowait()
        except queue.Empty:
            token = False
        if room.qsize() < self._backlog:  # every thread is busy: this one waits
            self._saturated()
        self._requests.put((request, client_address, token))
        if room.empty():
            server = self._server
            self._paused = True
            server.pause_accepting()
            if not room.empty():  # a worker gave a place back meanwhile
                self._paused = False
                server.resume_accepting()

    def _saturated(self) -> None:
        """A request waits for a thread: count it (``limits_reached["threads"]``); the
        first time, say why, since keep-alive clients make it happen quietly."""
        reached = self._server.limits_reached
        reached["threads"] += 1
        if reached["threads"] == 1:
            log.warning(
                "%s: all %d threads busy; requests wait for one (a keep-alive connection "
                "holds a thread while it stays open: raise threads, or set idle_timeout)",
                type(self._server).__name__, self._size,
            )

    def _work(self) -> None:
        me = threading.current_thread()
        get = self._requests.get
        server = self._server
        run = server.run_request
        give_back = self._room.put
        while True:
            item = get()
            if item is _STOP:
                return
            request, client_address, token = item
            if self._dropping:
                server.deny_request(request, client_address, "closing")
            else:
                try:
                    run(request, client_address)
                except BaseException:  # run_request handled Exceptions; keep the worker alive
                    log.exception("request thread %s: unexpected error", me.name)
            if token:
                give_back(True)
                if self._paused:
                    self._paused = False
                    server.resume_accepting()

    def _drop_queued(self) -> None:
        """Deny every request still queued; stop signals already queued stay queued."""
        self._dropping = True
        stops = 0
        while True:
            try:
                item = self._requests.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stops += 1
            else:
                self._server.deny_request(item[0], item[1], "closing")
        for _ in range(stops):
            self._requests.put(_STOP)

    def close(self, wait: bool, deadline: float | None) -> None:
        """Stop the workers; with *wait*, let queued and running requests finish first.

        Without *wait*, requests still queued are denied unrun (``closing``). With
        *deadline* (a monotonic time), requests not started by then are denied and those
        still running have their connections cut off (``requests_cut_off``).
        """
        if not wait:
            self._drop_queued()
        for _ in self._threads:
            self._requests.put(_STOP)  # after the queued requests: those run first
        if not wait:
            return
        # Requests not started by the deadline are denied before the running ones are
        # cut off.
        late = wait_threads(self._server, self._threads, deadline, before_cut_off=self._drop_queued)
        if late:
            log.error("%s: %d pool thread(s) did not stop", type(self._server).__name__, late)
