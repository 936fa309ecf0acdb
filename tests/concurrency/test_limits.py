"""Limits and timeouts (issue 9, item 4): idle_timeout, request_timeout, max_connections and
max_connections_per_ip, each off by default in the documented classes."""

from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import ExitStack
from typing import Any

import pytest

import sockserve
from support import no_leaks, read_to_eof, requires_fork, serving, tcp_client, wait_until

LOOPBACK = ("127.0.0.1", 0)


class Line(sockserve.StreamRequestHandler):
    """Reads one line, answers it upper-cased."""

    def handle(self) -> None:
        self.wfile.write(self.rfile.readline().upper())


class Gate:
    """Handlers that report they started, then wait for their client's line."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = 0
        self.running = 0
        self.most = 0

    def handler(self) -> type[sockserve.StreamRequestHandler]:
        gate = self

        class Held(sockserve.StreamRequestHandler):
            def handle(self) -> None:
                with gate.lock:
                    gate.started += 1
                    gate.running += 1
                    gate.most = max(gate.most, gate.running)
                try:
                    self.wfile.write(self.rfile.readline().upper())
                finally:
                    with gate.lock:
                        gate.running -= 1

        return Held


class Finishes:
    def __init__(self) -> None:
        self.excs: list[Any] = []
        self.denied: list[str] = []

    @sockserve.hookimpl
    def sockserve_request_finish(self, server, request, client_address, exc):
        self.excs.append(exc)

    @sockserve.hookimpl
    def sockserve_request_denied(self, server, request, client_address, reason):
        self.denied.append(reason)


def ended_by_server(client: socket.socket, within: float) -> bool:
    client.settimeout(within)
    try:
        return read_to_eof(client) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_the_documented_classes_have_every_limit_off():
    for cls in (sockserve.TCPServer, sockserve.ThreadingTCPServer, sockserve.UDPServer):
        for name in ("idle_timeout", "request_timeout", "max_connections", "max_connections_per_ip"):
            assert getattr(cls, name) is None, (cls, name)


@pytest.mark.parametrize("concurrency", ["sync", "threading", "threadpool"])
def test_idle_timeout_ends_a_stalled_read_in_one_line_without_a_traceback(concurrency, caplog, capfd):
    finishes = Finishes()
    cls = sockserve.compose("tcp", concurrency, plugins=[finishes], options={"idle_timeout": 0.3})
    with no_leaks(), caplog.at_level(logging.INFO, logger="sockserve"):
        with serving(cls(LOOPBACK, Line)) as server:
            with tcp_client(server) as client:
                client.sendall(b"no newline")  # readable, then nothing more
                start = time.monotonic()
                assert ended_by_server(client, 5)
                took = time.monotonic() - start
            assert wait_until(lambda: server.requests_timed_out["idle"] == 1)
            with tcp_client(server) as client:  # a client that keeps talking is served
                client.sendall(b"fine\n")
                assert read_to_eof(client) == b"FINE\n"
    assert 0.2 < took < 2.0, took
    assert "Traceback" not in capfd.readouterr().err
    lines = [r.getMessage() for r in caplog.records if "idle_timeout" in r.getMessage()]
    assert len(lines) == 1 and "idle_timeout=0.3s" in lines[0], lines
    assert [type(e) for e in finishes.excs] == [TimeoutError, type(None)]


def test_idle_timeout_is_per_read_not_per_request():
    class Three(sockserve.StreamRequestHandler):
        def handle(self) -> None:
            for _ in range(3):
                self.wfile.write(self.rfile.readline().upper())

    cls = sockserve.compose("tcp", "threading", options={"idle_timeout": 0.4})
    with serving(cls(LOOPBACK, Three)) as server:
        with tcp_client(server) as client:
            for word in (b"a\n", b"b\n", b"c\n"):
                time.sleep(0.25)  # 0.75 s in all, each wait under the limit
                client.sendall(word)
            assert read_to_eof(client) == b"A\nB\nC\n"
        assert server.requests_timed_out["idle"] == 0


def test_request_timeout_cuts_200_stalled_clients_at_the_deadline(capfd):
    """The issue's check: 200 clients that send one byte and stall are cut at
    request_timeout; then descriptors and threads are back to baseline."""
    # A backlog for 200 clients connecting at once (the documented 5 drops SYNs: seconds).
    cls = sockserve.compose("tcp", "threading",
                            options={"request_timeout": 0.5, "request_queue_size": 256})
    with no_leaks(), ExitStack() as stack:
        with serving(cls(LOOPBACK, Line)) as server:
            clients = [stack.enter_context(tcp_client(server)) for _ in range(200)]
            start = time.monotonic()
            for client in clients:
                client.sendall(b"x")
            assert all(ended_by_server(c, 5) for c in clients)
            took = time.monotonic() - start
            assert wait_until(lambda: server.requests_timed_out["request"] == 200)
            with tcp_client(server) as client:
                client.sendall(b"after\n")
                assert read_to_eof(client) == b"AFTER\n"
            stack.close()
    assert took < 3.0, took
    assert "Traceback" not in capfd.readouterr().err


def test_request_timeout_under_threadpool_frees_the_threads_for_others():
    cls = sockserve.compose("tcp", "threadpool", options={"threads": 2, "request_timeout": 0.3})
    with no_leaks(), ExitStack() as stack:
        with serving(cls(LOOPBACK, Line)) as server:
            stalled = [stack.enter_context(tcp_client(server)) for _ in range(2)]
            for client in stalled:
                client.sendall(b"x")
            time.sleep(0.1)
            with tcp_client(server) as client:  # waits for a thread, gets one at 0.3 s
                client.sendall(b"waited\n")
                assert read_to_eof(client) == b"WAITED\n"
            assert all(ended_by_server(c, 2) for c in stalled)
            assert wait_until(lambda: server.requests_timed_out["request"] == 2)
            stack.close()


@pytest.mark.parametrize("concurrency", ["threading", "threadpool"])
def test_max_connections_pauses_accepting_and_refuses_no_one(concurrency):
    gate = Gate()
    options: dict[str, Any] = {"max_connections": 3}
    if concurrency == "threadpool":
        options["threads"] = 8
    cls = sockserve.compose("tcp", concurrency, options=options)
    with no_leaks(), ExitStack() as stack:
        with serving(cls(LOOPBACK, gate.handler())) as server:
            clients = [stack.enter_context(tcp_client(server)) for _ in range(7)]
            for client in clients:
                client.sendall(b"x")  # readable: each would start a handler at once
            assert wait_until(lambda: gate.started == 3)
            time.sleep(0.3)
            assert gate.started == 3  # the rest wait in the listen backlog
            assert server.limits_reached["max_connections"] >= 1
            for client in clients:  # finish them one by one: every one is served
                client.sendall(b"\n")
                assert read_to_eof(client) == b"X\n"
            assert gate.started == 7 and gate.most == 3
            assert sum(server.requests_denied.values()) == 0
            stack.close()


@requires_fork
def test_max_connections_under_forking_counts_in_the_child_not_the_parent():
    """The parent moves each connection to a child (request_moved): it never pauses."""
    cls = sockserve.compose("tcp", "forking", options={"max_connections": 2})
    with no_leaks():
        with serving(cls(LOOPBACK, Line)) as server:
            for i in range(6):
                with tcp_client(server) as client:
                    client.sendall(b"f%d\n" % i)
                    assert read_to_eof(client) == b"F%d\n" % i
            assert server.limits_reached["max_connections"] == 0


class HostFromFirstByte:
    """A test layer that reports the client host the client names in its first byte, as
    the PROXY layer reports the client behind a proxy: the raw peer is one host."""

    def prepare_request(self, request: Any, client_address: Any) -> tuple[Any, Any]:
        request, client_address = super().prepare_request(request, client_address)  # type: ignore[misc]
        first = request.recv(1, socket.MSG_PEEK)
        return request, (f"198.51.100.{first.decode()}", client_address[1])


def test_max_connections_per_ip_denies_the_extra_ones_from_one_host():
    gate = Gate()
    finishes = Finishes()
    cls = sockserve.compose("tcp", "threading", plugins=[finishes],
                            options={"max_connections_per_ip": 2})
    with no_leaks(), ExitStack() as stack:
        with serving(cls(LOOPBACK, gate.handler())) as server:
            first = [stack.enter_context(tcp_client(server)) for _ in range(2)]
            for client in first:
                client.sendall(b"x")
            assert wait_until(lambda: gate.started == 2)
            with tcp_client(server) as third:
                third.sendall(b"x\n")
                assert ended_by_server(third, 5)
            assert wait_until(lambda: server.requests_denied["per-ip"] == 1)
            for client in first:
                client.sendall(b"\n")
                assert read_to_eof(client) == b"X\n"
            with tcp_client(server) as later:  # the count went back down
                later.sendall(b"y\n")
                assert read_to_eof(later) == b"Y\n"
            stack.close()
    assert finishes.denied == ["per-ip"]


def test_max_connections_per_ip_counts_the_address_the_layers_report():
    gate = Gate()
    cls = sockserve.compose("tcp", "threading", layers=[HostFromFirstByte],
                            options={"max_connections_per_ip": 1})
    with no_leaks(), ExitStack() as stack:
        with serving(cls(LOOPBACK, gate.handler())) as server:
            one, two = (stack.enter_context(tcp_client(server)) for _ in range(2))
            one.sendall(b"1")
            two.sendall(b"2")
            assert wait_until(lambda: gate.started == 2)  # one raw peer, two hosts
            with tcp_client(server) as extra:  # a second client of host 1: one too many
                extra.sendall(b"1\n")
                assert ended_by_server(extra, 5)
            assert server.requests_denied["per-ip"] == 1
            for client in (one, two):
                client.sendall(b"\n")
            assert read_to_eof(one) == b"1\n" and read_to_eof(two) == b"2\n"
            stack.close()


def test_limits_cost_nothing_when_off():
    """With every limit off, run_request does no limit bookkeeping at all."""
    with serving(sockserve.ThreadingTCPServer(LOOPBACK, Line)) as server:
        with tcp_client(server) as client:
            client.sendall(b"q\n")
            assert read_to_eof(client) == b"Q\n"
        assert server._sockserve_limited is False
        assert server._sockserve_state.limits is None


def test_threadpool_makes_its_thread_limit_visible_when_a_request_waits(caplog):
    """Keep-alive clients hold a thread each: the 3rd of 3 waits with 2 threads. That is
    counted (limits_reached["threads"]) and said once, not left silent."""
    gate = Gate()
    cls = sockserve.compose("tcp", "threadpool", options={"threads": 2})
    with no_leaks(), ExitStack() as stack, caplog.at_level(logging.WARNING, logger="sockserve"):
        with serving(cls(LOOPBACK, gate.handler())) as server:
            clients = [stack.enter_context(tcp_client(server)) for _ in range(4)]
            for client in clients:
                client.sendall(b"k")
            assert wait_until(lambda: gate.started == 2)
            assert wait_until(lambda: server.limits_reached["threads"] == 2)
            for client in clients:
                client.sendall(b"\n")
                assert read_to_eof(client) == b"K\n"
            stack.close()
    lines = [r.getMessage() for r in caplog.records if "threads busy" in r.getMessage()]
    assert len(lines) == 1 and "all 2 threads busy" in lines[0], lines
