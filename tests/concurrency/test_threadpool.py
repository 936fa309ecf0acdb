"""ThreadpoolMixIn: a bounded pool of worker threads fed by the accept loop, drained on close."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

import sockserve
from support import connect, no_leaks, read_to_eof, serving, skip_unless_supported, start_serving, wait_until

LOOPBACK = ("127.0.0.1", 0)


class Gate:
    """Shared state of gated handlers: how many started, how many run now, the peak."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = 0
        self.active = 0
        self.peak = 0
        self.release = threading.Event()

    def handler(self) -> type:
        """A handler that waits for ``release``, then upper-cases the request."""
        gate = self

        class Gated(sockserve.BaseRequestHandler):
            def handle(self):
                with gate.lock:
                    gate.started += 1
                    gate.active += 1
                    gate.peak = max(gate.peak, gate.active)
                try:
                    gate.release.wait(10)
                    if isinstance(self.request, tuple):
                        data, sock = self.request
                        sock.sendto(data.upper(), self.client_address)
                    else:
                        self.request.sendall(read_to_eof(self.request).upper())
                finally:
                    with gate.lock:
                        gate.active -= 1

        return Gated


class Verified:
    """A lifecycle plugin counting the requests the serving thread accepted (verify_request)."""

    def __init__(self) -> None:
        self.count = 0

    @sockserve.hookimpl
    def sockserve_verify_request(self):
        self.count += 1  # only the serving thread calls it
        return None


def send_request(server, payload: bytes) -> socket.socket:
    """Connect, send *payload* and end the request (SHUT_WR); the reply is still to be read."""
    client = connect(server)
    client.sendall(payload)
    client.shutdown(socket.SHUT_WR)
    return client


@contextlib.contextmanager
def gated_requests(server, gate: Gate, count: int) -> Iterator[list[socket.socket]]:
    """Send requests ``b"req 0"``.. to *server*; on exit open *gate* and close the clients."""
    clients = [send_request(server, b"req %d" % i) for i in range(count)]
    try:
        yield clients
    finally:
        gate.release.set()
        for client in clients:
            client.close()


class Upper(sockserve.BaseRequestHandler):
    """Upper-case echo; datagram clients are told apart by their payload."""

    def handle(self):
        if isinstance(self.request, tuple):
            data, sock = self.request
            time.sleep(0.01)  # long enough for requests to overlap in the pool
            sock.sendto(data.upper(), self.client_address)
            return
        data = read_to_eof(self.request)
        time.sleep(0.01)
        self.request.sendall(data.upper())


@pytest.mark.parametrize("transport", ["tcp", "udp", "unix", "unix-dgram"])
def test_many_concurrent_clients_are_all_answered(transport, tmp_path):
    skip_unless_supported(transport, "threadpool")
    # A listen backlog for all the clients: a full one makes a Unix client's connect()
    # fail with EAGAIN and a TCP client's SYN wait a second for its retransmission.
    options = {"threads": 4, "backlog": 2, "request_queue_size": 64}
    cls = sockserve.compose(transport, "threadpool", options=options)
    address = LOOPBACK if transport in ("tcp", "udp") else str(tmp_path / "s.sock")

    def client(i: int) -> bytes:
        with socket.socket(server.address_family, server.socket_type) as sock:
            sock.settimeout(10)
            if transport == "unix-dgram":
                sock.bind(str(tmp_path / f"c{i}.sock"))  # to receive the reply
            sock.connect(server.server_address)
            sock.sendall(b"client %d" % i)
            if server.socket_type == socket.SOCK_STREAM:
                sock.shutdown(socket.SHUT_WR)
                return read_to_eof(sock)
            return sock.recv(65536)

    with no_leaks():
        with serving(cls(address, Upper)) as server:
            with ThreadPoolExecutor(max_workers=16) as clients:
                replies = list(clients.map(client, range(40)))
    assert replies == [b"CLIENT %d" % i for i in range(40)]


def test_no_more_than_threads_handlers_run_at_once():
    gate = Gate()
    options = {"threads": 3, "backlog": 10, "request_queue_size": 16}  # nine connect at once
    cls = sockserve.compose("tcp", "threadpool", options=options)
    with no_leaks():
        with serving(cls(LOOPBACK, gate.handler())) as server:
            with gated_requests(server, gate, 9) as clients:
                assert wait_until(lambda: gate.active == 3), f"{gate.active} handlers running"
                time.sleep(0.2)  # six more requests are waiting: none may start now
                assert (gate.started, gate.active) == (3, 3)
                gate.release.set()
                replies = [read_to_eof(client) for client in clients]
    assert replies == [b"REQ %d" % i for i in range(9)]
    assert gate.peak == 3
    assert gate.started == 9


def test_full_pool_stops_the_serving_thread_from_accepting():
    """threads=1, backlog=1: one runs, one waits; later ones stay in the kernel's backlog."""
    gate = Gate()
    verified = Verified()
    # first_byte_timeout=0, as in the next test: without it a client accepted before its
    # bytes arrived waits in the waiting room, apart from the pool, and one more is accepted.
    cls = sockserve.compose(
        "tcp", "threadpool", plugins=[verified], options={"threads": 1, "backlog": 1, "first_byte_timeout": 0}
    )
    with no_leaks():
        with serving(cls(LOOPBACK, gate.handler())) as server:
            # connect() completes for all four: the kernel's listen backlog holds them.
            with gated_requests(server, gate, 4) as clients:
                assert wait_until(lambda: gate.started == 1 and verified.count >= 2)
                time.sleep(0.3)  # room for the serving thread to accept more, if it would
                assert gate.started == 1
                assert verified.count == 2, f"{verified.count} accepted for 1 worker + backlog 1"
                gate.release.set()
                replies = [read_to_eof(client) for client in clients]
    assert replies == [b"REQ %d" % i for i in range(4)]
    assert verified.count == 4


def test_shutdown_returns_promptly_while_the_pool_is_full():
    """A busy pool does not keep shutdown() waiting: in-flight requests are server_close()'s job."""
    gate = Gate()
    verified = Verified()
    # first_byte_timeout=0: every accepted connection goes to the pool at once, so the
    # pool's bound is what limits accepting (the waiting room would accept a client
    # whose bytes have not arrived yet, and hold it apart from the pool).
    cls = sockserve.compose(
        "tcp", "threadpool", plugins=[verified],
        options={"threads": 1, "backlog": 0, "first_byte_timeout": 0},
    )
    with no_leaks():
        server = cls(LOOPBACK, gate.handler())
        thread = start_serving(server)
        clients = [send_request(server, b"req %d" % i) for i in range(3)]
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        try:
            assert wait_until(lambda: gate.started == 1 and verified.count >= 1)
            time.sleep(0.2)  # let the serving thread reach the full pool
            stopper.start()
            stopper.join(1.5)
            assert not stopper.is_alive(), "shutdown() waited for a busy worker"
            thread.join(10)
            gate.release.set()
            server.server_close()  # lets the running request finish
            first = read_to_eof(clients[0])
        finally:
            gate.release.set()
            if stopper.ident is None:
                server.shutdown()
            else:
                stopper.join(10)
            thread.join(10)
            server.server_close()
            for client in clients:
                client.close()
        assert not thread.is_alive()
    assert first == b"REQ 0"
    assert (gate.started, verified.count) == (1, 1)  # the others were never accepted


def test_serve_forever_again_after_a_shutdown_with_a_busy_pool_keeps_the_bound():
    """A shutdown that found the serving thread in poll() (pool full, nothing waiting)
    leaves no stale wake-up behind: the next serve_forever serves and still accepts no
    more than ``threads + backlog`` requests at once."""
    gate = Gate()
    verified = Verified()
    # first_byte_timeout=0: every accepted connection goes to the pool at once, so the
    # pool's bound is what limits accepting (the waiting room would accept a client
    # whose bytes have not arrived yet, and hold it apart from the pool).
    cls = sockserve.compose(
        "tcp", "threadpool", plugins=[verified],
        options={"threads": 1, "backlog": 0, "first_byte_timeout": 0},
    )
    with no_leaks():
        server = cls(LOOPBACK, gate.handler())
        thread = start_serving(server)
        try:
            first = send_request(server, b"first")
            assert wait_until(lambda: gate.started == 1)
            time.sleep(0.1)  # the serving thread is back in poll(): nothing else waits
            started = time.monotonic()
            server.shutdown()
            assert time.monotonic() - started < 1.0
            thread.join(10)
            assert not thread.is_alive()
            gate.release.set()
            assert read_to_eof(first) == b"FIRST"
            first.close()
            gate.release.clear()
            thread = start_serving(server)
            clients = [send_request(server, b"again %d" % i) for i in range(3)]
            assert wait_until(lambda: gate.started == 2)
            time.sleep(0.3)  # room for the serving thread to accept more, if it would
            assert verified.count == 2, f"{verified.count} accepted for 1 worker + backlog 0"
            gate.release.set()
            replies = [read_to_eof(client) for client in clients]
            for client in clients:
                client.close()
        finally:
            gate.release.set()
            server.shutdown()
            thread.join(10)
            server.server_close()
    assert replies == [b"AGAIN %d" % i for i in range(3)]
    assert verified.count == 4


def test_close_with_block_on_close_drains_queued_and_running_requests():
    gate = Gate()
    verified = Verified()
    cls = sockserve.compose(
        "tcp", "threadpool", plugins=[verified], options={"threads": 1, "backlog": 3}
    )
    with no_leaks():
        server = cls(LOOPBACK, gate.handler())
        thread = start_serving(server)
        with gated_requests(server, gate, 3) as clients:
            assert wait_until(lambda: gate.started == 1 and verified.count == 3)
            started = time.monotonic()
            server.shutdown()  # stops accepting; the pool still holds all three
            assert time.monotonic() - started < 1.5
            thread.join(10)
            threading.Timer(0.3, gate.release.set).start()
            started = time.monotonic()
            server.server_close()  # waits: one running, two queued
            closed_in = time.monotonic() - started
            replies = [read_to_eof(client) for client in clients]
    assert replies == [b"REQ 0", b"REQ 1", b"REQ 2"]
    assert closed_in >= 0.25, "server_close() returned before the requests finished"
    assert gate.started == 3
    assert server.requests_cut_off == 0


class ReadToEofThenReply(sockserve.BaseRequestHandler):
    """Replies once the client has sent everything; a client that never ends keeps it busy."""

    def handle(self):
        data = read_to_eof(self.request)
        try:
            self.request.sendall(data.upper())
        except OSError:
            pass  # cut off at the drain deadline: the connection is shut down


def test_drain_timeout_bounds_close_and_counts_cut_off_requests(caplog):
    verified = Verified()
    cls = sockserve.compose(
        "tcp",
        "threadpool",
        plugins=[verified],
        options={"threads": 1, "backlog": 2, "drain_timeout": 0.3},
    )
    caplog.set_level(logging.WARNING, logger="sockserve")
    with no_leaks():
        server = cls(LOOPBACK, ReadToEofThenReply)
        thread = start_serving(server)
        clients = []
        try:
            for i in range(3):  # never half-closed: the first handler waits for EOF forever
                client = connect(server)
                client.sendall(b"req %d" % i)
                clients.append(client)
            assert wait_until(lambda: verified.count == 3)
            server.shutdown()
            thread.join(10)
            started = time.monotonic()
            server.server_close()
            closed_in = time.monotonic() - started
            # The running request was cut off, the two queued ones dropped: all see EOF.
            replies = [read_to_eof(client) for client in clients]
        finally:
            for client in clients:
                client.close()
    assert 0.25 <= closed_in < 2.0  # drain_timeout, then the cut-off request returns
    assert replies == [b"", b"", b""]
    # The running one was cut off; the two never started were denied ("closing").
    assert server.requests_cut_off == 1
    assert server.requests_denied["closing"] == 2
    assert "drain deadline of 0.3s passed; cut off 1 in-flight request(s)" in caplog.text


def test_close_without_block_on_close_drops_queued_requests():
    gate = Gate()
    verified = Verified()
    cls = sockserve.compose(
        "tcp",
        "threadpool",
        plugins=[verified],
        options={"threads": 1, "backlog": 2, "block_on_close": False},
    )
    with no_leaks():
        server = cls(LOOPBACK, gate.handler())
        thread = start_serving(server)
        with gated_requests(server, gate, 3) as clients:
            assert wait_until(lambda: gate.started == 1 and verified.count == 3)
            server.shutdown()
            thread.join(10)
            started = time.monotonic()
            server.server_close()
            closed_in = time.monotonic() - started
            dropped = [read_to_eof(client) for client in clients[1:]]
            gate.release.set()  # the running request still finishes
            first = read_to_eof(clients[0])
    assert closed_in < 0.5, "server_close() waited although block_on_close is False"
    assert dropped == [b"", b""]
    assert first == b"REQ 0"
    assert gate.started == 1
    assert server.requests_denied["closing"] == 2
    assert server.requests_cut_off == 0


