"""Supervised worker slots: the parent's side of prefork supervision, and the worker's pipe.

Belongs here: what the parent knows of its workers (starting, ready, stopping, aborted),
what they report over their status pipes, rolling replacement, heartbeat timeouts,
scaling and start-up failure. Not here: forking and stop signals (``_supervise``), the
drain (``_drain``), the server itself (``_prefork``).

Each worker gets a pipe of its own at its fork and writes single bytes to it
(``WorkerStatus``): ``R`` once it serves (after ``after_fork`` and
``sockserve_post_fork``), ``.`` at most every ``HEARTBEAT`` seconds from its serve loop,
``S`` when its serve loop ended (it drains: no more heartbeats), and ``E`` followed by one
line when it fails before serving (the cause, for the parent's error). The parent reads
every pipe, without blocking, on each ``supervise()`` turn. A pipe and not a file:
gunicorn's heartbeat files time workers out on slow disks (gunicorn#1194).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import attrs

from ..core import Server, count, seconds
from ._drain import TERMINATE_GRACE, drain_deadline, reap, stop_processes
from ._supervise import stop_listening, stop_on_signals

__all__ = [
    "ABORT_KILL_DELAY",
    "HEARTBEAT",
    "RESPAWN_DELAY",
    "SPAWN_SPREAD",
    "SupervisionOptions",
    "WorkerBootError",
    "WorkerSlots",
    "WorkerStatus",
    "heartbeat_interval",
    "request_limit",
    "run_worker",
    "write_stacks_on_abort",
]

log = logging.getLogger("sockserve")

#: A worker that fails sooner than this after its fork (once its slot served before) is
#: replaced only after this delay, so a worker that keeps crashing does not fork in a loop.
RESPAWN_DELAY = 1.0
#: Seconds between a worker's heartbeats: often enough for a ``worker_timeout`` of a few
#: seconds, rare enough to cost nothing (one write per second, not per request).
HEARTBEAT = 1.0
#: Seconds between SIGABRT (write the stacks and die) and SIGKILL for a stuck worker.
ABORT_KILL_DELAY = 5.0
#: Each spawn waits a random part of this many seconds, so that workers started together
#: (at start-up, or recycled by max_requests at the same moment) do not all load their
#: code and open their connections at the same instant.
SPAWN_SPREAD = 0.1

#: The parent's loop turns this often at least, so that a ready report or an exit is
#: acted on within 0.1 s (a rolling reload waits for one per worker). Idle, ten turns a
#: second of a few system calls each cost nothing measurable.
SUPERVISE_INTERVAL = 0.1
#: A worker whose serve loop sent no heartbeat for this long is stuck: gunicorn's default.
WORKER_TIMEOUT = 30.0
#: A new worker must report ready within this long; importing a large application and
#: opening its connections can take seconds, and a worker stuck loading must not
#: hold a reload or the start forever.
WORKER_BOOT_TIMEOUT = 30.0

READY, BEAT, STOPPING, FAILED = b"R", b".", b"S", b"E"
#: The most of a failing worker's traceback its report carries (the end, where the error is).
MAX_REPORT = 16_000
#: Exit reasons after which the slot is filled again; the others ("reload", "scale",
#: "stop") mean the slot has a new worker already or is gone.
REFILLED = frozenset({"max_requests", "timeout", "crash"})


@attrs.define
class SupervisionOptions:
    """The options of a strategy with supervised worker processes (prefork's, and a
    third party's pool that uses ``WorkerSlots``: subclass it and ``declare_options``)."""

    #: A worker exits and is replaced after this many requests; 0 never.
    max_requests: int = count(0, default=0)
    #: Each worker adds a random 0 to this many to ``max_requests``: they recycle apart.
    max_requests_jitter: int = count(0, default=0)
    #: Seconds without a heartbeat from a worker's serve loop before it is aborted; None off.
    worker_timeout: float | None = seconds(default=WORKER_TIMEOUT)
    #: Seconds a new worker has to report ready; None: as long as it takes.
    worker_boot_timeout: float | None = seconds(default=WORKER_BOOT_TIMEOUT)


class WorkerBootError(RuntimeError):
    """Raised from the supervisor's serve loop when workers failed before they served.

    Every slot got one try; at least one worker exited, or did not report ready within
    ``worker_boot_timeout``, before it served. The message names the slots and causes.
    """


class WorkerStatus:
    """The worker's end of its status pipe: ``ready()``, ``beat()``, ``stopping()``,
    ``failed(exc)``. Writes never block the worker for long and never raise."""

    def __init__(self, fd: int, parent: int, interval: float = HEARTBEAT) -> None:
        self.fd, self.parent, self.interval, self._next = fd, parent, interval, 0.0

    def _write(self, data: bytes) -> None:
        try:
            os.write(self.fd, data)
        except OSError:  # the parent is gone or stopped reading: nothing to tell
            pass

    def ready(self) -> None:
        """Tell the parent that this worker serves."""
        self._next = time.monotonic() + self.interval
        self._write(READY)

    def beat(self) -> bool:
        """From each turn of the serve loop: a heartbeat, at most once per ``interval``.

        :returns: False once the parent is gone (the worker should stop).
        """
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval
            self._write(BEAT)
        return os.getppid() == self.parent

    def stopping(self) -> None:
        """Tell the parent that the serve loop ended: this worker drains, then exits."""
        self._write(STOPPING)

    def failed(self, exc: BaseException) -> None:
        """Tell the parent why this worker could not start: one line, then the traceback
        (the parent logs them once; the worker does not log them itself)."""
        summary = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
        trace = "".join(traceback.format_exception(exc))[-MAX_REPORT:]
        self._write(FAILED + f"{summary}\n{trace}".encode("utf-8", "replace"))


@attrs.define(eq=False)
class Worker:
    """The parent's record of one worker process."""

    pid: int
    slot: int
    fd: int  # the read end of its status pipe
    started: float
    state: str = "starting"  # "starting", "ready" or "stopping"
    beat: float = 0.0
    #: Why the parent asked it to stop ("reload", "scale", "timeout", "stop"), if it did.
    reason: str | None = None
    asked: float = 0.0  # when it was asked to stop (or aborted)
    killed: bool = False  # SIGKILL was sent
    report: bytes = b""  # what it wrote after FAILED

    failing: bool = False  # it wrote FAILED: the rest is its report

    def take(self, data: bytes) -> bytes:
        """Add what the worker wrote to its pipe; return the status bytes in it."""
        if self.failing:
            self.report += data
            return b""
        control, failed, report = data.partition(FAILED)
        if failed:
            self.failing, self.report = True, report
        return control


class WorkerSlots:
    """*count* worker slots of *server*, each filled by ``start(slot, status_fd) -> pid``.

    ``fill()`` starts them; ``supervise()`` (from the parent's ``service_actions``) reads
    the workers' reports, reaps exited ones (``sockserve_worker_exit`` with the reason)
    and refills their slots, aborts workers whose heartbeat stopped for *timeout* seconds,
    and carries out ``replace()`` (a rolling reload) and ``scale()``; ``stop()`` sends
    every worker SIGTERM and waits until the drain deadline, then SIGKILL. *start* runs
    in the parent: it forks a child that writes to *status_fd* through a
    ``WorkerStatus``. ``sockserve_pre_fork`` fires before each start,
    ``sockserve_worker_ready`` when a worker reports that it serves.

    Start-up: a worker that exits or stays silent for *boot_timeout* seconds before it
    served, in a slot that never served, is not retried: once every slot had its try,
    ``supervise()`` raises ``WorkerBootError`` (the supervisor stops, no fork loop).
    """

    def __init__(self, server: Server, count: int, start: Callable[[int, int], int], *,
                 timeout: float | None = None, boot_timeout: float | None = None) -> None:
        self.server, self.count, self._start = server, count, start
        self.timeout, self.boot_timeout = timeout or None, boot_timeout
        self.workers: dict[int, Worker] = {}  # pid -> Worker
        self.stopping = False
        self._due: list[tuple[float, int]] = []  # (monotonic time, slot) to start
        self._booting: set[int] = set()  # slots that have not served yet
        self._boot_failures: dict[int, str] = {}
        self._lock = threading.Lock()  # guards the requests below, made from any thread
        self._scale = 0
        # Reloads are numbered: each replace() asks for one; a reload that starts covers
        # every ask made before it started. Waiters wait until theirs is covered.
        self._asked = self._running = self._finished = 0
        self._result = True
        self._finished_cond = threading.Condition(self._lock)
        self._old: list[int] = []  # pids the running reload still has to replace
        self._incoming: tuple[int, int, float] | None = None  # (new pid, old pid, deadline)
        self._outgoing: int | None = None  # the old pid asked to stop, not reaped yet
        self._restore_signals: dict[int, Any] = {}

    @property
    def children(self) -> dict[int, tuple[int, float]]:
        """pid -> (slot, monotonic start time) of the running workers."""
        return {pid: (w.slot, w.started) for pid, w in self.workers.items()}

    def ready_count(self) -> int:
        """How many workers serve now (reported ready, not asked to stop)."""
        return sum(w.state == "ready" for w in self.workers.values())

    # ------------------------------------------------------------------ starting

    def fill(self) -> None:
        """Start a worker in every slot (each after a random part of ``SPAWN_SPREAD``)."""
        if any(sock.fileno() == -1 for sock in getattr(self.server, "listeners", ())):
            raise RuntimeError(f"{type(self.server).__name__} stopped and closed its listening "
                               "sockets: it does not serve again (make a new server)")
        now = time.monotonic()
        self._booting = set(range(self.count))
        delays = sorted(random.uniform(0, SPAWN_SPREAD) for _ in range(1, self.count))
        self._due = [(now + delay, slot) for slot, delay in enumerate(delays, 1)]  # in order
        self._spawn(0)

    def _spawn(self, slot: int) -> int:
        self.server.call_hook("pre_fork", worker_id=slot)
        read_fd, write_fd = os.pipe()
        try:
            pid = self._start(slot, write_fd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.workers[pid] = Worker(pid, slot, read_fd, time.monotonic())
        return pid

    def close_in_child(self) -> None:
        """In a forked worker: close the parent's ends of every status pipe, give the
        signals ``signals()`` set their handlers back, and ignore SIGHUP: a reload is the
        supervisor's (a terminal's hangup reaches the whole process group)."""
        for worker in self.workers.values():
            os.close(worker.fd)
        self.workers.clear()
        for sig, handler in self._restore_signals.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _start_due(self, now: float) -> None:
        if self.stopping or not self._due:
            return
        due = [slot for t, slot in self._due if t <= now]
        self._due = [(t, s) for t, s in self._due if t > now]
        for slot in due:
            if slot < self.count:  # not scaled away meanwhile
                self._spawn(slot)

    # ------------------------------------------------------------------ supervising

    def supervise(self) -> None:
        """One turn: reports, exits, heartbeats, reload and scale steps, due starts."""
        now = time.monotonic()
        self._read_reports(now)
        for pid, code in reap(set(self.workers)):
            self._exited(pid, code)
        if self.stopping:
            return
        self._check_boot()
        self._check_times(now)
        self._scale_step()
        self._reload_step(now)
        self._start_due(now)

    def _read_reports(self, now: float) -> None:
        for worker in list(self.workers.values()):
            try:
                data = os.read(worker.fd, 4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                continue
            worker.beat = now
            control = worker.take(data)
            if worker.state == "starting" and READY in control:
                worker.state = "ready"
                self._booting.discard(worker.slot)
                log.info("worker %d (pid %d) ready", worker.slot, worker.pid)
                self.server.call_hook("worker_ready", worker_id=worker.slot, pid=worker.pid)
            if STOPPING in control and worker.state == "ready":
                worker.state, worker.asked = "stopping", now  # recycling itself: it drains

    def _exited(self, pid: int, code: int) -> None:
        worker = self.workers.pop(pid)
        self._read_last(worker)
        os.close(worker.fd)
        if self.stopping:
            reason = "stop"
        elif worker.reason is not None:
            reason = worker.reason
        else:
            reason = "max_requests" if code == 0 and worker.state != "starting" else "crash"
        self.server.call_hook("worker_exit", worker_id=worker.slot, status=code, reason=reason,
                              pid=pid)
        if self.stopping:
            return
        report = worker.report.decode("utf-8", "replace").strip() or f"exit status {code}"
        cause, _, trace = report.partition("\n")
        if worker.state == "starting" and worker.slot in self._booting and reason == "crash":
            log.error("worker %d (pid %d) failed at start-up: %s", worker.slot, pid, report)
            self._boot_failures[worker.slot] = f"worker {worker.slot} (pid {pid}): {cause}"
            return  # not retried: start-up failures end the supervisor (_check_boot)
        if self._incoming is not None and self._incoming[0] == pid:
            self._abort_reload(f"its replacement (pid {pid}) failed before it served: {cause}", trace)
            return
        if pid == self._outgoing:
            self._outgoing = None
        if pid in self._old:
            self._old.remove(pid)
        if reason not in REFILLED:
            log.info("worker %d (pid %d) exited (%s)", worker.slot, pid, reason)
            return
        if reason == "crash":
            log.warning("worker %d (pid %d) exited with status %d; replacing it", worker.slot, pid, code)
        else:
            log.info("worker %d (pid %d) exited (%s); replacing it", worker.slot, pid, reason)
        young = reason == "crash" and time.monotonic() - worker.started < RESPAWN_DELAY
        delay = RESPAWN_DELAY if young else random.uniform(0, SPAWN_SPREAD)
        self._due.append((time.monotonic() + delay, worker.slot))

    def _read_last(self, worker: Worker) -> None:
        try:
            while data := os.read(worker.fd, 65536):
                worker.take(data)
        except OSError:  # BlockingIOError: nothing more written
            pass

    def _check_boot(self) -> None:
        if self._boot_failures and self._booting <= set(self._boot_failures):
            failures = "; ".join(self._boot_failures[slot] for slot in sorted(self._boot_failures))
            raise WorkerBootError(f"{len(self._boot_failures)} of {self.count} worker(s) failed "
                                  f"at start-up, each tried once: {failures}")

    def _check_times(self, now: float) -> None:
        for worker in list(self.workers.values()):
            if worker.killed:
                continue
            if worker.state == "starting" and self.boot_timeout is not None \
                    and now - worker.started > self.boot_timeout:
                worker.report = worker.report or f"not ready within {self.boot_timeout:g}s".encode()
                worker.killed = True
                _kill(worker.pid, signal.SIGKILL)  # still loading: nothing to drain
            elif worker.state == "ready" and self.timeout is not None and now - worker.beat > self.timeout:
                log.error("worker %d (pid %d): no heartbeat for %.1fs (worker_timeout %gs); "
                          "aborting it (SIGABRT: its stacks follow in the log)",
                          worker.slot, worker.pid, now - worker.beat, self.timeout)
                self._ask(worker, "timeout", signal.SIGABRT, now)
                self.server.call_hook("worker_abort", worker_id=worker.slot, pid=worker.pid)
            elif worker.reason == "timeout" and now - worker.asked > ABORT_KILL_DELAY:
                log.error("worker %d (pid %d) outlived SIGABRT by %gs; killing it",
                          worker.slot, worker.pid, ABORT_KILL_DELAY)
                worker.killed = True
                _kill(worker.pid, signal.SIGKILL)
            elif worker.state == "stopping" and worker.reason != "timeout":
                drain = self.server.drain_timeout
                if drain is not None and now - worker.asked > drain + TERMINATE_GRACE:
                    worker.killed = True  # it enforces its own deadline: this one is late
                    _kill(worker.pid, signal.SIGKILL)

    def _ask(self, worker: Worker, reason: str, sig: int, now: float) -> None:
        worker.state, worker.reason, worker.asked = "stopping", reason, now
        _kill(worker.pid, sig)

    # ------------------------------------------------------------------ scaling

    def scale(self, delta: int) -> None:
        """Ask for *delta* workers more (or fewer, at least one); any thread or signal handler."""
        self._scale += delta  # read and reset on the serving thread

    def _scale_step(self) -> None:
        delta, self._scale = self._scale, 0
        while delta > 0:
            delta -= 1
            self.count += 1
            log.info("%s: one worker more: %d", type(self.server).__name__, self.count)
            self._spawn(self.count - 1)
        while delta < 0:
            delta += 1
            if self.count == 1:
                log.warning("%s: one worker fewer asked for, but at least one must run",
                            type(self.server).__name__)
                break
            self.count -= 1
            log.info("%s: one worker fewer: %d", type(self.server).__name__, self.count)
            for worker in list(self.workers.values()):
                if worker.slot == self.count and worker.state != "stopping":
                    self._ask(worker, "scale", signal.SIGTERM, time.monotonic())

    # ------------------------------------------------------------------ rolling reload

    def replace(self, wait: float | None = None) -> bool:
        """Replace every worker, one at a time (a rolling reload); any thread.

        For each worker: a new one is forked from the server as it is now (after a
        reload, with the new certificates) into its slot; once it reported ready, the
        old one is asked to stop gracefully (SIGTERM: it drains), and the next starts once
        that one exited. There are never fewer ready workers than slots, and at most one
        more process. A replacement that fails or is not ready within ``boot_timeout``
        aborts the reload: it is killed, the old workers left keep serving, the error is
        logged once.

        :param wait: seconds to wait for the outcome (None: do not wait; from the
            serving thread it is never waited for).
        :returns: True if every worker was replaced (or, without waiting, the reload was
            started); False if it was aborted or did not finish within *wait*.
        """
        with self._lock:
            self._asked += 1
            ticket = self._asked
            if wait is None:
                return True
            end = time.monotonic() + wait
            while self._finished < ticket:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._finished_cond.wait(left)
            return self._result

    def _reload_step(self, now: float) -> None:
        if self._running <= self._finished:  # no reload running: start one if asked
            with self._lock:
                if self._asked <= self._finished:
                    return
                self._running = self._asked
            self._old = sorted((w.pid for w in self.workers.values() if w.state == "ready"),
                               key=lambda pid: self.workers[pid].slot)
            log.info("%s: reloading: replacing %d worker(s) one at a time",
                     type(self.server).__name__, len(self._old))
        if self._incoming is not None:
            new, old, deadline = self._incoming
            worker = self.workers.get(new)
            if worker is not None and worker.state == "ready":
                self._incoming = None
                outgoing = self.workers.get(old)
                if outgoing is not None and outgoing.state != "stopping":
                    log.info("reload: worker %d (pid %d) replaced by pid %d; stopping it",
                             outgoing.slot, old, new)
                    self._ask(outgoing, "reload", signal.SIGTERM, now)
                    self._outgoing = old
            elif now > deadline:
                _kill(new, signal.SIGKILL)
                if worker is not None:
                    worker.reason = "crash"
                self._abort_reload(f"its replacement (pid {new}) was not ready within "
                                   f"{self.boot_timeout:g}s")
                return
            else:
                return
        if self._outgoing is not None:
            return  # the old one drains; the next starts once it exited
        while self._old:
            old = self._old.pop(0)
            worker = self.workers.get(old)
            if worker is None or worker.state != "ready":
                continue
            deadline = now + (self.boot_timeout if self.boot_timeout is not None else float("inf"))
            self._incoming = (self._spawn(worker.slot), old, deadline)
            return
        self._finish_reload(True)

    def _abort_reload(self, why: str, trace: str = "") -> None:
        log.error("%s: reload aborted: %s; keeping the old workers%s", type(self.server).__name__,
                  why, f"\n{trace}" if trace else "")
        self._incoming, self._old = None, []
        self._finish_reload(False)

    def _finish_reload(self, done: bool) -> None:
        if done:
            log.info("%s: reload done: %d worker(s) replaced", type(self.server).__name__, self.count)
        with self._lock:
            self._finished, self._result = self._running, done
            self._finished_cond.notify_all()

    # ------------------------------------------------------------------ stopping

    def stop(self) -> int:
        """Stop every worker (SIGTERM, then SIGKILL at the drain deadline); return how
        many had to be killed. The parent's listening sockets are closed first: a stopped
        prefork server does not serve again."""
        self.stopping = True
        stop_listening(self.server)  # the parent never accepts; the workers close theirs
        with self._lock:  # a reload waited for ends now, not done
            self._finished = self._running = self._asked
            self._result = False
            self._finished_cond.notify_all()
        if not self.workers:
            return 0
        return stop_processes(self.server, set(self.workers), drain_deadline(self.server),
                              term_first=True, on_exit=self._exited)

    def signals(self) -> Callable[[], None]:
        """In the parent's main thread: SIGTERM and SIGINT stop gracefully
        (``stop_on_signals``), SIGTTIN / SIGTTOU scale by one, and SIGUSR1 is also sent on
        to every worker (after the handler already set, which reopens log files under
        ``sockserve serve``). Return what restores the handlers."""
        restore_stop = stop_on_signals(self.server)
        if threading.current_thread() is not threading.main_thread():
            return restore_stop
        previous = self._restore_signals = {
            signal.SIGTTIN: signal.signal(signal.SIGTTIN, lambda *_: self.scale(1)),
            signal.SIGTTOU: signal.signal(signal.SIGTTOU, lambda *_: self.scale(-1)),
        }
        before = signal.getsignal(signal.SIGUSR1)
        if callable(before):  # with no handler, SIGUSR1 keeps its meaning (it ends the process)
            def forward(signum: int, frame: Any) -> None:
                before(signum, frame)
                for pid in list(self.workers):
                    _kill(pid, signal.SIGUSR1)

            previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, forward)

        def restore() -> None:
            restore_stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore


def heartbeat_interval(timeout: float | None) -> float:
    """Seconds between a worker's heartbeats for a ``worker_timeout`` of *timeout*."""
    return HEARTBEAT if not timeout else min(HEARTBEAT, timeout / 4)


def write_stacks_on_abort() -> None:
    """In a worker: on SIGABRT (and the other fatal signals) write every thread's stack
    to the log, then die as the signal would have it (``faulthandler``).

    The log is the stream of the first handler of the ``sockserve`` or the root logger that
    writes to a file descriptor, else stderr (descriptor 2). Its descriptor is duplicated:
    a log file reopened later (SIGUSR1) must not leave faulthandler writing to a
    descriptor reused meanwhile (for a client's socket, say).
    """
    streams = [getattr(handler, "stream", None) for logger in (log, logging.getLogger())
               for handler in logger.handlers]
    fd = None
    for stream in [*streams, sys.stderr]:
        try:
            fd = os.dup(stream.fileno())  # type: ignore[union-attr]
            break
        except (OSError, ValueError, AttributeError):  # no descriptor (a StringIO, None)
            continue
    if fd is None:
        fd = os.dup(2)
    global _fault_fd
    if _fault_fd is not None:
        os.close(_fault_fd)
    _fault_fd = fd
    faulthandler.enable(file=fd, all_threads=True)


_fault_fd: int | None = None


def request_limit(options: SupervisionOptions) -> int:
    """In a worker: after how many requests it recycles itself (0: never), ``max_requests``
    plus its own random share of ``max_requests_jitter``."""
    if not options.max_requests:
        return 0
    return options.max_requests + random.randint(0, options.max_requests_jitter)


def run_worker(server: Server, status: WorkerStatus, start: Callable[[], None],
               serve: Callable[[], None]) -> int:
    """In a forked worker: ``start()``, then report ready and ``serve()``; return 0.

    What ``start`` raises is reported to the parent (``status.failed``), which logs it;
    the worker then exits 1: it failed before it served. ``SIGABRT`` writes every thread's stack to the log
    (``write_stacks_on_abort``). When ``serve`` returns or raises, the parent is told
    the worker drains, and the server is closed (its inner strategy drains).
    """
    try:
        write_stacks_on_abort()
        start()
    except BaseException as exc:
        status.failed(exc)  # the parent logs it, once
        return 1
    status.ready()
    try:
        serve()
    finally:
        status.stopping()
        server.server_close()
    return 0


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # exited meanwhile: the next reap reports it
        pass
