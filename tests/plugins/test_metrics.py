"""The ``stats`` plugin's metrics (plugins/_stats.py, _metrics.py, _prometheus.py): Prometheus
text on a side listener, exact after a known workload, parsed with ``prometheus_client``'s
own parser; the layers' metrics (TLS, PROXY); gauges; the side listener's lifecycle; and
with the plugin off, no listener and no shared memory."""

from __future__ import annotations

import gc
import math
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import sockserve
from sockserve.plugins.stats import CONTENT_TYPE, METRICS, Collector, Stats, parse_metrics_address
from support import UpperFailSlow, held_connections, open_fds, read_to_eof, requires_fork, serving, wait_until

prometheus_client = pytest.importorskip(
    "prometheus_client", reason="requires_prometheus_client: pip install prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "transports"))  # tls_support, proxy_support
import proxy_support  # noqa: E402
import tls_support  # noqa: E402


def scrape(stats: Stats, path: str = "/metrics") -> tuple[str, str]:
    """GET *path* from the stats side listener: (Content-Type, body)."""
    assert stats.metrics_address is not None
    host, port = stats.metrics_address
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as reply:
        return reply.headers["Content-Type"], reply.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value, via prometheus_client."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def check_histogram(found: dict[Any, float], name: str) -> None:
    """Buckets cumulative and non-decreasing in le order, +Inf == _count, _sum >= 0."""
    buckets = sorted(((float(dict(labels)["le"]), v) for (n, labels), v in found.items()
                      if n == f"{name}_bucket"))
    assert buckets and buckets[-1][0] == math.inf
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), buckets
    assert counts[-1] == value(found, f"{name}_count")
    assert value(found, f"{name}_sum") >= 0


#: ``counted`` servers deny the clients from this loopback address.
DENIED_HOST = "127.0.0.2"


class Handler(UpperFailSlow):
    slow = 0.02


def counted(stats: Stats, concurrency: str, **options: Any) -> Any:
    base = sockserve.compose("tcp", concurrency, plugins=[stats], options=options or None)

    class Counted(base):  # type: ignore[misc, valid-type]
        def verify_request(self, request: Any, client_address: Any) -> bool:
            # A rule fixed before any fork, so that prefork's workers apply it too.
            return client_address[0] != DENIED_HOST

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # expected failures: no tracebacks in the output

    return Counted(("127.0.0.1", 0), Handler)


def ask(server: Any, payload: bytes, *, deny: bool = False) -> bytes:
    with socket.socket() as client:
        client.settimeout(10)
        client.bind((DENIED_HOST if deny else "127.0.0.1", 0))
        client.connect(server.server_address)
        if not deny:
            client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        return read_to_eof(client)


STRATEGIES = ["sync", "threadpool", pytest.param("forking", marks=requires_fork),
              pytest.param("prefork", marks=requires_fork)]


@pytest.mark.parametrize("concurrency", STRATEGIES)
def test_a_known_workload_scrapes_to_exact_values(concurrency):
    """100 requests (5 raise), 3 rejected: the parsed scrape says exactly that."""
    stats = Stats(metrics_address=("127.0.0.1", 0))
    options = {"workers": 2} if concurrency == "prefork" else {}
    server = counted(stats, concurrency, **options)
    with serving(server):
        for i in range(100):
            payload = b"fail" if i % 20 == 0 else b"slow" if i == 7 else b"x%d" % i
            assert ask(server, payload) == (b"" if payload == b"fail" else payload.upper())
        for _ in range(3):
            assert ask(server, b"", deny=True) == b""
        expected = {("sockserve_requests_total", (("outcome", "ok"),)): 95,
                    ("sockserve_requests_total", (("outcome", "error"),)): 5}
        # Under forking and prefork the last counts land as the children finish.
        assert wait_until(lambda: all(samples(scrape(stats)[1]).get(k) == v
                                      for k, v in expected.items()), timeout=10)
        kind, text = scrape(stats)
        assert kind == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    found = samples(text)
    assert value(found, "sockserve_connections_accepted_total") == 103
    assert value(found, "sockserve_connections_rejected_total", reason="verify") == 3
    others = [v for (n, labels), v in found.items()
              if n == "sockserve_connections_rejected_total" and labels != (("reason", "verify"),)]
    assert others and set(others) == {0}
    assert value(found, "sockserve_requests_total", outcome="timeout") == 0
    assert value(found, "sockserve_request_duration_seconds_count") == 100
    check_histogram(found, "sockserve_request_duration_seconds")
    # The slow request (20 ms) is above the 10 ms bucket; the sum is at least its time.
    assert value(found, "sockserve_request_duration_seconds_bucket", le="0.01") <= 99
    assert value(found, "sockserve_request_duration_seconds_sum") >= 0.02
    assert value(found, "sockserve_build_info", version=sockserve.__version__,
                 python=sys.version.split()[0]) == 1
    # Every line has HELP and TYPE, every name is sockserve_*, every counter ends in _total.
    families = list(text_string_to_metric_families(text))
    assert {f.name for f in families} == {m.name.removesuffix("_total") for m in METRICS}
    assert all(f.documentation for f in families)
    for metric in METRICS:
        assert metric.name.startswith("sockserve_")
        assert metric.name.endswith("_total") == (metric.kind == "counter"), metric.name
        assert f"# TYPE {metric.name} {metric.kind}\n" in text


def test_the_metrics_listener_answers_only_get_metrics_and_closes_with_the_server():
    stats = Stats(metrics_address="127.0.0.1:0")
    server = counted(stats, "threadpool")
    address = stats.metrics_address
    with serving(server):
        with pytest.raises(urllib.error.HTTPError) as missing:
            scrape(stats, "/other")
        assert missing.value.code == 404
        request = urllib.request.Request(f"http://{address[0]}:{address[1]}/metrics", method="POST",
                                         data=b"")
        with pytest.raises(urllib.error.HTTPError) as posted:
            urllib.request.urlopen(request, timeout=5)
        assert posted.value.code == 405
        # A client that sends nothing holds the listener at most REQUEST_TIMEOUT (2 s).
        with socket.create_connection(address, timeout=5) as silent:
            started = time.monotonic()
            assert scrape(stats)[0] == CONTENT_TYPE
            assert time.monotonic() - started < 3.5
            silent.settimeout(5)
            assert silent.recv(1) == b""
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=2).close()


def test_a_busy_metrics_address_is_an_error_before_serving_and_leaks_nothing():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = open_fds()
        with pytest.raises(sockserve.BindError) as caught:
            Stats(metrics_address=("127.0.0.1", port))
        assert f"cannot bind the metrics address 127.0.0.1:{port}" in str(caught.value)
        assert isinstance(caught.value, OSError)
        assert open_fds() == before


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9100", ("127.0.0.1", 9100)), ("[::1]:0", ("::1", 0)), ("9100", ("127.0.0.1", 9100)),
    ("0.0.0.0:80", ("0.0.0.0", 80)), ("localhost:9", ("localhost", 9)),
])
def test_metrics_addresses_parse(text, expected):
    assert parse_metrics_address(text) == expected


@pytest.mark.parametrize("text", ["::1:80", "host:port", ":80", "1.2.3.4:99999", ""])
def test_bad_metrics_addresses_say_which_shapes_are_accepted(text):
    with pytest.raises(sockserve.AddressError) as caught:
        parse_metrics_address(text)
    assert "HOST:PORT, [IPV6]:PORT or PORT" in str(caught.value)


@requires_fork
def test_forked_children_hold_no_copy_of_the_metrics_listener():
    """Under forking, the child that runs a request has closed the side listener."""
    stats = Stats(metrics_address=("127.0.0.1", 0))
    port = stats.metrics_address[1]

    class Report(sockserve.BaseRequestHandler):
        def handle(self) -> None:
            held = []
            for fd in map(int, os.listdir("/proc/self/fd")):
                try:
                    sock = socket.socket(fileno=os.dup(fd))
                except OSError:
                    continue
                with sock:
                    try:
                        if sock.getsockname()[1:2] == (port,) and sock.type == socket.SOCK_STREAM:
                            held.append(fd)
                    except (OSError, IndexError, TypeError):
                        pass
            self.request.sendall(repr(held).encode())

    server = sockserve.compose("tcp", "forking", plugins=[stats])(("127.0.0.1", 0), Report)
    with serving(server):
        with socket.create_connection(server.server_address, timeout=10) as client:
            client.shutdown(socket.SHUT_WR)
            assert read_to_eof(client) == b"[]"
        assert scrape(stats)[0] == CONTENT_TYPE  # the parent still serves it


def _shared_mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if "/dev/zero (deleted)" in line and line.split()[1][3] == "s")


def _listening_inodes() -> set[str]:
    found = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    found.add(fields[9])
    mine = {os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds()
            if os.path.exists(f"/proc/self/fd/{fd}")}
    return {inode for inode in found if f"socket:[{inode}]" in mine}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_with_the_plugin_off_there_is_no_side_listener_and_no_shared_memory():
    server_class = sockserve.compose("tcp", "threadpool")
    gc.collect()
    gc.disable()  # no other test's counters freed while this one counts mappings
    try:
        listening, mappings = _listening_inodes(), _shared_mappings()
        server = server_class(("127.0.0.1", 0), Handler)
        with serving(server):
            assert ask(server, b"hi") == b"HI"
            # Only the server's own listening socket is new; no MAP_SHARED anonymous memory.
            assert len(_listening_inodes() - listening) == 1
            assert _shared_mappings() == mappings
        # The control: with the plugin, both appear.
        stats = Stats(metrics_address=("127.0.0.1", 0))
        server = counted(stats, "threadpool")
        with serving(server):
            assert len(_listening_inodes() - listening) == 2
            assert _shared_mappings() == mappings + 1
    finally:
        gc.enable()


def test_gauges_count_connections_held_threads_busy_and_the_queue():
    stats = Stats(metrics_address=("127.0.0.1", 0))
    release = threading.Event()

    class Hold(sockserve.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(1)
            release.wait(10)

    server = sockserve.compose("tcp", "threadpool", plugins=[stats],
                               options={"threads": 2, "backlog": 8})(("127.0.0.1", 0), Hold)
    try:
        with serving(server), held_connections(server.server_address, 5) as clients:
            wanted = {"sockserve_connections_active": 5, "sockserve_pool_threads_busy": 2,
                      "sockserve_pool_queue_depth": 3}
            assert wait_until(lambda: all(samples(scrape(stats)[1]).get((k, ())) == v
                                          for k, v in wanted.items()), timeout=5), scrape(stats)[1]
            release.set()
            for client in clients:
                assert read_to_eof(client) == b""
            assert wait_until(lambda: all(samples(scrape(stats)[1]).get((k, ())) == 0
                                          for k in wanted), timeout=5)
    finally:
        release.set()


def test_the_layers_metrics_tls_handshakes_and_failures_proxy_headers_and_failures():
    class LineUpper(sockserve.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.readline().upper())

    stats = Stats(metrics_address=("127.0.0.1", 0))
    server = sockserve.compose("tcp", "threadpool", layers=["proxy", "tls"], plugins=[stats],
                               options={"threads": 4, **tls_support.server_options()})(
        ("127.0.0.1", 0), LineUpper)
    v2_local = proxy_support.v2(0x20, 0x00, b"")
    with serving(server):
        for header in (b"PROXY TCP4 10.0.0.1 10.0.0.2 1234 80\r\n", b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n",
                       proxy_support.v2(0x21, 0x11, proxy_support.inet4("10.0.0.3", "10.0.0.4", 5, 6)),
                       v2_local):
            with socket.create_connection(server.server_address, timeout=10) as raw:
                raw.sendall(header)
                with tls_support.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"hi\n")
                    assert tls.recv(100) == b"HI\n"
        # Plain HTTP on the TLS port (after a good PROXY header): tls-http.
        with socket.create_connection(server.server_address, timeout=10) as raw:
            raw.sendall(b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\nGET / HTTP/1.0\r\n\r\n")
            assert read_to_eof(raw) == b""
        # Not a PROXY header: proxy-header.
        with socket.create_connection(server.server_address, timeout=10) as raw:
            raw.sendall(b"HELLO there, this is no header\r\n")
            assert read_to_eof(raw) == b""
        want = {("sockserve_requests_total", (("outcome", "ok"),)): 4,
                ("sockserve_connections_rejected_total", (("reason", "proxy"),)): 1}
        assert wait_until(lambda: all(samples(scrape(stats)[1]).get(k) == v for k, v in want.items()),
                          timeout=5)
        found = samples(scrape(stats)[1])
    assert value(found, "sockserve_tls_handshake_duration_seconds_count") == 4
    check_histogram(found, "sockserve_tls_handshake_duration_seconds")
    assert 0 < value(found, "sockserve_tls_handshake_duration_seconds_sum") < 5
    assert value(found, "sockserve_tls_handshake_failures_total", reason="http") == 1
    assert value(found, "sockserve_connections_rejected_total", reason="tls") == 1
    assert value(found, "sockserve_proxy_header_failures_total", reason="header") == 1
    # Headers of connections that reached the handler (a refusal by a later layer loses
    # the address the proxy layer made, with its header).
    assert value(found, "sockserve_proxy_headers_total", version="1", command="PROXY") == 2
    assert value(found, "sockserve_proxy_headers_total", version="2", command="PROXY") == 1
    assert value(found, "sockserve_proxy_headers_total", version="2", command="LOCAL") == 1
    # No label anywhere carries a client address.
    assert not any("10.0.0" in str(labels) or "127.0.0.1" in str(labels) for _, labels in found)


def test_datagrams_truncated_are_counted():
    stats = Stats()
    server = sockserve.compose("udp", "sync", plugins=[stats])(("127.0.0.1", 0), UpperFailSlow)
    server.max_packet_size = 16
    server.handle_error = lambda *args: None
    with serving(server):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"x" * 100, server.server_address)
            assert wait_until(lambda: samples(stats.render(server).decode()).get(
                ("sockserve_datagrams_truncated_total", ())) == 1, timeout=5)


def test_a_prometheus_client_registry_collects_the_same_values():
    from prometheus_client import CollectorRegistry, generate_latest

    stats = Stats()
    server = counted(stats, "threadpool")
    registry = CollectorRegistry()
    registry.register(Collector(server))
    with serving(server):
        for payload in (b"a", b"fail", b"b"):
            ask(server, payload)

        def settled() -> bool:
            # The client sees EOF before the pool thread leaves run_request: wait for the
            # gauges too, or the two scrapes below may see a connection still active.
            found = samples(generate_latest(registry).decode())
            return (found.get(("sockserve_requests_total", (("outcome", "ok"),))) == 2
                    and found.get(("sockserve_connections_active", ())) == 0
                    and found.get(("sockserve_pool_threads_busy", ())) == 0)

        assert wait_until(settled, timeout=5)
        theirs = samples(generate_latest(registry).decode())
        ours = samples(stats.render(server).decode())
    # prometheus_client adds _created samples to counters of its own; the rest agree.
    assert {k: v for k, v in theirs.items() if not k[0].endswith("_created")} == ours
    with pytest.raises(TypeError, match="Collector needs a server"):
        Collector(object())


class Silent(sockserve.BaseRequestHandler):
    """Wait for data that never comes (until idle_timeout ends the request)."""

    def handle(self) -> None:
        self.request.recv(1)


class HoldUntil(sockserve.BaseRequestHandler):
    release = threading.Event()

    def handle(self) -> None:
        self.request.recv(1)
        self.release.wait(10)
        self.request.sendall(b"ok")


@pytest.mark.parametrize("concurrency", ["threadpool", pytest.param("prefork", marks=requires_fork)])
def test_requests_timed_out_are_exported_by_limit(concurrency):
    """Three silent clients past idle_timeout: requests_timed_out{limit="idle"} is 3."""
    stats = Stats(metrics_address=("127.0.0.1", 0))
    options: dict[str, Any] = {"idle_timeout": 0.2, "first_byte_timeout": 0}
    if concurrency == "prefork":
        options["workers"] = 1
    server = sockserve.compose("tcp", concurrency, plugins=[stats], options=options)(
        ("127.0.0.1", 0), Silent)
    with serving(server):
        for _ in range(3):
            with socket.create_connection(server.server_address, timeout=10) as client:
                assert read_to_eof(client) == b""  # closed by the server after 0.2 s

        def timed_out() -> float:
            return value(samples(scrape(stats)[1]), "sockserve_requests_timed_out_total",
                         limit="idle")

        assert wait_until(lambda: timed_out() == 3, timeout=10), timed_out()
        found = samples(scrape(stats)[1])
    assert value(found, "sockserve_requests_total", outcome="timeout") == 3
    assert value(found, "sockserve_requests_timed_out_total", limit="request") == 0


def test_limits_reached_are_exported_by_limit():
    """A full pool of 1 thread makes a second request wait: limits_reached{limit="threads"}."""
    stats = Stats(metrics_address=("127.0.0.1", 0))
    HoldUntil.release.clear()
    server = sockserve.compose("tcp", "threadpool", plugins=[stats], options={"threads": 1})(
        ("127.0.0.1", 0), HoldUntil)
    try:
        with serving(server), held_connections(server.server_address, 2) as clients:
            assert wait_until(lambda: server.limits_reached["threads"] == 1, timeout=10)

            def reached() -> float:
                return value(samples(scrape(stats)[1]), "sockserve_limits_reached_total",
                             limit="threads")

            assert reached() == 1  # a scrape copies the server's counts first
            HoldUntil.release.set()
            for client in clients:
                assert read_to_eof(client) == b"ok"
            found = samples(scrape(stats)[1])
    finally:
        HoldUntil.release.set()
    assert value(found, "sockserve_limits_reached_total", limit="threads") == 1
    assert value(found, "sockserve_limits_reached_total", limit="max_connections") == 0


def test_a_running_connection_is_counted_accepted_before_it_ends():
    stats = Stats(metrics_address=("127.0.0.1", 0))
    HoldUntil.release.clear()
    server = sockserve.compose("tcp", "threadpool", plugins=[stats])(("127.0.0.1", 0), HoldUntil)
    try:
        with serving(server):
            with socket.create_connection(server.server_address, timeout=10) as client:
                client.sendall(b"x")
                assert wait_until(lambda: value(samples(scrape(stats)[1]),
                                                "sockserve_connections_accepted_total") == 1,
                                  timeout=10)
                HoldUntil.release.set()
                assert read_to_eof(client) == b"ok"
    finally:
        HoldUntil.release.set()
