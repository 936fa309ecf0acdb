"""ThreadingMixIn: a thread per request, joined on close, bounded by drain_timeout."""

from __future__ import annotations

import socket
import socketserver
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


