"""The ``processpool`` concurrency strategy: long-lived worker processes run the handlers.

The parent binds, listens and accepts. Each accepted connection goes to the least busy
worker: the descriptor travels over a Unix ``SOCK_SEQPACKET`` socket pair with
``SCM_RIGHTS`` (``socket.send_fds``), with the pickled client address as the message. The
worker runs the request (handler, hooks, error handling) and answers with one byte when
done, which is how the parent knows how busy each worker is.

Supervision happens on the serving thread: ``service_actions`` reaps a worker that died
and forks a replacement; a dispatch to a dead worker is retried on another one.
``server_close()`` shuts the channels down for writing (workers finish what they were
sent, report it, then exit) and reaps every worker, within ``drain_timeout`` if set, then
SIGTERM and SIGKILL; requests sent and not reported done count in ``requests_cut_off``.
A worker whose parent dies sees its channel close and exits.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import sys
import time
from typing import Any

import attrs

__all__ = ["ProcessPoolMixIn", "PoolOptions"]

log = logging.getLogger("sockserve_processpool")

#: One worker per CPU by default: the handlers' work is what the pool spreads.
DEFAULT_WORKERS = os.cpu_count() or 2
#: A SIGTERMed worker gets this long before SIGKILL when the drain deadline has passed.
TERMINATE_GRACE = 1.0
#: Room for a pickled client address (an AF_UNIX path is at most 108 bytes).
MESSAGE_SIZE = 4096


def _positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"'{attribute.name}' must be an int >= 1 (got {value!r})")


@attrs.define
class PoolOptions:
    """Options of the process pool."""

    workers: int = attrs.field(validator=_positive_int)
    block_on_close: bool = attrs.field(validator=attrs.validators.instance_of(bool))


@attrs.define(eq=False)
class _Worker:
    slot: int
    pid: int
    channel: socket.socket
    inflight: int = 0


class ProcessPoolMixIn:
    """Serve requests in a pool of ``workers`` long-lived processes (stream transports)."""

    sockserve_options = PoolOptions
    #: Number of worker processes.
    workers = DEFAULT_WORKERS
    #: server_close() waits for the workers to finish what they were sent.
    block_on_close = True
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

    def _spawn(self, slot: int, dispatching: Any = None) -> _Worker:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            status = 1
            try:
                parent_end.close()
                for other in self._pool or ():
                    other.channel.close()  # inherited ends of the other workers' channels
                if dispatching is not None:
                    dispatching.close()  # forked mid-dispatch: the connection is not ours
                status = self._worker_main(slot, child_end)
            except BaseException:
                log.exception("worker %d (pid %d) failed", slot, os.getpid())
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(status)
        child_end.close()
        return _Worker(slot, pid, parent_end)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to the least busy worker; the parent closes its copy."""
        self._start_pool()
        self._collect_done()
        message = pickle.dumps(client_address)
        for _ in range(len(self._pool) + 1):
            worker = min(self._pool, key=lambda w: w.inflight)
            try:
                socket.send_fds(worker.channel, [message], [request.fileno()])
            except OSError:
                self._replace(worker, "its channel failed", dispatching=request)
                continue
            worker.inflight += 1
            break
        else:
            raise RuntimeError("no worker process could take the request")
        self.close_request(request)  # type: ignore[attr-defined]

    def _collect_done(self, workers: list[_Worker] | None = None) -> None:
        if workers is None:
            workers = self._pool or []
        for worker in workers:
            while True:
                try:
                    done = worker.channel.recv(64, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                if not done:
                    break
                worker.inflight -= len(done)
                # Per slot, across replacements of the worker in that slot.
                self.worker_requests[worker.slot] = self.worker_requests.get(worker.slot, 0) + len(done)

    def service_actions(self) -> None:
        """Account finished requests and replace workers that died."""
        super().service_actions()  # type: ignore[misc]
        if not self._pool or self._pool_closing:
            return
        self._collect_done()
        for worker in list(self._pool):
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = worker.pid, 0
            if pid:
                self._replace(worker, f"it exited with status {os.waitstatus_to_exitcode(status)}", reaped=True)

    def _replace(
        self, worker: _Worker, why: str, reaped: bool = False, dispatching: Any = None
    ) -> None:
        log.warning("worker %d (pid %d) is replaced: %s", worker.slot, worker.pid, why)
        worker.channel.close()
        if not reaped:
            try:
                os.kill(worker.pid, signal.SIGKILL)
                os.waitpid(worker.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        index = self._pool.index(worker)
        self._pool[index] = self._spawn(worker.slot, dispatching)

    def server_close(self) -> None:
        """Close the server, then stop and reap every worker."""
        super().server_close()  # type: ignore[misc]
        pool, self._pool = self._pool, None
        if not pool:
            return
        self._pool_closing = True
        for worker in pool:
            try:  # EOF: the worker finishes what it has and exits
                worker.channel.shutdown(socket.SHUT_WR)  # its "done" bytes still come back
            except OSError:
                pass
        try:
            self._stop_workers(pool)
        finally:
            for worker in pool:
                worker.channel.close()

    def _stop_workers(self, pool: list[_Worker]) -> None:
        if self.block_on_close:
            drain = self.drain_timeout  # type: ignore[attr-defined]
            deadline = None if drain is None else time.monotonic() + drain
            pending = self._wait(pool, deadline)
        else:
            pending = pool
        if pending:
            self._collect_done(pending)
            # Requests still running (sent and not reported done) are cut off, not workers.
            self.requests_cut_off += sum(max(0, w.inflight) for w in pending)  # type: ignore[attr-defined]
            for sig, wait in ((signal.SIGTERM, TERMINATE_GRACE), (signal.SIGKILL, None)):
                for worker in pending:
                    try:
                        os.kill(worker.pid, sig)
                    except ProcessLookupError:
                        pass
                pending = self._wait(
                    pending, None if wait is None else time.monotonic() + wait
                )
                if not pending:
                    break

    @staticmethod
    def _wait(workers: list[_Worker], deadline: float | None) -> list[_Worker]:
        pending = list(workers)
        while pending:
            for worker in list(pending):
                try:
                    pid, _ = os.waitpid(worker.pid, 0 if deadline is None else os.WNOHANG)
                except ChildProcessError:
                    pid = worker.pid
                if pid:
                    pending.remove(worker)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(0.01)
        return pending

    # ------------------------------------------------------------ worker side

    def _worker_main(self, slot: int, channel: socket.socket) -> int:
        # The parent decides when the pool stops (Ctrl-C reaches the whole process group).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            self.socket.close()  # type: ignore[attr-defined]  # only the parent accepts
        except OSError:
            pass
        self._pool = None
        self._pool_closing = True
        self.call_hook("serve_start")  # type: ignore[attr-defined]
        try:
            while True:
                try:
                    message, fds, _, _ = socket.recv_fds(channel, MESSAGE_SIZE, 1)
                except InterruptedError:
                    continue
                except OSError:
                    return 0  # the parent is gone
                if not message and not fds:
                    return 0  # the parent closed the channel: stop
                client_address = pickle.loads(message)
                request = socket.socket(fileno=fds[0])
                try:
                    self.run_request(request, client_address)  # type: ignore[attr-defined]
                finally:
                    try:
                        channel.send(b"d")
                    except OSError:
                        return 0
        finally:
            self.call_hook("serve_stop")  # type: ignore[attr-defined]
