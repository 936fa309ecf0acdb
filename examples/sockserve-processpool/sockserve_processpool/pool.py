"""The ``processpool`` concurrency strategy: long-lived worker processes run the handlers.

The parent binds, listens and accepts. Each accepted connection goes to the least busy
worker: the descriptor travels over a Unix ``SOCK_SEQPACKET`` socket pair with
``SCM_RIGHTS`` (``socket.send_fds``), with the pickled client address as the message. The
worker runs the request through ``server.run_request`` (layers, hooks, handler, errors)
and answers with one byte when done, which is how the parent knows how busy each worker
is. The parent keeps its copy of each connection until then, so that the drain can cut
it off at its deadline (``server.cut_off``).

Written against sockserve's public strategy contract only (DESIGN.md section 7):
``after_fork``, ``cut_off``, ``call_hook``, ``run_request`` and the drain helpers of
``sockserve.concurrency``. Supervision happens on the serving thread: ``service_actions``
reaps a worker that died and forks a replacement; a dispatch to a dead worker is retried
on another one. ``server_close()`` shuts the channels down for writing (workers finish
what they were sent, report it, then exit) and reaps every worker, within
``drain_timeout`` if set; then the connections still running are cut off, and workers
that still do not exit get SIGTERM and SIGKILL. A worker whose parent dies sees its
channel close and exits.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import signal
import socket
from typing import Any

import attrs

import sockserve
from sockserve.concurrency import drain_deadline, fork_worker, reap, stop_processes

__all__ = ["ProcessPoolMixIn", "PoolOptions"]

log = logging.getLogger("sockserve_processpool")

#: One worker per CPU by default: the handlers' work is what the pool spreads.
DEFAULT_WORKERS = os.cpu_count() or 2
#: Sent by the parent at the drain deadline: the worker cuts off its request in flight.
CUT_OFF_SIGNAL = signal.SIGUSR1
#: Room for a pickled client address (an AF_UNIX path is at most 108 bytes).
MESSAGE_SIZE = 4096


@attrs.define
class PoolOptions:
    """Options of the process pool, declared with sockserve's public field factories."""

    #: Number of worker processes.
    workers: int = sockserve.count(1, default=DEFAULT_WORKERS)
    #: server_close() waits for the workers to finish what they were sent.
    block_on_close: bool = sockserve.flag(default=True)


@attrs.define(eq=False)
class _Worker:
    slot: int
    pid: int
    channel: socket.socket
    #: The parent's copies of the connections sent and not reported done, oldest first.
    sent: collections.deque[socket.socket] = attrs.field(factory=collections.deque)


@sockserve.declare_options(PoolOptions)
class ProcessPoolMixIn:
    """Serve requests in a pool of ``workers`` long-lived processes (stream transports)."""

    # Options: PoolOptions declares them and their defaults (declare_options makes those
    # the class attributes).
    workers: int
    block_on_close: bool
    _pool: list[_Worker] | None = None
    _pool_closing = False

    # ------------------------------------------------------------ parent side

    def serve_forever(self, *args: Any, **kwargs: Any) -> None:
        self._start_pool()
        super().serve_forever(*args, **kwargs)  # type: ignore[misc]

    def _start_pool(self) -> None:
        if self._pool is None:
            self._pool = []
            self.worker_requests: dict[int, int] = {}
            for slot in range(self.workers):
                self._pool.append(self._spawn(slot))

    def pool_pids(self) -> list[int]:
        """Return the process ids of the current workers."""
        return [w.pid for w in self._pool or ()]

    def _spawn(self, slot: int) -> _Worker:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

        def work(unblock: Any) -> int:  # in the worker; its exit status
            parent_end.close()
            for other in self._pool or ():
                other.channel.close()  # inherited ends of the other workers' channels
                for connection in other.sent:
                    connection.close()  # the parent's copies: not this worker's
            return self._worker_main(slot, child_end, unblock)

        # Stop signals stay blocked in the worker until it has set its own handlers.
        pid = fork_worker(work)
        child_end.close()
        return _Worker(slot, pid, parent_end)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to the least busy worker; keep a copy until it is done."""
        self._start_pool()
        self._collect_done()
        message = pickle.dumps(client_address)
        for _ in range(len(self._pool) + 1):
            worker = min(self._pool, key=lambda w: len(w.sent))
            try:
                socket.send_fds(worker.channel, [message], [request.fileno()])
            except OSError:
                self._replace(worker, "its channel failed")
                continue
            worker.sent.append(request)
            return
        raise RuntimeError("no worker process could take the request")

    def _collect_done(self, workers: list[_Worker] | None = None) -> None:
        for worker in self._pool or [] if workers is None else workers:
            while True:
                try:
                    done = worker.channel.recv(64, socket.MSG_DONTWAIT)
                except OSError:  # BlockingIOError: nothing reported yet
                    break
                if not done:
                    break
                for _ in done:
                    if worker.sent:
                        self.close_request(worker.sent.popleft())
                # Per slot, across replacements of the worker in that slot.
                self.worker_requests[worker.slot] = self.worker_requests.get(worker.slot, 0) + len(done)

    def service_actions(self) -> None:
        """Account finished requests and replace workers that died."""
        super().service_actions()
        if not self._pool or self._pool_closing:
            return
        self._collect_done()
        by_pid = {worker.pid: worker for worker in self._pool}
        for pid, code in reap(set(by_pid)):
            self._replace(by_pid[pid], f"it exited with status {code}", reaped=True)

    def _replace(self, worker: _Worker, why: str, reaped: bool = False) -> None:
        log.warning("worker %d (pid %d) is replaced: %s", worker.slot, worker.pid, why)
        worker.channel.close()
        for connection in worker.sent:  # lost with the worker
            self.shutdown_request(connection)
        if not reaped:
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            reap({worker.pid}, block=True)
        index = self._pool.index(worker)
        self._pool[index] = self._spawn(worker.slot)

    def server_close(self) -> None:
        """Close the server, then stop and reap every worker."""
        super().server_close()
        pool, self._pool = self._pool, None
        if not pool:
            return
        self._pool_closing = True
        for worker in pool:
            try:  # EOF: the worker finishes what it has and exits
                worker.channel.shutdown(socket.SHUT_WR)  # its "done" bytes still come back
            except OSError:
                pass

        def cut_off() -> None:
            # Each busy worker cuts off the request it runs (its oldest) and denies the
            # ones queued behind it; the parent cannot see which, so it counts the first.
            self._collect_done(pool)
            busy = [worker for worker in pool if worker.sent]
            for worker in busy:
                try:
                    os.kill(worker.pid, CUT_OFF_SIGNAL)
                except ProcessLookupError:
                    pass
            self.requests_cut_off += len(busy)

        deadline = drain_deadline(self) if self.block_on_close else 0.0
        try:
            stop_processes(self, {w.pid for w in pool}, deadline, cut_off=cut_off)
        finally:
            for worker in pool:
                worker.channel.close()
                for connection in worker.sent:
                    self.close_request(connection)

    # ------------------------------------------------------------ worker side

    def _worker_main(self, slot: int, channel: socket.socket, unblock: Any) -> int:
        # The parent decides when the pool stops (Ctrl-C reaches the whole process group).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        unblock()
        self.after_fork()  # this process's own serving state, not the parent's
        cut = False

        def cut_off(signum: int, frame: Any) -> None:
            nonlocal cut
            cut = True
            self.cut_off(self.in_flight)

        signal.signal(CUT_OFF_SIGNAL, cut_off)
        try:
            self.socket.close()  # only the parent accepts
        except OSError:
            pass
        self._pool = None
        self._pool_closing = True
        self.call_hook("serve_start")
        try:
            while True:
                try:
                    message, fds, _, _ = socket.recv_fds(channel, MESSAGE_SIZE, 1)
                except OSError:
                    return 0  # the parent is gone
                if not message and not fds:
                    return 0  # the parent closed the channel: stop
                client_address = pickle.loads(message)
                request = socket.socket(fileno=fds[0])
                try:
                    if cut:  # past the parent's drain deadline: do not start it
                        self.deny_request(request, client_address, "closing")
                    else:
                        self.run_request(request, client_address)
                finally:
                    try:
                        channel.send(b"d")
                    except OSError:
                        return 0
        finally:
            self.call_hook("serve_stop")
