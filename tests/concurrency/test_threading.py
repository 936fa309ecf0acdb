"""ThreadingMixIn: a thread per request, joined on close, bounded by drain_timeout."""

from __future__ import annotations

import logging
import socket
import socketserver
import sys
import threading
import time

import pytest

import sockserve
from support import connect, no_leaks, read_to_eof, serving

LOOPBACK = ("127.0.0.1", 0)


class RecordingServer(sockserve.ThreadingTCPServer):
    """Remembers which thread runs serve_forever (service_actions runs there)."""

    def __init__(self, *args, **kwargs):
        self.serving_idents: set[int] = set()
        super().__init__(*args, **kwargs)

    def service_actions(self):
        self.serving_idents.add(threading.get_ident())
        super().service_actions()


def test_requests_run_concurrently_in_separate_threads():
    """Two handlers meet at a barrier; a server running them one at a time never gets there."""
    barrier = threading.Barrier(2, timeout=5)
    idents: list[int] = []

    class Meet(sockserve.BaseRequestHandler):
        def handle(self):
            idents.append(threading.get_ident())
            barrier.wait()  # both handlers must be inside handle() at the same time
            self.request.sendall(b"met")

    with no_leaks():
        with serving(RecordingServer(LOOPBACK, Meet)) as server:
            clients = [connect(server) for _ in range(2)]
            try:
                replies = [read_to_eof(client) for client in clients]
            finally:
                for client in clients:
                    client.close()
    assert replies == [b"met", b"met"]
    assert len(set(idents)) == 2
    assert not set(idents) & server.serving_idents


def test_daemon_threads_sets_the_request_threads_daemon_flag():
    seen: list[bool] = []

    class Report(sockserve.BaseRequestHandler):
        def handle(self):
            seen.append(threading.current_thread().daemon)
            self.request.sendall(b"ok")

    class Daemonic(sockserve.ThreadingTCPServer):
        daemon_threads = True

    with no_leaks():
        for cls in (sockserve.ThreadingTCPServer, Daemonic):
            with serving(cls(LOOPBACK, Report)) as server:
                with connect(server) as client:
                    assert read_to_eof(client) == b"ok"
    assert sockserve.ThreadingTCPServer.daemon_threads is False
    assert seen == [False, True]


def test_server_close_waits_for_a_slow_request_when_block_on_close():
    started = threading.Event()
    finished_at: list[float] = []

    class Slow(sockserve.BaseRequestHandler):
        def handle(self):
            started.set()
            time.sleep(0.5)
            finished_at.append(time.monotonic())
            self.request.sendall(b"done")

    assert sockserve.ThreadingTCPServer.block_on_close is True
    with no_leaks():
        with serving(sockserve.ThreadingTCPServer(LOOPBACK, Slow)) as server:
            with connect(server) as client:
                assert started.wait(5)
                server.shutdown()
                server.server_close()
                returned_at = time.monotonic()
                assert finished_at, "server_close returned before the request finished"
                assert finished_at[0] <= returned_at
                assert read_to_eof(client) == b"done"


def test_server_close_returns_at_once_without_block_on_close():
    started = threading.Event()
    release = threading.Event()
    finished = threading.Event()
    request_threads: list[threading.Thread] = []

    class Blocked(sockserve.BaseRequestHandler):
        def handle(self):
            request_threads.append(threading.current_thread())
            started.set()
            release.wait(10)
            finished.set()

    class NonBlocking(sockserve.ThreadingTCPServer):
        block_on_close = False

    with no_leaks():
        with serving(NonBlocking(LOOPBACK, Blocked)) as server:
            with connect(server):
                assert started.wait(5)
                server.shutdown()
                begin = time.monotonic()
                server.server_close()
                elapsed = time.monotonic() - begin
                assert not finished.is_set()
                release.set()
                request_threads[0].join(5)
    assert elapsed < 0.5
    assert finished.is_set()


@pytest.mark.parametrize("module", [socketserver, sockserve], ids=["socketserver", "sockserve"])
def test_server_close_does_not_wait_for_daemon_threads(module):
    """As documented for the standard module: server_close joins only non-daemon threads."""
    started = threading.Event()
    release = threading.Event()
    request_threads: list[threading.Thread] = []

    class Blocked(module.BaseRequestHandler):
        def handle(self):
            request_threads.append(threading.current_thread())
            started.set()
            release.wait(10)

    class Daemonic(module.ThreadingTCPServer):
        daemon_threads = True

    server = Daemonic(LOOPBACK, Blocked)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,))
    thread.start()
    # A server that wrongly joins the daemon thread is released after a second.
    releaser = threading.Timer(1.0, release.set)
    releaser.start()
    try:
        with socket.create_connection(server.server_address, timeout=10):
            assert started.wait(5)
            server.shutdown()
            begin = time.monotonic()
            server.server_close()
            elapsed = time.monotonic() - begin
            still_running = request_threads[0].is_alive()
    finally:
        release.set()
        releaser.cancel()
        releaser.join(5)
        server.shutdown()
        thread.join(10)
        server.server_close()
        for request_thread in request_threads:
            request_thread.join(5)
    assert elapsed < 0.5, f"server_close waited {elapsed:.2f}s for a daemon request thread"
    assert still_running


def test_finished_request_threads_are_not_kept():
    """After many requests the server holds no thread objects for requests that ended."""
    request_threads: list[threading.Thread] = []

    class Record(sockserve.BaseRequestHandler):
        def handle(self):
            request_threads.append(threading.current_thread())
            self.request.sendall(b"ok")

    with no_leaks():
        with serving(sockserve.ThreadingTCPServer(LOOPBACK, Record)) as server:
            for _ in range(50):
                with connect(server) as client:
                    assert read_to_eof(client) == b"ok"
            for thread in request_threads:
                thread.join(5)
            assert not any(thread.is_alive() for thread in request_threads)
            assert len(request_threads) == 50
            assert not server._threads
            assert server._threads is not None  # tracked while they ran, then dropped


def test_handler_exception_goes_to_handle_error_in_the_request_thread():
    handler_idents: list[int] = []
    errors: list[tuple] = []

    class MaybeRaise(sockserve.StreamRequestHandler):
        def handle(self):
            handler_idents.append(threading.get_ident())
            if self.rfile.readline() == b"raise\n":
                raise ValueError("boom from the handler")
            self.wfile.write(b"fine")

    class Counting(RecordingServer):
        def handle_error(self, request, client_address):
            kind, exc, _ = sys.exc_info()
            errors.append((threading.get_ident(), kind, str(exc), client_address))

    with no_leaks():
        with serving(Counting(LOOPBACK, MaybeRaise)) as server:
            with connect(server) as client:
                client.sendall(b"raise\n")
                assert read_to_eof(client) == b""
                raiser = client.getsockname()
            for _ in range(3):  # the server serves on
                with connect(server) as client:
                    client.sendall(b"hello\n")
                    assert read_to_eof(client) == b"fine"
    assert errors == [(handler_idents[0], ValueError, "boom from the handler", raiser)]
    assert handler_idents[0] not in server.serving_idents


def test_drain_timeout_cuts_off_a_handler_blocked_on_a_silent_client(caplog):
    started = threading.Event()
    received: list[bytes] = []

    class WaitForever(sockserve.BaseRequestHandler):
        def handle(self):
            self.request.settimeout(30)  # a bound for the test, far beyond the drain
            started.set()
            received.append(self.request.recv(1024))

    class Draining(sockserve.ThreadingTCPServer):
        drain_timeout = 0.3

    with no_leaks():
        with serving(Draining(LOOPBACK, WaitForever)) as server:
            with connect(server) as silent:
                assert started.wait(5)
                server.shutdown()
                with caplog.at_level(logging.WARNING, logger="sockserve"):
                    begin = time.monotonic()
                    server.server_close()
                    elapsed = time.monotonic() - begin
                assert read_to_eof(silent) == b""
    assert 0.3 <= elapsed < 0.3 + 1.5
    assert server.requests_cut_off == 1
    assert received == [b""]  # recv returned when the connection was shut down
    warnings = [r for r in caplog.records if r.name == "sockserve" and r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "Draining: drain deadline of 0.3s passed; cut off 1 in-flight request(s)"
    ]


def test_per_request_hooks_fire_in_the_request_thread():
    class Recorder:
        def __init__(self):
            self.events: list[tuple] = []

        @sockserve.hookimpl
        def sockserve_request_start(self, client_address):
            self.events.append(("start", client_address, threading.get_ident()))

        @sockserve.hookimpl
        def sockserve_request_finish(self, client_address, exc):
            self.events.append(("finish", client_address, threading.get_ident(), exc))

    recorder = Recorder()
    handled: dict[tuple, int] = {}

    class Record(sockserve.BaseRequestHandler):
        def handle(self):
            handled[self.client_address] = threading.get_ident()
            self.request.sendall(b"ok")

    class Hooked(sockserve.compose("tcp", "threading", plugins=[recorder])):
        def __init__(self, *args):
            self.serving_idents: set[int] = set()
            super().__init__(*args)

        def service_actions(self):
            self.serving_idents.add(threading.get_ident())

    with no_leaks():
        with serving(Hooked(LOOPBACK, Record)) as server:
            for _ in range(3):
                with connect(server) as client:
                    assert read_to_eof(client) == b"ok"
    assert len(handled) == 3
    expected = []
    for address, ident in handled.items():
        expected += [("start", address, ident), ("finish", address, ident, None)]
    assert sorted(recorder.events, key=repr) == sorted(expected, key=repr)
    assert not set(handled.values()) & server.serving_idents
