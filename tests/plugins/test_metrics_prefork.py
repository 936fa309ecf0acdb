"""The ``stats`` plugin's metrics under prefork: counters that never go backwards across
worker restarts, a SIGKILLed worker that loses no count, scrapes that stay fast after
about 100 restarts, gauges of live workers only, the workers by state, and statsd."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import urllib.request
from typing import Any

import pytest

import sockserve
from sockserve.plugins.stats import Stats
from support import EchoUpper, child_pids, held_connections, read_to_eof, requires_fork, serving, wait_until

pytestmark = [requires_fork]

prometheus_client = pytest.importorskip(
    "prometheus_client", reason="requires_prometheus_client: pip install prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def scrape(stats: Stats) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert stats.metrics_address is not None
    host, port = stats.metrics_address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def ok(found: dict[Any, float]) -> float:
    return found[("sockserve_requests_total", (("outcome", "ok"),))]


def ask(server: Any, payload: bytes = b"x") -> bytes:
    with socket.create_connection(server.server_address, timeout=10) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        return read_to_eof(client)


@pytest.fixture(autouse=True)
def no_stray_workers():
    before = child_pids()
    yield
    stray = child_pids() - before
    for pid in stray:
        os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # reaped by its server meanwhile
            pass
    assert not stray, f"worker processes left running: {sorted(stray)}"


def test_request_counter_never_decreases_over_100_restarts_and_ends_exact():
    """max_requests=20, 2,000 requests, a scrape every 100 ms from another thread."""
    stats = Stats(metrics_address=("127.0.0.1", 0))
    server = sockserve.compose("tcp", "prefork", plugins=[stats],
                               options={"workers": 2, "max_requests": 20})(("127.0.0.1", 0), EchoUpper)
    seen: list[float] = []
    timings: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.1):
            started = time.perf_counter()
            seen.append(ok(scrape(stats)))
            timings.append(time.perf_counter() - started)

    with serving(server):
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            for i in range(2000):
                assert ask(server, b"r%d" % i) == b"R%d" % i
        finally:
            done.set()
            watcher.join(10)
        assert wait_until(lambda: ok(scrape(stats)) == 2000, timeout=10), ok(scrape(stats))
        final = scrape(stats)
        # After ~100 restarts a scrape (HTTP round trip included) stays well under 50 ms.
        started = time.perf_counter()
        for _ in range(10):
            scrape(stats)
        after = (time.perf_counter() - started) / 10
    assert len(seen) >= 10, "the watcher scraped too rarely to test anything"
    assert seen == sorted(seen), "the request counter went backwards"
    assert final[("sockserve_connections_accepted_total", ())] == 2000
    restarts = final[("sockserve_worker_restarts_total", (("reason", "max_requests"),))]
    assert 95 <= restarts <= 100  # each worker recycles after its 20th request
    assert after < 0.05, f"a scrape took {after * 1000:.1f} ms after {restarts} restarts"
    assert max(timings) < 0.5


def test_a_worker_killed_with_sigkill_loses_none_of_its_counts():
    stats = Stats(metrics_address=("127.0.0.1", 0))
    release_r, release_w = os.pipe()

    class Hold(sockserve.BaseRequestHandler):
        def handle(self) -> None:
            if self.request.recv(4) == b"hold":
                self.request.sendall(b"%d\n" % os.getpid())
                os.read(release_r, 1)  # until this worker is killed
            self.request.sendall(b"done")

    # drain_timeout: a failed assertion leaves a handler blocked; the stop then kills it.
    server = sockserve.compose("tcp", "prefork", plugins=[stats],
                               options={"workers": 2, "drain_timeout": 2})(("127.0.0.1", 0), Hold)
    try:
        with serving(server):
            for _ in range(30):
                assert ask(server, b"x") == b"done"
            assert wait_until(lambda: ok(scrape(stats)) == 30, timeout=10)
            with socket.create_connection(server.server_address, timeout=10) as holder:
                holder.sendall(b"hold")
                victim = int(holder.recv(32).strip())
                # Counted active while it runs, in the worker's own row.
                assert wait_until(lambda: scrape(stats)[("sockserve_connections_active", ())] == 1,
                                  timeout=5)
                os.kill(victim, signal.SIGKILL)
                assert read_to_eof(holder) == b""
            assert wait_until(lambda: victim not in child_pids(), timeout=10)
            found = scrape(stats)
            assert ok(found) == 30  # every count of the killed worker stays
            assert found[("sockserve_connections_active", ())] == 0, "a dead worker still counts"
            assert found[("sockserve_worker_restarts_total", (("reason", "crash"),))] == 1
            assert wait_until(lambda: len(child_pids()) >= 2, timeout=10)  # replaced
            for _ in range(10):
                assert ask(server, b"x") == b"done"
            assert wait_until(lambda: ok(scrape(stats)) == 40, timeout=10)
    finally:
        os.close(release_r)
        os.close(release_w)


def test_gauges_of_an_inner_threadpool_are_summed_over_the_workers():
    stats = Stats(metrics_address=("127.0.0.1", 0))
    release_r, release_w = os.pipe()

    class Hold(sockserve.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(1)
            os.read(release_r, 1)

    server = sockserve.compose("tcp", "prefork", plugins=[stats],
                               options={"workers": 2, "inner": "threadpool", "threads": 2,
                                        "drain_timeout": 2})(
        ("127.0.0.1", 0), Hold)
    try:
        with serving(server), held_connections(server.server_address, 6) as clients:

            def gauges() -> tuple[float, float, float]:
                found = scrape(stats)
                return (found[("sockserve_connections_active", ())],
                        found[("sockserve_pool_threads_busy", ())],
                        found[("sockserve_pool_queue_depth", ())])

            try:
                # 6 held over 2 workers of 2 threads: however the workers shared them out,
                # each is running or queued, and 2-4 threads are busy.
                assert wait_until(lambda: gauges()[0] == 6 and sum(gauges()[1:]) == 6,
                                  timeout=10), gauges()
                assert 2 <= gauges()[1] <= 4
            finally:
                os.write(release_w, b"x" * 6)
            for client in clients:
                client.settimeout(10)
                assert read_to_eof(client) == b""
            assert wait_until(lambda: gauges() == (0, 0, 0), timeout=10), gauges()
    finally:
        os.close(release_r)
        os.close(release_w)


def test_workers_by_state_count_every_worker_once():
    stats = Stats(metrics_address=("127.0.0.1", 0))
    server = sockserve.compose("tcp", "prefork", plugins=[stats], options={"workers": 3})(
        ("127.0.0.1", 0), EchoUpper)
    with serving(server):
        assert ask(server) == b"X"

        def states() -> dict[str, float]:
            return {dict(labels)["state"]: v for (name, labels), v in scrape(stats).items()
                    if name == "sockserve_workers"}

        # "ready" once the supervisor fires sockserve_worker_ready; "starting" until then.
        assert wait_until(lambda: sum(states().values()) == 3, timeout=5), states()
        assert states()["aborting"] == 0
    assert stats.metrics_address is not None
    found = {dict(labels)["state"]: v for (name, labels), v in
             _render(stats).items() if name == "sockserve_workers"}
    assert sum(found.values()) == 0  # all exited at the stop


def _render(stats: Stats) -> dict[Any, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(stats.render().decode())
            for s in family.samples}


def test_statsd_receives_deltas_from_the_supervisor():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(5)
        stats = Stats(statsd_address=receiver.getsockname(), statsd_interval=0.2)
        server = sockserve.compose("tcp", "prefork", plugins=[stats], options={"workers": 2})(
            ("127.0.0.1", 0), EchoUpper)
        lines: list[str] = []
        with serving(server):
            for _ in range(7):
                assert ask(server) == b"X"

            def total(key: str) -> int:
                receiver.settimeout(0.3)
                for _ in range(20):  # what arrived so far (a flush every 0.2 s)
                    try:
                        lines.extend(receiver.recv(65536).decode().splitlines())
                    except TimeoutError:
                        break
                return sum(int(line.split(":")[1].split("|")[0]) for line in lines
                           if line.startswith(key + ":") and line.endswith("|c"))

            assert wait_until(lambda: total("sockserve.requests.ok") == 7, timeout=10), lines
        assert any(line.startswith("sockserve.connections_active:") and line.endswith("|g")
                   for line in lines)
        assert any(line.startswith("sockserve.request_duration_seconds:") and "|ms|@" in line
                   for line in lines)


def test_statsd_to_a_port_nobody_listens_on_costs_nothing_and_logs_once(caplog):
    caplog.set_level(logging.INFO, logger="sockserve.stats")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
        gone.bind(("127.0.0.1", 0))
        dead = gone.getsockname()
    stats = Stats(statsd_address=dead, statsd_interval=0.05)
    server = sockserve.compose("tcp", "threadpool", plugins=[stats])(("127.0.0.1", 0), EchoUpper)
    with serving(server):
        started = time.monotonic()
        for i in range(50):
            assert ask(server, b"%d" % i) == b"%d" % i
            time.sleep(0.01)  # several flushes meanwhile
        elapsed = time.monotonic() - started
    emitter = stats._statsd  # the test looks at what was sent: not a public promise
    assert emitter is not None and emitter.sent + emitter.dropped >= 5
    statsd_lines = [r for r in caplog.records if r.getMessage().startswith("statsd")]
    assert len(statsd_lines) <= 1, [r.getMessage() for r in statsd_lines]
    assert elapsed < 5
