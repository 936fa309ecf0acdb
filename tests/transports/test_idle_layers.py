"""Idle and slow clients under the ``tls`` and ``proxy`` layers on a threadpool (issue 9,
"How it is checked": the same as the plain-TCP check in
tests/concurrency/test_waiting_room.py, with 500 silent TLS clients and 500 silent PROXY
clients).

Silent connections never reach a layer: until their first byte they wait in the serve
loop's poller (``when_readable``), holding a descriptor and no thread, and are closed at
``first_byte_timeout`` (reason ``first-byte``), while real clients doing a full TLS
handshake, or sending a PROXY v1 or v2 header, are answered at once. Slow connections, which
send the first bytes of a ClientHello or of a PROXY header and stall, are readable: they do
reach the layer and hold a thread until ``handshake_timeout`` / ``header_timeout``
(``tls-timeout`` / ``proxy-timeout``), so there are 16 of them on 8 threads (two waves), and
real clients are served as the threads free up.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

import sockserve
from support import closed_by_server, missing, no_leaks, serving, wait_until

sys.path.insert(0, str(Path(__file__).parent))  # tls_support, proxy_support: beside this file
import proxy_support as ps  # noqa: E402
from tls_support import OPENSSL, client_context, client_hello, read_all, server_options  # noqa: E402

LOOPBACK = ("127.0.0.1", 0)
THREADS = 8
SILENT = 500
REAL = 50
#: Seconds a silent client is given before the serve loop closes it.
FIRST_BYTE_TIMEOUT = 3.0
SLOW = 16
#: handshake_timeout / header_timeout in the slow-client tests.
LAYER_TIMEOUT = 1.0

V1 = b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 443\r\n"
V2 = ps.v2(0x21, 0x11, ps.inet4("198.51.100.9", "127.0.0.1", 4444, 443))
#: The client each header names, as the handler reports it.
ORIGIN = {"v1": b"198.51.100.7:5555", "v2": b"198.51.100.9:4444"}


class EchoUpper(sockserve.StreamRequestHandler):
    """Answers one line, upper-cased, after the client address the layers report; closes."""

    def handle(self) -> None:
        self.request.settimeout(10)
        line = self.rfile.readline()
        host, port = self.client_address[:2]
        self.wfile.write(f"{host}:{port} ".encode() + line.upper())


# ------------------------------------------------------------------------ the layers


class Layer:
    """One layer under test: how to build its server and how its clients talk."""

    name: str
    #: The reason of a slow client's refusal.
    timeout_reason: str

    def options(self, **more: Any) -> dict[str, Any]:
        raise NotImplementedError

    def exchange(self, address: Any, line: bytes) -> bytes:
        """One request/response with a fresh real client; the reply (to EOF)."""
        raise NotImplementedError

    def expected(self, line: bytes) -> bytes:
        raise NotImplementedError

    def first_bytes(self) -> bytes:
        """What a slow client sends before it stalls: the start of a valid opening."""
        raise NotImplementedError


class TLS(Layer):
    name = "tls"
    timeout_reason = "tls-timeout"

    def __init__(self) -> None:
        if OPENSSL is None:
            missing("requires_openssl: the openssl program")
        self.context = client_context()

    def options(self, **more: Any) -> dict[str, Any]:
        return server_options(**more)

    def exchange(self, address: Any, line: bytes) -> bytes:
        with socket.create_connection(address, timeout=10) as raw:
            with self.context.wrap_socket(raw, server_hostname="localhost") as tls:
                # A full handshake each time: no session is offered for resumption.
                assert not tls.session_reused
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
                tls.sendall(line)
                return read_all(tls)

    def expected(self, line: bytes) -> bytes:
        return b"127.0.0.1:"  # the real peer (its port varies): checked as a prefix

    def first_bytes(self) -> bytes:
        hello = client_hello()
        assert hello[0] == 0x16 and len(hello) > 40
        return hello[:40]  # the record header and part of the ClientHello


class Proxy(Layer):
    name = "proxy"
    timeout_reason = "proxy-timeout"

    def __init__(self, version: str) -> None:
        self.version = version
        self.header = V1 if version == "v1" else V2

    def options(self, **more: Any) -> dict[str, Any]:
        return dict(more)

    def exchange(self, address: Any, line: bytes) -> bytes:
        with socket.create_connection(address, timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(self.header)
            sock.sendall(line)
            return read_all(sock)

    def expected(self, line: bytes) -> bytes:
        return ORIGIN[self.version] + b" " + line.upper()

    def first_bytes(self) -> bytes:
        return self.header[:11] if self.version == "v1" else self.header[:7]


LAYERS: dict[str, Callable[[], Layer]] = {
    "tls": TLS,
    "proxy-v1": lambda: Proxy("v1"),
    "proxy-v2": lambda: Proxy("v2"),
}


@pytest.fixture(params=list(LAYERS))
def layer(request: pytest.FixtureRequest) -> Layer:
    return LAYERS[request.param]()


def timed(layer: Layer, address: Any, line: bytes) -> float:
    """One real exchange, its reply checked; seconds it took."""
    start = time.monotonic()
    reply = layer.exchange(address, line)
    took = time.monotonic() - start
    assert reply.startswith(layer.expected(line)) and reply.endswith(b" " + line.upper()), reply
    return took


# ------------------------------------------------------------------------ silent clients


def test_500_silent_connections_do_not_delay_50_real_exchanges(layer: Layer) -> None:
    """threadpool, 8 threads: 500 connections that send nothing wait in the poller (no
    thread each, never reaching the layer); 50 real clients, each a fresh connection with
    a full TLS handshake or a PROXY header, are answered in under 1 s each while the 500
    stay open; first_byte_timeout then closes the 500; nothing is left behind."""
    cls = sockserve.compose("tcp", "threadpool", layers=[layer.name], options=layer.options(
        threads=THREADS, first_byte_timeout=FIRST_BYTE_TIMEOUT))
    with no_leaks(settle=10), ExitStack() as stack:
        with serving(cls(LOOPBACK, EchoUpper)) as server:
            address = server.server_address
            timed(layer, address, b"warm-up\n")  # the pool starts its 8 threads
            threads_before = threading.active_count()
            silent = [stack.enter_context(socket.create_connection(address, timeout=10))
                      for _ in range(SILENT)]
            connected = time.monotonic()
            assert wait_until(lambda: server.waiting == SILENT, timeout=10), server.waiting
            times = [timed(layer, address, b"x%d\n" % i) for i in range(REAL)]
            assert max(times) < 1.0, sorted(times)[-5:]
            # The 500 are still open, still waiting, with no thread each.
            assert server.waiting == SILENT
            assert server.requests_denied["first-byte"] == 0
            assert threading.active_count() == threads_before
            assert time.monotonic() - connected < FIRST_BYTE_TIMEOUT  # (so the above means it)
            assert wait_until(lambda: server.requests_denied["first-byte"] == SILENT, timeout=10), \
                server.requests_denied
            assert all(closed_by_server(c, 2.0) for c in silent)
            assert time.monotonic() - connected < FIRST_BYTE_TIMEOUT + 3.0
            assert server.waiting == 0
            assert dict(server.requests_denied) == {"first-byte": SILENT}
            stack.close()


# ------------------------------------------------------------------------ slow clients


def test_16_slow_clients_hold_8_threads_until_the_layer_timeout(layer: Layer) -> None:
    """threadpool, 8 threads: 16 clients send the first bytes of a ClientHello or PROXY
    header and stall. Readable, they reach the layer, each holding a thread until
    handshake_timeout / header_timeout (1 s): two waves of 8. A real client that comes
    right after them is answered once the second wave ends (under 2 timeouts + 1 s); real
    clients that come once the first wave is cut, each under timeout + 1 s; the 16 end as
    tls-timeout / proxy-timeout, closed; nothing is left behind."""
    timeout_option = "handshake_timeout" if layer.name == "tls" else "header_timeout"
    cls = sockserve.compose("tcp", "threadpool", layers=[layer.name], options=layer.options(
        threads=THREADS, first_byte_timeout=FIRST_BYTE_TIMEOUT, **{timeout_option: LAYER_TIMEOUT}))
    reason = layer.timeout_reason
    early: list[float | BaseException] = []

    def early_client(address: Any) -> None:
        try:
            early.append(timed(layer, address, b"early\n"))
        except BaseException as exc:  # reported by the test's thread
            early.append(exc)

    with no_leaks(settle=10), ExitStack() as stack:
        with serving(cls(LOOPBACK, EchoUpper)) as server:
            address = server.server_address
            timed(layer, address, b"warm-up\n")  # the pool starts its 8 threads
            threads_before = threading.active_count()
            first = layer.first_bytes()
            slow = []
            eighth_sent = 0.0
            for n in range(SLOW):
                sock = stack.enter_context(socket.create_connection(address, timeout=10))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(first)
                slow.append(sock)
                if n == THREADS - 1:
                    eighth_sent = time.monotonic()
            # The first wave: every thread held by a slow client inside the layer; they
            # sent bytes, so none waits in the poller (the other 8 wait for a thread).
            assert wait_until(lambda: len(server.in_flight) == THREADS and server.waiting == 0,
                              timeout=LAYER_TIMEOUT), (len(server.in_flight), server.waiting)
            helper = threading.Thread(target=early_client, args=(address,))
            helper.start()
            assert wait_until(lambda: server.requests_denied[reason] >= THREADS,
                              timeout=LAYER_TIMEOUT + 2), server.requests_denied
            # Not cut early: of any 8 slow clients one sent no sooner than the 8th did.
            assert time.monotonic() - eighth_sent >= LAYER_TIMEOUT - 0.05
            times = [timed(layer, address, b"late%d\n" % i) for i in range(10)]
            assert max(times) < LAYER_TIMEOUT + 1.0, times
            helper.join(2 * LAYER_TIMEOUT + 3)
            assert not helper.is_alive()
            assert len(early) == 1
            if isinstance(early[0], BaseException):
                raise early[0]
            assert early[0] < 2 * LAYER_TIMEOUT + 1.0, early
            assert wait_until(lambda: server.requests_denied[reason] == SLOW, timeout=5), \
                server.requests_denied
            assert all(closed_by_server(s, 2.0) for s in slow)
            assert dict(server.requests_denied) == {reason: SLOW}
            assert threading.active_count() == threads_before  # the pool grew no thread
            stack.close()
