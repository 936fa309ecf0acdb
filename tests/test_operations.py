"""Operations (issue 10): ``sockserve serve --concurrency prefork`` as a real process, in its
own session, driven by signals and load from this process, torn down by its pid.

Rolling reload under load, a reload with broken code, stuck workers, start-up failure,
recycling with jitter, scaling, a second stop signal. Every wait is bounded.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from support import SCRIPTS, clean_env, read_line, requires_fork, wait_until

pytestmark = [requires_fork, pytest.mark.requires_fork]

READY = re.compile(r"worker (\d+) \(pid (\d+)\) ready")
STOPPING = re.compile(r"reload: worker \d+ \(pid (\d+)\) replaced by pid \d+; stopping it")
EXITED = re.compile(r"worker \d+ \(pid (\d+)\) exited")


def children(pid: int) -> set[int]:
    """The children of *pid* (live or zombie), from every one of its threads."""
    found: set[int] = set()
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                found.update(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
    except OSError:
        pass
    return found


def zombies(pid: int) -> set[int]:
    """The children of *pid* that exited and were not reaped."""
    dead = set()
    for child in children(pid):
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] == "Z":
            dead.add(child)
    return dead


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


class Serve:
    """``python -m sockserve serve ARGS`` in its own session, its output read as it comes."""

    def __init__(self, cwd: Path, *args: str, **env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sockserve", "serve", *args],
            cwd=cwd, env=clean_env(**env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.lines: list[tuple[float, str]] = []
        self.workers_seen: set[int] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append((time.monotonic(), raw.decode("utf-8", "replace").rstrip("\n")))

    def __enter__(self) -> Serve:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout: float = 10.0, after: float = 0.0, count: int = 1) -> float:
        """Wait until *count* lines after time *after* match *pattern*; the time of the last."""
        regex = re.compile(pattern)

        def found() -> list[float]:
            return [t for t, line in list(self.lines) if t >= after and regex.search(line)]

        assert wait_until(lambda: len(found()) >= count or self.proc.poll() is not None, timeout=timeout)
        assert len(found()) >= count, f"no {count} x {pattern!r} in:\n{self.output()[-4000:]}"
        return found()[count - 1]

    @property
    def port(self) -> int:
        self.wait_for(r"serving on")
        for _, line in self.lines:
            match = re.search(r"serving on \S*?:(\d+)", line)
            if match:
                return int(match.group(1))
        raise AssertionError(self.output())

    def workers(self) -> set[int]:
        found = children(self.proc.pid)
        self.workers_seen |= found
        return found

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait for the exit status."""
        self.workers()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Kill what still runs (by pid), reap it, and check that no worker outlived it."""
        if self.proc.poll() is None:
            self.workers()
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        assert wait_until(lambda: not any(alive(pid) for pid in self.workers_seen), timeout=5), \
            f"workers outlived the supervisor: {[p for p in self.workers_seen if alive(p)]}"


def ask(port: int, payload: bytes = b"hi", timeout: float = 5.0) -> tuple[int, bytes]:
    """One request on a new connection: the answering worker's pid and handler version."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload + b"\n")
        data = read_line(sock)
    pid, version, text = data.split()
    assert text == payload.upper(), data
    return int(pid), version


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """A folder with the handler module in it, which a test may replace."""
    shutil.copy(SCRIPTS / "ops_handler.py", tmp_path / "ops_handler.py")
    return tmp_path


def prefork(app: Path, *args: str, workers: int = 3, **env: str) -> Serve:
    return Serve(app, "127.0.0.1:0", "ops_handler:Handler", "--concurrency", "prefork",
                 "-w", str(workers), *args, **env)


def ready_counts(lines: list[tuple[float, str]]) -> list[tuple[float, int]]:
    """The number of ready workers after each supervision line, from the log: (time, count)."""
    ready: set[int] = set()
    counts = []
    for t, line in lines:
        for regex, add in ((READY, True), (STOPPING, False), (EXITED, False)):
            match = regex.search(line)
            if match:
                pid = int(match.group(match.lastindex or 1))
                ready.add(pid) if add else ready.discard(pid)
                counts.append((t, len(ready)))
    return counts


def test_hup_under_load_replaces_every_worker_without_a_failed_request(app):
    with prefork(app) as serve:
        port = serve.port
        serve.wait_for(READY.pattern, count=3)
        before = serve.workers()
        assert len(before) == 3
        processes: list[int] = []
        watching = threading.Event()

        def watch() -> None:
            while not watching.is_set():
                processes.append(len(serve.workers()))
                time.sleep(0.005)

        failures: list[str] = []
        answered: list[tuple[float, int]] = []

        def one() -> None:
            try:
                pid, _ = ask(port)
                answered.append((time.monotonic(), pid))
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(repr(exc))

        watcher = threading.Thread(target=watch)
        watcher.start()
        start = time.monotonic()
        hup_at = 0.0
        try:
            with ThreadPoolExecutor(max_workers=32) as pool:
                for i in range(1000):  # 100 connections a second for 10 s
                    time.sleep(max(0.0, start + i * 0.01 - time.monotonic()))
                    if i == 300:
                        serve.signal(signal.SIGHUP)
                        hup_at = time.monotonic()
                    pool.submit(one)
        finally:
            watching.set()
            watcher.join()
        done_at = serve.wait_for(r"reload done", after=hup_at, timeout=10)
        after = serve.workers()
        late = {pid for t, pid in answered if t > done_at + 0.5}
    assert failures == [], failures[:5]
    assert len(answered) == 1000
    assert done_at - hup_at < 5, done_at - hup_at
    assert len(after) == 3 and not after & before, (before, after)
    assert late <= after, "after the reload only new workers answer"
    assert max(processes) <= 4, Counter(processes)
    counts = [n for t, n in ready_counts(serve.lines) if t >= hup_at]
    assert len(counts) >= 9 and min(counts) >= 3, counts  # 3 x (ready, stopping, exited)


BROKEN = 'raise ImportError("ops_handler is broken on purpose")\n'


def test_hup_with_a_broken_handler_keeps_the_old_workers_and_a_later_hup_works(app):
    with prefork(app, workers=2) as serve:
        port = serve.port
        serve.wait_for(READY.pattern, count=2)
        before = serve.workers()
        good = (app / "ops_handler.py").read_text()
        (app / "ops_handler.py").write_text(BROKEN)
        hup_at = time.monotonic()
        serve.signal(signal.SIGHUP)
        serve.wait_for(r"reload aborted", after=hup_at)
        time.sleep(1.0)  # nothing more is tried, nothing more is logged
        aborted = [line for t, line in serve.lines if t >= hup_at and "reload aborted" in line]
        assert len(aborted) == 1, aborted
        assert "broken on purpose" in aborted[0]
        assert serve.output().count("failed at start-up") == 0
        assert wait_until(lambda: serve.workers() == before)
        assert {ask(port)[0] for _ in range(20)} <= before
        (app / "ops_handler.py").write_text(good.replace('VERSION = b"v1"', 'VERSION = b"v2"'))
        again = time.monotonic()
        serve.signal(signal.SIGHUP)
        serve.wait_for(r"reload done", after=again)
        assert wait_until(lambda: len(serve.workers()) == 2 and not serve.workers() & before)
        answers = {ask(port) for _ in range(10)}
        assert {version for _, version in answers} == {b"v2"}
        assert serve.stop() == 0


def test_a_stuck_worker_is_aborted_with_its_stack_in_the_log_and_replaced(app):
    sleep_line = next(n for n, text in enumerate((app / "ops_handler.py").read_text().splitlines(), 1)
                      if "time.sleep" in text)
    with prefork(app, "-o", "worker_timeout=2", workers=2) as serve:
        port = serve.port
        serve.wait_for(READY.pattern, count=2)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as hung:
            hung.sendall(b"hang\n")
            sent = time.monotonic()
            served = 0
            while time.monotonic() - sent < 2.5:  # the others answer meanwhile
                ask(port)
                served += 1
            serve.wait_for(READY.pattern, count=3, timeout=5)  # its replacement
            replaced = time.monotonic() - sent
        assert served > 10
        assert replaced < 5, replaced
        out = serve.output()
        assert "no heartbeat for" in out
        assert "most recent call first" in out
        assert re.search(rf'ops_handler.py", line {sleep_line} in hang_here', out), out[-3000:]
        assert wait_until(lambda: not zombies(serve.proc.pid), timeout=2)
        assert serve.stop() == 0


def test_a_stuck_worker_that_ignores_sigabrt_is_killed(app):
    with prefork(app, "-o", "worker_timeout=1", workers=2) as serve:
        port = serve.port
        serve.wait_for(READY.pattern, count=2)
        with socket.create_connection(("127.0.0.1", port), timeout=15) as hung:
            hung.sendall(b"hang-ignoring-abort\n")
            aborted = serve.wait_for(r"no heartbeat for", timeout=5)
            killed = serve.wait_for(r"outlived SIGABRT .* killing it", timeout=8)
            serve.wait_for(READY.pattern, count=3, timeout=5)
        assert 4.5 < killed - aborted < 6.5
        assert ask(port)
        assert wait_until(lambda: not zombies(serve.proc.pid), timeout=2)
        assert serve.stop() == 0


FAILS_IN_WORKERS = '''
import builtins
if getattr(builtins, "_ops_handler_loaded", False):  # imported again, in a worker
    raise RuntimeError("the database is unreachable from the workers")
builtins._ops_handler_loaded = True
'''


def test_workers_failing_at_start_up_end_the_supervisor_after_one_try_each(app):
    path = app / "ops_handler.py"
    path.write_text(FAILS_IN_WORKERS + path.read_text())
    with prefork(app) as serve:
        started = time.monotonic()
        status = serve.proc.wait(10)
        took = time.monotonic() - started
        out = serve.output()
    assert status != 0, out
    assert took < 5, took
    assert len(re.findall(r"worker \d \(pid \d+\) failed at start-up", out)) == 3, out  # one try each
    assert out.count("sockserve: error: 3 of 3 worker(s) failed at start-up") == 1, out
    assert "the database is unreachable from the workers" in out
    assert "Traceback" in out  # the worker's, sent to the parent and logged there


def test_max_requests_with_jitter_recycles_each_worker_after_50_to_60(app):
    with prefork(app, "-o", "max_requests=50", "-o", "max_requests_jitter=10") as serve:
        port = serve.port
        serve.wait_for(READY.pattern, count=3)
        served: Counter[int] = Counter()
        for _ in range(1000):
            served[ask(port)[0]] += 1
        still = serve.workers()
        assert serve.stop() == 0
    assert sum(served.values()) == 1000
    recycled = {pid: n for pid, n in served.items() if pid not in still}
    assert len(recycled) >= 14, served
    assert all(50 <= n <= 60 for n in recycled.values()), recycled
    assert all(n <= 60 for n in served.values()), served
    assert len(set(recycled.values())) > 1, "the jitter spreads them"
    assert "exited (max_requests)" in serve.output()


def test_ttin_and_ttou_add_and_remove_workers_but_keep_one(app):
    with prefork(app) as serve:
        port = serve.port
        serve.wait_for(READY.pattern, count=3)
        for _ in range(2):
            serve.signal(signal.SIGTTIN)
            time.sleep(0.2)
        serve.wait_for(READY.pattern, count=5)
        assert wait_until(lambda: len(serve.workers()) == 5)
        for _ in range(5):
            serve.signal(signal.SIGTTOU)
            time.sleep(0.2)
        assert wait_until(lambda: len(serve.workers()) == 1, timeout=5)
        time.sleep(0.5)
        assert len(serve.workers()) == 1
        assert ask(port)[0] in serve.workers()
        assert "at least one must run" in serve.output()
        assert serve.stop() == 0


def test_a_second_term_during_the_drain_exits_at_once(app):
    with prefork(app, workers=2) as serve:
        port = serve.port
        serve.wait_for(READY.pattern, count=2)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as busy:
            busy.sendall(b"hang\n")  # a request that would hold the drain for 30 s
            time.sleep(0.3)
            serve.signal(signal.SIGTERM)
            time.sleep(0.5)
            assert serve.proc.poll() is None, "the first TERM drains"
            second = time.monotonic()
            serve.signal(signal.SIGTERM)
            serve.proc.wait(5)
            assert time.monotonic() - second < 2


def test_hup_under_systemd_notifies_reloading_then_ready(app, tmp_path):
    """Type=notify-reload: RELOADING=1 with MONOTONIC_USEC, then READY=1, from the
    supervisor only."""
    path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(10)
    messages: list[str] = []

    def until(text: str) -> str:
        while True:
            message = receiver.recv(4096).decode()
            messages.append(message)
            if message.startswith(text):
                return message

    try:
        with prefork(app, workers=2, NOTIFY_SOCKET=path) as serve:
            serve.wait_for(READY.pattern, count=2)
            until("READY=1")
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            serve.signal(signal.SIGHUP)
            reloading = until("RELOADING=1")
            usec = int(re.search(r"MONOTONIC_USEC=(\d+)", reloading).group(1))
            assert before <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            until("READY=1")
            assert serve.wait_for(r"reload done")
            assert serve.stop() == 0
            until("STOPPING=1")
    finally:
        receiver.close()
    assert [m.split("\n")[0] for m in messages if not m.startswith("WATCHDOG")][:4] == \
        ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
