"""The ``stats`` plugin (plugins/_stats.py): request counters and a duration histogram,
complete for every strategy (forked children count into shared memory), a summary line
logged when the server closes, and ``sockserve serve --plugin stats`` printing it on exit."""

from __future__ import annotations

import logging
import re
import signal
import socket
import time
from typing import Any

import pytest

import sockserve
from support import (
    UpperFailSlow,
    ask_stream,
    clean_env,
    probe_autoload,
    read_banner,
    read_to_eof,
    requires_fork,
    serving,
    sockserve_process,
)

STATS = sockserve.registry.load("plugin", "stats")
#: Bucket upper bounds as the summary line shows them, then the overflow bucket.
BUCKET_LABELS = ["<=0.1ms", "<=1ms", "<=10ms", "<=100ms", "<=1000ms", "<=10000ms", "slower"]
BOUNDS = [0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, float("inf")]
#: A b"slow" request sleeps this long: it lands in a bucket above 10 ms.
SLOW = 0.02
SUMMARY = re.compile(
    r"^(?P<cls>\w+): accepted (?P<accepted>\d+), denied (?P<denied>\d+), finished (?P<finished>\d+), "
    r"failed (?P<failed>\d+); durations (?P<durations>.*)$"
)


class Handler(UpperFailSlow):
    """Upper-case echo; b"fail" raises, b"slow" sleeps SLOW seconds first."""

    slow = SLOW


def counted_class(concurrency: str) -> type:
    """A server class with the stats plugin that denies the client ports it is told to."""
    base = sockserve.compose("tcp", concurrency, plugins=[STATS])

    class Counted(base):  # type: ignore[misc, valid-type]
        def verify_request(self, request: Any, client_address: Any) -> bool:
            return client_address[1] not in self.denied_ports

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # the failures are expected; keep their tracebacks out of the output

    return Counted


def request(server: Any, payload: bytes, *, deny: bool = False) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.bind(("127.0.0.1", 0))
        if deny:
            server.denied_ports.add(client.getsockname()[1])
        client.connect(server.server_address)
        if not deny:  # a denied connection is closed unread; sending could reset it
            client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        return read_to_eof(client)


def summaries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sockserve.stats"]


@pytest.mark.parametrize("concurrency", ["sync", "threading", pytest.param("forking", marks=requires_fork)])
def test_counts_and_histogram_are_complete_and_summarised_at_close(concurrency, caplog):
    caplog.set_level(logging.INFO, logger="sockserve.stats")
    cls = counted_class(concurrency)
    server = cls(("127.0.0.1", 0), Handler)
    server.denied_ports = set()
    with serving(server):
        for payload in [b"a", b"b", b"fail", b"slow", b"c", b"fail", b"slow", b"d"]:
            reply = request(server, payload)
            assert reply == (b"" if payload == b"fail" else payload.upper())
        for _ in range(3):
            assert request(server, b"no", deny=True) == b""
    # serving() has closed the server: for forking, every child has been reaped.
    snap = STATS.snapshot(server)
    counts = {k: snap[k] for k in ("accepted", "denied", "finished", "failed")}
    assert counts == {"accepted": 11, "denied": 3, "finished": 6, "failed": 2}
    durations = snap["durations"]
    assert list(durations) == BOUNDS
    assert sum(durations.values()) == 8  # every request that ran, none that was denied
    assert sum(n for bound, n in durations.items() if bound > SLOW) >= 2
    [summary] = summaries(caplog)
    histogram = " ".join(f"{label}:{n}" for label, n in zip(BUCKET_LABELS, durations.values()))
    assert summary == (
        f"{cls.__name__}: accepted 11, denied 3, finished 6, failed 2; durations {histogram}"
    )


def test_counters_belong_to_each_server(caplog):
    caplog.set_level(logging.INFO, logger="sockserve.stats")
    cls = counted_class("threading")
    first, second = cls(("127.0.0.1", 0), Handler), cls(("127.0.0.1", 0), Handler)
    first.denied_ports = second.denied_ports = set()
    with serving(first), serving(second):
        for _ in range(3):
            request(first, b"x")
        request(second, b"y")
    assert (STATS.snapshot(first)["finished"], STATS.snapshot(second)["finished"]) == (3, 1)
    assert sorted(SUMMARY.match(s)["accepted"] for s in summaries(caplog)) == ["1", "3"]


def test_a_denial_by_another_plugin_is_counted_too(caplog):
    class Bouncer:
        @sockserve.hookimpl
        def sockserve_verify_request(self, client_address: Any) -> bool | None:
            return False if client_address[1] in bounced else None

    bounced: set[int] = set()
    caplog.set_level(logging.INFO, logger="sockserve.stats")
    cls = sockserve.compose("tcp", "threading", plugins=[STATS, Bouncer()])
    server = cls(("127.0.0.1", 0), Handler)
    server.denied_ports = bounced
    with serving(server):
        assert request(server, b"in") == b"IN"
        assert request(server, b"out", deny=True) == b""
    snap = STATS.snapshot(server)
    assert (snap["accepted"], snap["denied"], snap["finished"]) == (2, 1, 1)


class ReplyThenLinger(sockserve.BaseRequestHandler):
    """Answer at once, then take a while before the handler returns."""

    def handle(self) -> None:
        self.request.recv(1024)
        self.request.sendall(b"answered")
        time.sleep(0.3)


@pytest.mark.parametrize("concurrency", ["threading", pytest.param("forking", marks=requires_fork)])
def test_summary_at_close_counts_requests_that_close_waited_for(concurrency, caplog):
    """server_close() waits for in-flight requests (block_on_close); the summary includes them."""
    caplog.set_level(logging.INFO, logger="sockserve.stats")
    cls = counted_class(concurrency)
    server = cls(("127.0.0.1", 0), ReplyThenLinger)
    server.denied_ports = set()
    with serving(server):
        with socket.create_connection(server.server_address, timeout=10) as client:
            client.sendall(b"x")
            assert client.recv(1024) == b"answered"
    snap = STATS.snapshot(server)
    assert (snap["accepted"], snap["finished"]) == (1, 1)  # close waited for the request
    [summary] = summaries(caplog)
    assert SUMMARY.match(summary)["finished"] == "1", summary


# --------------------------------------------------------------------------- the command line

SERVING = re.compile(rb"serving on (\S+):(\d+) with")


def test_serve_with_plugin_stats_prints_the_summary_on_sigterm(tmp_path):
    args = ("serve", "127.0.0.1:0", "--plugin", "stats")
    with sockserve_process(*args, cwd=tmp_path, env=clean_env(), timeout=60) as proc:
        seen = read_banner(proc, 60, until=SERVING.search)
        match = SERVING.search(seen)
        address = (match.group(1).decode(), int(match.group(2)))
        for i in range(3):
            # Read to EOF: the request is over.
            assert ask_stream(address, b"stats %d\n" % i) == b"STATS %d\n" % i
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    stderr = (seen + err).decode(errors="replace")
    [line] = [line for line in stderr.splitlines() if " sockserve.stats INFO " in line]
    summary = SUMMARY.match(line.split(" sockserve.stats INFO ", 1)[1])
    assert summary, line
    assert (summary["cls"], summary["accepted"], summary["denied"], summary["finished"],
            summary["failed"]) == ("ThreadingTCPServerWithStats", "3", "0", "3", "0")
    buckets = dict(part.split(":") for part in summary["durations"].split())
    assert list(buckets) == BUCKET_LABELS and sum(map(int, buckets.values())) == 3
    assert stderr.rstrip().endswith("sockserve: stopped")


# --------------------------------------------------------------------------- opt-in

def test_stats_is_listed_but_not_registered_by_autoload(tmp_path):
    """Opt-in: autoload runs (a control plugin is registered) but leaves stats out."""
    assert probe_autoload("stats", tmp_path) == {
        "listed": True, "registered": False, "autoload_attribute": False, "control_registered": True,
    }
