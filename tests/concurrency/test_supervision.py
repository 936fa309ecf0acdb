"""prefork supervision (issue 10): ready reports, rolling reloads, stuck workers, start-up
failure, recycling with jitter, scaling. In-process servers; tests/test_operations.py runs
the same through ``sockserve serve`` and its signals."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import sockserve
from sockserve.concurrency import WorkerBootError
from support import child_pids, no_stray_children, read_line, requires_fork, serving, start_serving, wait_until

pytestmark = [requires_fork, pytest.mark.requires_fork]

LOOPBACK = ("127.0.0.1", 0)


@pytest.fixture(autouse=True)
def no_stray_workers():
    """Fail, and kill by pid, any worker process a test leaves running."""
    with no_stray_children():
        yield


class PidHandler(sockserve.StreamRequestHandler):
    """Answers each line with ``<pid> <LINE>``; ``hang`` sleeps (as good as forever);
    ``hang-ignoring-abort`` first ignores SIGABRT (inner sync: the worker's main thread)."""

    def handle(self):
        line = self.rfile.readline().strip()
        if line == b"hang":
            hang_here()
        if line == b"hang-ignoring-abort":
            signal.signal(signal.SIGABRT, signal.SIG_IGN)
            hang_here()
        self.wfile.write(b"%d %s\n" % (os.getpid(), line.upper()))


def hang_here():
    time.sleep(60)


def ask(address, payload: bytes = b"hi", timeout: float = 5.0) -> int:
    """One request on a new connection; the pid of the worker that answered."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(payload + b"\n")
        data = read_line(sock)
    pid, text = data.split()
    assert text == payload.upper()
    return int(pid)


class Events:
    """Records the supervision hooks as the parent fires them, in order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple] = []

    def _add(self, *event) -> None:
        with self.lock:
            self.events.append((time.monotonic(), *event))

    def of(self, name: str) -> list[tuple]:
        with self.lock:
            return [e[1:] for e in self.events if e[1] == name]

    @sockserve.hookimpl
    def sockserve_worker_ready(self, server, worker_id, pid):
        self._add("ready", worker_id, pid)

    @sockserve.hookimpl
    def sockserve_worker_abort(self, server, worker_id, pid):
        self._add("abort", worker_id, pid)

    @sockserve.hookimpl
    def sockserve_worker_exit(self, server, worker_id, status, reason):
        self._add("exit", worker_id, status, reason)


def prefork(events: Events, **options):
    options.setdefault("workers", 3)
    return sockserve.compose("tcp", "prefork", plugins=[events], options=options)


def test_every_worker_reports_ready_once_it_serves():
    events = Events()
    with serving(prefork(events)(LOOPBACK, PidHandler)) as server:
        assert wait_until(lambda: len(events.of("ready")) == 3)
        ready = events.of("ready")
        assert sorted(slot for _, slot, _ in ready) == [0, 1, 2]
        assert {pid for _, _, pid in ready} == child_pids()
        assert ask(server.server_address) in {pid for _, _, pid in ready}
    assert sorted(reason for *_, reason in events.of("exit")) == ["stop"] * 3


def test_reload_replaces_workers_one_at_a_time_each_ready_before_the_old_one_stops():
    events = Events()
    server = prefork(events)(LOOPBACK, PidHandler)
    counts: list[int] = []
    with serving(server):
        assert wait_until(lambda: len(events.of("ready")) == 3)
        old = child_pids()
        watching = threading.Event()

        def watch() -> None:
            while not watching.is_set():
                counts.append(len(child_pids()))
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        started = time.monotonic()
        try:
            assert server.reload() is True
        finally:
            watching.set()
            watcher.join()
        took = time.monotonic() - started
        assert wait_until(lambda: len(child_pids()) == 3)
        new = child_pids()
        assert not new & old, "every worker was replaced"
        assert {ask(server.server_address) for _ in range(10)} <= new
    assert took < 5, took
    assert max(counts) <= 4 and min(counts) >= 3, Counter(counts)
    # Each old worker stopped (reason reload) only after a replacement in its slot was ready.
    timeline = [e for e in events.events if e[1] in ("ready", "exit")]
    for slot in range(3):
        slot_events = [e[1] for e in timeline if e[2] == slot]
        assert slot_events[:3] == ["ready", "ready", "exit"], slot_events
    reload_exits = [e for e in events.of("exit") if e[3] == "reload"]
    assert len(reload_exits) == 3


class BreakableAfterFork:
    """A mixin whose worker start-up fails while *flag* exists (a handler module that no
    longer imports, say)."""

    flag: Path

    def after_fork(self):
        super().after_fork()
        if self.flag.exists():
            raise ImportError("handler module is broken: " + self.flag.read_text())


def breakable(events: Events, flag: Path, **options):
    cls = prefork(events, **options)
    return type("Breakable", (BreakableAfterFork, cls), {"flag": flag})


def test_a_reload_whose_replacement_fails_keeps_the_old_workers_and_a_later_one_works(tmp_path, caplog):
    events = Events()
    flag = tmp_path / "broken"
    server = breakable(events, flag)(LOOPBACK, PidHandler)
    with serving(server):
        assert wait_until(lambda: len(events.of("ready")) == 3)
        old = child_pids()
        flag.write_text("SyntaxError at line 3")
        with caplog.at_level(logging.ERROR, logger="sockserve"):
            assert server.reload() is False
        aborted = [r.getMessage() for r in caplog.records if "reload aborted" in r.getMessage()]
        assert len(aborted) == 1, aborted
        assert "SyntaxError at line 3" in aborted[0]
        assert wait_until(lambda: child_pids() == old)
        assert {ask(server.server_address) for _ in range(10)} <= old  # the old ones serve
        flag.unlink()
        assert server.reload() is True
        assert wait_until(lambda: len(child_pids()) == 3 and not child_pids() & old)


def test_workers_failing_at_start_up_stop_the_supervisor_after_one_try_each(tmp_path):
    events = Events()
    flag = tmp_path / "broken"
    flag.write_text("no module named app")
    forks = []

    class CountForks:
        @sockserve.hookimpl
        def sockserve_pre_fork(self, server, worker_id):
            forks.append(worker_id)

    cls = sockserve.compose("tcp", "prefork", mixins=[BreakableAfterFork], plugins=[events, CountForks()],
                            options={"workers": 3})
    cls.flag = flag
    server = cls(LOOPBACK, PidHandler)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.serve_forever(0.05)
        except BaseException as exc:  # noqa: BLE001 - what serve_forever raised is the point
            failure.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    server.server_close()
    assert not thread.is_alive()
    assert time.monotonic() - started < 5
    assert len(failure) == 1 and isinstance(failure[0], WorkerBootError), failure
    assert "no module named app" in str(failure[0]) and "3 of 3" in str(failure[0])
    assert sorted(forks) == [0, 1, 2], "one try per slot, no fork loop"
    assert events.of("ready") == []


def test_a_stuck_worker_is_aborted_with_its_stack_logged_and_replaced(tmp_path):
    events = Events()
    server = prefork(events, worker_timeout=2)(LOOPBACK, PidHandler)
    logfile = logging.FileHandler(tmp_path / "sockserve.log")
    logging.getLogger("sockserve").addHandler(logfile)
    try:
        with serving(server):
            run_one_stuck_request(server, events)
    finally:
        logging.getLogger("sockserve").removeHandler(logfile)
        logfile.close()
    text = (tmp_path / "sockserve.log").read_text()
    assert "no heartbeat for" in text  # the parent's line, then the worker's stacks
    assert "most recent call first" in text and "in hang_here" in text, text[-2000:]


def run_one_stuck_request(server, events: Events) -> None:
    """A request that hangs its worker: it is aborted within 5 s, others are served."""
    assert wait_until(lambda: len(events.of("ready")) == 3)
    hung = socket.create_connection(server.server_address, timeout=10)
    try:
        hung.sendall(b"hang\n")
        started = time.monotonic()
        # Others are served meanwhile.
        while not events.of("abort") and time.monotonic() - started < 4:
            ask(server.server_address)
        assert wait_until(lambda: events.of("exit"), timeout=5)
        replaced = time.monotonic() - started
    finally:
        hung.close()
    (_, slot, status, reason), = events.of("exit")
    assert (status, reason) == (-signal.SIGABRT, "timeout")
    assert [e[1] for e in events.of("abort")] == [slot]
    assert wait_until(lambda: len([e for e in events.of("ready") if e[1] == slot]) == 2)
    assert ask(server.server_address)
    assert replaced < 5, replaced


def test_a_stuck_worker_that_ignores_sigabrt_is_killed():
    events = Events()
    server = prefork(events, workers=2, worker_timeout=1)(LOOPBACK, PidHandler)
    with serving(server):
        assert wait_until(lambda: len(events.of("ready")) == 2)
        with socket.create_connection(server.server_address, timeout=15) as hung:
            hung.sendall(b"hang-ignoring-abort\n")
            assert wait_until(lambda: events.of("abort"), timeout=5)
            aborted = time.monotonic()
            assert wait_until(lambda: events.of("exit"), timeout=8)
            killed = time.monotonic() - aborted
        (_, _, status, reason), = events.of("exit")
        assert (status, reason) == (-signal.SIGKILL, "timeout")
        assert 4 < killed < 7, killed


def test_max_requests_with_jitter_recycles_each_worker_after_50_to_60_requests():
    events = Events()
    server = prefork(events, max_requests=50, max_requests_jitter=10)(LOOPBACK, PidHandler)
    served: Counter[int] = Counter()
    failures = 0
    with serving(server):
        for _ in range(1000):
            try:
                served[ask(server.server_address)] += 1
            except (OSError, ValueError):
                failures += 1
        alive = child_pids()
        recycled = [e for e in events.of("exit") if e[3] == "max_requests"]
    assert failures == 0
    assert sum(served.values()) == 1000
    assert len(recycled) >= 1000 // 60 - 3
    for pid, n in served.items():
        if pid in alive:
            assert n <= 60, (pid, n)
        else:
            assert 50 <= n <= 60, (pid, n)
    assert len({n for pid, n in served.items() if pid not in alive}) > 1, "jitter spreads them"


def test_scale_adds_and_removes_workers_but_keeps_one():
    events = Events()
    server = prefork(events, workers=2)(LOOPBACK, PidHandler)
    with serving(server):
        assert wait_until(lambda: len(events.of("ready")) == 2)
        slots = server._slots
        slots.scale(1)
        slots.scale(1)
        assert wait_until(lambda: len(child_pids()) == 4 and len(events.of("ready")) == 4)
        for _ in range(5):
            slots.scale(-1)
        assert wait_until(lambda: len(child_pids()) == 1)
        time.sleep(0.3)
        assert len(child_pids()) == 1
        assert ask(server.server_address) in child_pids()
    scaled = [e for e in events.of("exit") if e[3] == "scale"]
    assert len(scaled) == 3


def test_a_worker_killed_in_its_slot_is_replaced_with_reason_crash():
    events = Events()
    with serving(prefork(events, workers=1)(LOOPBACK, PidHandler)) as server:
        assert wait_until(lambda: events.of("ready"))
        (pid,) = child_pids()
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: len(events.of("ready")) == 2, timeout=5)
        assert events.of("exit") == [("exit", 0, -signal.SIGKILL, "crash")]
        assert ask(server.server_address) != pid


def test_stopping_the_server_during_a_reload_ends_the_reload():
    events = Events()
    server = prefork(events, workers=2)(LOOPBACK, PidHandler)
    thread = start_serving(server, 0.05)
    try:
        assert wait_until(lambda: len(events.of("ready")) == 2)
        result: list[bool] = []
        reloader = threading.Thread(target=lambda: result.append(server.reload()))
        reloader.start()
        time.sleep(0.05)
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
    reloader.join(10)
    assert not reloader.is_alive() and len(result) == 1
    assert not child_pids()


def test_workers_ignore_sighup_the_supervisor_reloads():
    events = Events()
    with serving(prefork(events, workers=2)(LOOPBACK, PidHandler)) as server:
        assert wait_until(lambda: len(events.of("ready")) == 2)
        workers = child_pids()
        for pid in workers:
            os.kill(pid, signal.SIGHUP)  # as a terminal's hangup reaches the process group
        time.sleep(0.5)
        assert child_pids() == workers and events.of("exit") == []
        assert ask(server.server_address) in workers


def test_a_stopped_server_refuses_new_connections_while_its_workers_drain():
    """The parent closes its listening socket when it stops its workers, and each worker
    its copy at SIGTERM (inner sync: while its request still runs): a client connecting
    during the drain is refused, not queued and reset at the end."""
    events = Events()
    server = prefork(events, workers=1, drain_timeout=10)(LOOPBACK, SlowHandler)
    address = server.server_address
    thread = start_serving(server, 0.05)
    try:
        assert wait_until(lambda: events.of("ready"))
        busy = socket.create_connection(address, timeout=10)
        busy.sendall(b"slow\n")
        time.sleep(0.2)  # the worker is inside the request
        stopper = threading.Thread(target=server.shutdown)
        stopper.start()
        time.sleep(0.3)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=2).close()
        assert busy.recv(100).startswith(b"done")  # the request in flight finished
        busy.close()
        stopper.join(10)
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
    with pytest.raises(RuntimeError, match="does not serve again"):
        server.serve_forever(0.05)


class SlowHandler(sockserve.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        time.sleep(1.0)
        self.wfile.write(b"done\n")
