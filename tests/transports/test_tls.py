"""The ``tls`` layer (issue 9 item 1): real TLS clients (Python's ssl, openssl s_client,
curl) against servers on loopback, under several strategies; the handshake's deadline and
failure reasons; client certificates, ALPN, SNI, reload; bad files at construction.

Certificates are made with openssl once per run (tls_support.certs()).
"""

from __future__ import annotations

import functools
import http.server
import logging
import os
import shutil
import signal
import socket
import sys
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import sockserve
from sockserve.core._options import parse_command_line_options
from sockserve.testing import LayerTests
from sockserve.transports._tls import (
    CLOSE_NOTIFY_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    TLSLayer,
    TLSSocket,
    tls_options_from_flags,
)
from support import (HAS_IPV6, child_pids, missing, no_leaks, read_line, requires_af_unix, requires_fork, serving,
                     wait_until)
sys.path.insert(0, str(Path(__file__).parent))  # tls_support, beside this file
from tls_support import (  # noqa: E402
    CURL,
    OPENSSL,
    TIMEOUT,
    certs,
    client_context,
    client_hello,
    der,
    handshake_over,
    presented,
    read_all,
    requires_curl,
    server_options,
    tls_connect,
)



@pytest.fixture(autouse=True)
def _needs_openssl() -> None:
    """Every test here uses certificates that openssl makes."""
    if OPENSSL is None:
        missing("requires_openssl: the openssl program")

LOOPBACK = ("127.0.0.1", 0)
BODY = b"hello over tls\n"


# --------------------------------------------------------------------------- helpers


class Report(sockserve.BaseRequestHandler):
    """Reads one line; replies with what the handler sees of the TLS connection, then the
    line upper-cased. ``wait`` holds the connection open (echoing lines) until EOF."""

    def handle(self) -> None:
        request = self.request
        request.settimeout(TIMEOUT)
        line = read_line(request)
        if not line.endswith(b"\n"):
            return  # EOF before a whole line
        cert = request.getpeercert()
        subject = dict(x[0] for x in cert["subject"])["commonName"] if cert else "-"
        info = (f"{type(request).__name__} {request.version()} sni={request.sni} "
                f"alpn={request.selected_alpn_protocol()} peer={subject}\n")
        request.sendall(info.encode() + line.upper())
        if line.strip() == b"wait":
            while chunk := request.recv(1024):
                request.sendall(chunk.upper())


def compose(strategy: str = "threading", transport: str = "tcp", **options: Any) -> type:
    return sockserve.compose(transport, strategy, layers=[TLSLayer],
                             options=server_options(**options))


def talk(tls: ssl.SSLSocket, line: bytes = b"hi\n") -> list[str]:
    """Send *line*; return the handler's two reply lines (what it saw, the echo)."""
    tls.sendall(line)
    got = b""
    while got.count(b"\n") < 2:
        chunk = tls.recv(4096)
        if not chunk:
            break
        got += chunk
    return got.decode().splitlines()


def ask(server: Any, context: ssl.SSLContext | None = None, hostname: str = "localhost") -> list[str]:
    with tls_connect(server.server_address, context, hostname, server.address_family) as tls:
        return talk(tls)


def run_peer(args: list[str], stdin: bytes = b"", timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    """Run a client program in its own session; killed by pid if it outlives *timeout*."""
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def s_client(
    server: Any, *extra: str, stdin: bytes = b"", servername: str = "localhost"
) -> subprocess.CompletedProcess[bytes]:
    host, port = server.server_address[:2]
    return run_peer([str(OPENSSL), "s_client", "-connect", f"{host}:{port}", "-servername", servername,
                     "-CAfile", str(certs().ca), "-verify_return_error", *extra], stdin)


def curl(url: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return run_peer([str(CURL), "-sS", "--max-time", "10", *extra, url])


@pytest.fixture
def http_root(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    (root / "hello.txt").write_bytes(BODY)
    return root


class QuietHTTP(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


# --------------------------------------------------------------------------- the kit


def _drained(act: Callable[[socket.socket], object]) -> Callable[[socket.socket], None]:
    """A failing client: *act*, errors of the TLS client ignored, then read to EOF (the
    server's alert is read here, so that the kit then sees the connection end)."""

    def run(sock: socket.socket) -> None:
        try:
            act(sock)
        except (ssl.SSLError, ConnectionError):
            pass
        read_all(sock)

    return run


class TestTLSLayerKit(LayerTests):
    """The kit's layer scenarios with a TLS 1.3 client presenting a client certificate and
    offering ALPN; every reason the layer refuses for has a failing client."""

    layer = TLSLayer
    strategies = ("sync", "threading", "forking")
    expected_request = "TLSSocket"

    @property
    def options(self) -> dict[str, Any]:  # type: ignore[override]
        return server_options(handshake_timeout=0.5, min_version="1.3", verify_client="required",
                              cafile=str(certs().ca), alpn_protocols="kit", alpn_required=True)

    def client_session(self, sock: socket.socket) -> socket.socket:
        context = client_context(cert=certs().client, key=certs().client_key, alpn=["kit"])
        return context.wrap_socket(sock, server_hostname="localhost")

    def failing_clients(self) -> dict[str, Callable[[socket.socket], object]]:
        c = certs()
        trusted = {"cert": c.client, "key": c.client_key}
        return {
            "tls-timeout": lambda sock: None,  # sends nothing
            "tls-http": lambda sock: sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"),
            "tls-eof": _drained(lambda sock: (sock.sendall(client_hello()[:20]), sock.shutdown(socket.SHUT_WR))),
            "tls-handshake": lambda sock: sock.sendall(b"\x00\x01 not tls at all\n"),
            "tls-version": _drained(lambda sock: handshake_over(
                sock, client_context(max_version="1.2", alpn=["kit"], **trusted))),
            "tls-certificate": _drained(lambda sock: (
                handshake_over(sock, client_context(alpn=["kit"])), sock.recv(1))),
            "tls-alpn": _drained(lambda sock: (
                handshake_over(sock, client_context(alpn=["other"], **trusted)), sock.recv(1))),
        }


class TestTLSLayerKitUnix(TestTLSLayerKit):
    transport = "unix"
    strategies = ("threading",)


class TestTLSLayerKitPools(TestTLSLayerKit):
    """threadpool and prefork hand a connection to a worker only once it is readable, so a
    silent client never reaches the layer (the strategy closes it at first_byte_timeout);
    the layer's timeout is met by a client that starts its ClientHello and stalls."""

    strategies = ("threadpool", "prefork")  # the kit skips prefork without fork

    def failing_clients(self) -> dict[str, Callable[[socket.socket], object]]:
        return {**super().failing_clients(), "tls-timeout": lambda sock: sock.sendall(client_hello()[:10])}


# --------------------------------------------------------------------------- real peers


@requires_curl
@pytest.mark.parametrize("strategy", ["threading", "threadpool", pytest.param("prefork", marks=requires_fork)])
def test_curl_and_openssl_get_a_file_from_simple_http_request_handler(strategy, http_root):
    options = {"workers": 2} if strategy == "prefork" else {}
    cls = compose(strategy, **options)
    handler = functools.partial(QuietHTTP, directory=str(http_root))
    with no_leaks():
        with serving(cls(LOOPBACK, handler)) as server:
            port = server.server_address[1]
            got = curl(f"https://localhost:{port}/hello.txt", "--cacert", str(certs().ca),
                       "--resolve", f"localhost:{port}:127.0.0.1")
            assert (got.returncode, got.stdout) == (0, BODY), got.stderr
            for version in ("-tls1_2", "-tls1_3"):
                got = s_client(server, version, "-quiet",
                               stdin=b"GET /hello.txt HTTP/1.0\r\nHost: localhost\r\n\r\n")
                assert got.stdout.startswith(b"HTTP/1.0 200 "), (got.stdout, got.stderr)
                assert got.stdout.endswith(b"\r\n\r\n" + BODY), got.stdout
            # A client that does not trust the server's CA refuses it, and that is counted.
            got = curl(f"https://localhost:{port}/hello.txt", "--resolve", f"localhost:{port}:127.0.0.1")
            assert got.returncode != 0 and got.stdout == b""
            if strategy != "prefork":  # prefork counts in its workers
                assert wait_until(lambda: server.requests_denied["tls-certificate"] == 1), server.requests_denied


@requires_curl
def test_plain_http_on_the_tls_port_is_refused_as_tls_http_in_one_line(caplog):
    cls = compose("threading")
    with caplog.at_level(logging.INFO, logger="sockserve"):
        with serving(cls(LOOPBACK, Report)) as server:
            got = curl(f"http://127.0.0.1:{server.server_address[1]}/")
            assert got.returncode != 0 and got.stdout == b""
            assert wait_until(lambda: server.requests_denied["tls-http"] == 1), server.requests_denied
            assert ask(server)[1] == "HI"  # and serving goes on
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1 and ": tls-http: plain HTTP on the TLS port (b'GET / HT')" in lines[0], lines
    assert not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("verify", ["none", "optional", "required"])
@pytest.mark.parametrize("client", ["trusted", "untrusted", "no-cert"])
def test_client_certificate_matrix(client, verify, version):
    c = certs()
    files = {"trusted": (c.client, c.client_key), "untrusted": (c.untrusted_client, c.untrusted_client_key),
             "no-cert": (None, None)}[client]
    accepted = verify == "none" or client == "trusted" or (verify == "optional" and client == "no-cert")
    cls = compose("threading", verify_client=verify, cafile=str(c.ca))
    context = client_context(cert=files[0], key=files[1], version=version)
    with serving(cls(LOOPBACK, Report)) as server:
        sock = socket.create_connection(server.server_address, timeout=TIMEOUT)
        try:
            if accepted:
                with context.wrap_socket(sock, server_hostname="localhost") as tls:
                    seen = talk(tls)
                peer = "client" if client == "trusted" and verify != "none" else "-"
                assert seen == [f"TLSSocket TLSv{version} sni=localhost alpn=None peer={peer}", "HI"]
                assert server.requests_denied == {}
            elif version == "1.2":  # refused within the handshake: at connect
                with pytest.raises(ssl.SSLError):
                    context.wrap_socket(sock, server_hostname="localhost")
            else:  # TLS 1.3: the client's handshake is done first; the refusal is its first read
                with context.wrap_socket(sock, server_hostname="localhost") as tls:
                    with pytest.raises(ssl.SSLError) as refused:
                        tls.recv(1)
                assert "ALERT" in str(refused.value.reason), refused.value
        finally:
            sock.close()
        if not accepted:
            assert wait_until(lambda: server.requests_denied["tls-certificate"] == 1), server.requests_denied
            assert sum(server.requests_denied.values()) == 1


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_openssl_s_client_with_and_without_a_client_certificate(version):
    c = certs()
    cls = compose("threading", verify_client="required", cafile=str(c.ca))
    with serving(cls(LOOPBACK, Report)) as server:
        got = s_client(server, version, "-quiet", "-cert", str(c.client), "-key", str(c.client_key),
                       stdin=b"hi\n")
        assert got.stdout.decode().splitlines()[1:] == ["HI"], (got.stdout, got.stderr)
        assert "peer=client" in got.stdout.decode()
        got = s_client(server, version, "-quiet", stdin=b"hi\n")
        assert got.stdout == b"" and got.returncode != 0, got
        assert b"alert" in got.stderr, got.stderr
        assert wait_until(lambda: server.requests_denied["tls-certificate"] == 1), server.requests_denied


def test_alpn_negotiated_and_alpn_required_closes_without_overlap():
    cls = compose("threading", alpn_protocols=["h2", "http/1.1"])
    with serving(cls(LOOPBACK, Report)) as server:
        assert ask(server, client_context(alpn=["http/1.1", "h2"]))[0].endswith("alpn=h2 peer=-")
        assert ask(server, client_context(alpn=["spdy/1", "http/1.1"]))[0].endswith("alpn=http/1.1 peer=-")
        assert ask(server, client_context(alpn=["spdy/1"]))[0].endswith("alpn=None peer=-")
    cls = compose("threading", alpn_protocols="h2,http/1.1", alpn_required=True)
    with serving(cls(LOOPBACK, Report)) as server:
        assert ask(server, client_context(alpn=["http/1.1"]))[1] == "HI"
        for offer in (["spdy/1"], None):
            with tls_connect(server.server_address, client_context(alpn=offer)) as tls:
                assert tls.recv(1) == b""  # close_notify, no reply
        assert wait_until(lambda: server.requests_denied["tls-alpn"] == 2), server.requests_denied


@requires_curl
def test_curl_sees_the_alpn_protocol_chosen():
    cls = compose("threading", alpn_protocols="http/1.1")
    with serving(cls(LOOPBACK, functools.partial(QuietHTTP, directory=str(certs().directory)))) as server:
        port = server.server_address[1]
        got = curl(f"https://localhost:{port}/password", "-v", "--cacert", str(certs().ca),
                   "--resolve", f"localhost:{port}:127.0.0.1")
        assert got.returncode == 0, got.stderr
        assert b"ALPN: server accepted http/1.1" in got.stderr, got.stderr


def test_sni_chooses_the_certificate_by_name_and_the_handler_sees_the_name():
    c = certs()
    cls = compose("threading", sni={"other.test": f"{c.other}:{c.other_key}",
                                    "*.wild.test": (str(c.wild), str(c.wild_key))})
    with serving(cls(LOOPBACK, Report)) as server:
        for name, cert in (("localhost", c.server), ("other.test", c.other), ("OTHER.test", c.other),
                           ("a.wild.test", c.wild)):
            with tls_connect(server.server_address, hostname=name) as tls:
                assert presented(tls) == der(cert), name
                assert talk(tls)[0].startswith(f"TLSSocket TLSv1.3 sni={name.lower()} ")
        # No SNI (an IP address as the host): the default certificate, sni None.
        context = client_context()
        with tls_connect(server.server_address, context, hostname="127.0.0.1") as tls:
            assert presented(tls) == der(c.server)
            assert " sni=None " in talk(tls)[0]
        got = s_client(server, stdin=b"", servername="other.test")
        assert b"subject=CN = other.test" in got.stdout, got.stdout
        assert b"Verify return code: 0 (ok)" in got.stdout


def test_reload_swaps_the_certificate_for_new_connections_and_keeps_it_on_bad_files(tmp_path, caplog):
    c = certs()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(c.server, cert)
    shutil.copy(c.server_key, key)
    cls = sockserve.compose("tcp", "threading", layers=[TLSLayer],
                            options={"certfile": str(cert), "keyfile": str(key)})
    with serving(cls(LOOPBACK, Report)) as server:
        with tls_connect(server.server_address) as before:
            assert presented(before) == der(c.server)
            assert talk(before, b"wait\n")[1] == "WAIT"
            shutil.copy(c.server_new, cert)
            shutil.copy(c.server_new_key, key)
            server.reload()
            with tls_connect(server.server_address) as after:
                assert presented(after) == der(c.server_new)
                assert talk(after)[1] == "HI"
            before.sendall(b"still here\n")  # the connection in flight keeps its context
            assert before.recv(100) == b"STILL HERE\n"
        cert.write_text("not a certificate\n")
        with caplog.at_level(logging.INFO, logger="sockserve"):
            server.reload()
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and str(cert) in errors[0].getMessage(), [r.getMessage() for r in errors]
        assert "keeping the certificates loaded before" in errors[0].getMessage()
        assert errors[0].exc_info is None
        with tls_connect(server.server_address) as later:
            assert presented(later) == der(c.server_new)
        # A key that no longer matches: kept as well.
        shutil.copy(c.server, cert)
        server.reload()
        with tls_connect(server.server_address) as later:
            assert presented(later) == der(c.server_new)


@requires_fork
def test_reload_reaches_the_workers_of_prefork(tmp_path):
    c = certs()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(c.server, cert)
    shutil.copy(c.server_key, key)
    cls = sockserve.compose("tcp", "prefork", layers=[TLSLayer],
                            options={"certfile": str(cert), "keyfile": str(key), "workers": 2})
    with serving(cls(LOOPBACK, Report)) as server:
        with tls_connect(server.server_address) as tls:
            assert presented(tls) == der(c.server)
        shutil.copy(c.server_new, cert)
        shutil.copy(c.server_new_key, key)
        old = child_pids()
        assert len(old) == 2
        assert server.reload() is True
        # Both workers are replaced. Waiting for that before connecting also keeps a
        # worker forked meanwhile (in this test process) from inheriting a client socket.
        assert wait_until(lambda: len(child_pids()) == 2 and not child_pids() & old, timeout=10)

        def swapped() -> bool:
            with tls_connect(server.server_address) as tls:
                return presented(tls) == der(c.server_new)

        # Every worker was replaced: no connection meets the old certificate any more.
        assert all(swapped() for _ in range(20))


def test_twenty_silent_clients_do_not_delay_a_real_client_under_threading():
    # A listen backlog larger than the documented 5: a dropped SYN would cost the real
    # client a second for reasons that have nothing to do with TLS.
    cls = compose("threading", handshake_timeout=1, request_queue_size=64)
    with serving(cls(LOOPBACK, Report)) as server:
        silent = [socket.create_connection(server.server_address, timeout=TIMEOUT) for _ in range(20)]
        try:
            started = time.monotonic()
            assert ask(server)[1] == "HI"
            assert time.monotonic() - started < 0.5
            for sock in silent:
                assert read_all(sock) == b""
            took = time.monotonic() - started
            assert 0.8 < took < 3, took
        finally:
            for sock in silent:
                sock.close()
        assert wait_until(lambda: server.requests_denied["tls-timeout"] == 20), server.requests_denied


def test_silent_and_stalled_clients_under_threadpool():
    """threads=4: 20 silent clients wait in the strategy's poller (no thread), so a real
    client is served at once and they are closed at first_byte_timeout; clients that send
    the first bytes of a ClientHello and stall reach the layer and are cut at
    handshake_timeout (tls-timeout)."""
    cls = compose("threadpool", threads=4, handshake_timeout=1, first_byte_timeout=1)
    with serving(cls(LOOPBACK, Report)) as server:
        silent = [socket.create_connection(server.server_address, timeout=TIMEOUT) for _ in range(20)]
        try:
            started = time.monotonic()
            assert ask(server)[1] == "HI"
            assert time.monotonic() - started < 0.5
            for sock in silent:
                assert read_all(sock) == b""
            assert time.monotonic() - started < 3
        finally:
            for sock in silent:
                sock.close()
        assert wait_until(lambda: server.requests_denied["first-byte"] == 20), server.requests_denied
        stalled = [socket.create_connection(server.server_address, timeout=TIMEOUT) for _ in range(8)]
        try:
            started = time.monotonic()
            for sock in stalled:
                sock.sendall(client_hello()[:10])
            for sock in stalled:
                assert read_all(sock) == b""
            took = time.monotonic() - started
            assert 1.8 < took < 4.5, took  # two rounds of four threads, a second each
        finally:
            for sock in stalled:
                sock.close()
        assert wait_until(lambda: server.requests_denied["tls-timeout"] == 8), server.requests_denied


def test_a_dripping_client_cannot_extend_the_handshake_deadline():
    cls = compose("threading", handshake_timeout=1)
    hello = client_hello()
    with serving(cls(LOOPBACK, Report)) as server:
        with socket.create_connection(server.server_address, timeout=TIMEOUT) as sock:
            started = time.monotonic()
            try:
                for byte in hello:  # one byte every 50 ms: 25 s for the whole ClientHello
                    sock.sendall(bytes([byte]))
                    time.sleep(0.05)
                    if time.monotonic() - started > 5:
                        break
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert read_all(sock) == b""
            took = time.monotonic() - started
        assert 0.9 < took < 2, took
        assert wait_until(lambda: server.requests_denied["tls-timeout"] == 1), server.requests_denied


def test_a_client_below_min_version_is_refused_as_tls_version(caplog):
    cls = compose("threading", min_version="1.3")
    with caplog.at_level(logging.WARNING, logger="sockserve"):
        with serving(cls(LOOPBACK, Report)) as server:
            with pytest.raises(ssl.SSLError):
                tls_connect(server.server_address, client_context(version="1.2"))
            got = s_client(server, "-tls1_2", "-quiet")
            assert got.returncode != 0
            assert ask(server, client_context(version="1.3"))[1] == "HI"
            assert wait_until(lambda: server.requests_denied["tls-version"] == 2), server.requests_denied
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2 and all(": tls-version: " in line for line in lines), lines


def test_closing_sends_close_notify_and_does_not_wait_for_the_peers():
    cls = compose("sync")  # one at a time: closing the first holds up the second
    with serving(cls(LOOPBACK, Report)) as server:
        sock = socket.create_connection(server.server_address, timeout=TIMEOUT)
        with client_context().wrap_socket(sock, server_hostname="localhost",
                                          suppress_ragged_eofs=False) as first:
            assert talk(first)[1] == "HI"
            assert first.recv(1) == b""  # close_notify: a ragged EOF would raise SSLEOFError
            # The first client stays connected and never answers the close_notify.
            started = time.monotonic()
            assert ask(server)[1] == "HI"
            assert time.monotonic() - started < CLOSE_NOTIFY_TIMEOUT


@pytest.mark.parametrize("strategy", ["threading", "threadpool"])
def test_drain_cut_off_ends_a_handler_blocked_in_recv_on_tls(strategy):
    ended: list[Any] = []

    class Blocked(sockserve.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(1)  # the byte the client sent first
            self.request.sendall(b"started\n")
            try:
                ended.append(self.request.recv(1))  # blocks: the client sends nothing
            except OSError as exc:
                ended.append(type(exc).__name__)

    cls = compose(strategy, drain_timeout=0.5)
    server = cls(LOOPBACK, Blocked)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        with tls_connect(server.server_address) as tls:
            tls.sendall(b"x")  # readable, for the strategies that wait for a first byte
            assert tls.recv(100) == b"started\n"
            started = time.monotonic()
            server.shutdown()
            server.server_close()
            took = time.monotonic() - started
            assert read_all(tls) == b""
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        server.server_close()
    assert 0.4 < took < 2, took
    assert server.requests_cut_off == 1
    assert len(ended) == 1 and ended[0] in (b"", "SSLEOFError", "SSLZeroReturnError"), ended


@requires_fork
def test_prefork_serves_tls_from_its_workers():
    cls = compose("prefork", workers=2)
    with no_leaks():
        with serving(cls(LOOPBACK, Report)) as server:
            for _ in range(4):
                assert ask(server)[0] == "TLSSocket TLSv1.3 sni=localhost alpn=None peer=-"


@pytest.mark.parametrize("transport", [pytest.param("unix", marks=requires_af_unix), "tcp6"])
def test_other_stream_transports(transport, tmp_path):
    if transport == "tcp6" and not HAS_IPV6:
        missing("requires_ipv6: no IPv6 loopback")
    address = str(tmp_path / "tls.sock") if transport == "unix" else ("::1", 0)
    cls = compose("threading", transport=transport)
    with serving(cls(address, Report)) as server:
        assert ask(server)[1] == "HI"


@pytest.mark.parametrize("transport", ["udp", "unix-dgram", "udp6"])
def test_tls_over_a_datagram_transport_is_refused_when_composed(transport):
    with pytest.raises(TypeError, match="the tls layer needs a stream transport"):
        sockserve.compose(transport, "threading", layers=[TLSLayer])


# --------------------------------------------------------------------------- construction


def _bad_cases() -> dict[str, tuple[Callable[[Any, Path], dict[str, Any]], str, Callable[[Any, Path], str]]]:
    return {
        "missing certificate": (lambda c, t: {"certfile": str(t / "nope.pem")}, "certfile",
                                lambda c, t: str(t / "nope.pem")),
        "missing key": (lambda c, t: {"certfile": str(c.server), "keyfile": str(t / "nope.key")}, "keyfile",
                        lambda c, t: str(t / "nope.key")),
        "a key as the certificate": (lambda c, t: {"certfile": str(c.server_key), "keyfile": str(c.server_key)},
                                     "certfile", lambda c, t: str(c.server_key)),
        "garbage certificate": (lambda c, t: {"certfile": str(t / "garbage.pem"), "keyfile": str(c.server_key)},
                                "certfile", lambda c, t: str(t / "garbage.pem")),
        "key that does not match": (lambda c, t: {"certfile": str(c.server), "keyfile": str(c.other_key)},
                                    "keyfile", lambda c, t: str(c.other_key)),
        "no key in the certificate file": (lambda c, t: {"certfile": str(c.server)}, "certfile",
                                           lambda c, t: str(c.server)),
        "wrong password": (lambda c, t: {"certfile": str(c.server), "keyfile": str(c.encrypted_key),
                                         "password_file": str(c.wrong_password_file)},
                           "keyfile", lambda c, t: str(c.encrypted_key)),
        "encrypted key, no password": (lambda c, t: {"certfile": str(c.server), "keyfile": str(c.encrypted_key)},
                                       "keyfile", lambda c, t: str(c.encrypted_key)),
        "missing password file": (lambda c, t: {"certfile": str(c.server), "keyfile": str(c.encrypted_key),
                                                "password_file": str(t / "nope")},
                                  "password_file", lambda c, t: str(t / "nope")),
        "bad CA file": (lambda c, t: {"certfile": str(c.server), "keyfile": str(c.server_key),
                                      "cafile": str(c.server_key), "verify_client": "required"},
                        "cafile", lambda c, t: str(c.server_key)),
        "bad SNI certificate": (lambda c, t: {"certfile": str(c.server), "keyfile": str(c.server_key),
                                              "sni": f"other.test={t / 'nope.pem'}"},
                                "sni", lambda c, t: str(t / "nope.pem")),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_bad_files_fail_at_construction_naming_the_file_with_nothing_leaked(case, tmp_path):
    make, option, path = _bad_cases()[case]
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n")
    c = certs()
    cls = sockserve.compose("tcp", "threading", layers=[TLSLayer], options=make(c, tmp_path))
    with no_leaks(settle=0.5):
        with pytest.raises(sockserve.OptionError) as failed:
            cls(LOOPBACK, Report)
    assert failed.value.key == option
    assert path(c, tmp_path) in str(failed.value), str(failed.value)
    assert "Enter PEM pass phrase" not in str(failed.value)


def test_files_that_work_key_in_the_certificate_file_and_an_encrypted_key():
    c = certs()
    for options in ({"certfile": str(c.combined)},
                    {"certfile": str(c.server), "keyfile": str(c.encrypted_key),
                     "password_file": str(c.password_file)}):
        cls = sockserve.compose("tcp", "threading", layers=[TLSLayer], options=options)
        with serving(cls(LOOPBACK, Report)) as server:
            assert ask(server)[1] == "HI"


def test_option_checks_across_fields():
    c = certs()
    base = sockserve.compose("tcp", "threading", layers=[TLSLayer])
    with pytest.raises(sockserve.OptionError, match="one of options certfile or ssl_context is required"):
        base(LOOPBACK, Report)
    with pytest.raises(sockserve.OptionError, match="needs option cafile"):
        sockserve.with_options(base, {"certfile": str(c.server), "verify_client": "optional"})
    with pytest.raises(sockserve.OptionError, match="exclude each other"):
        sockserve.with_options(base, {"certfile": str(c.server),
                                      "ssl_context": ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)})
    with pytest.raises(sockserve.OptionError, match="alpn_required needs option alpn_protocols"):
        sockserve.with_options(base, {"certfile": str(c.server), "alpn_required": True})
    with pytest.raises(sockserve.OptionError, match="min_version"):
        sockserve.with_options(base, {"min_version": "1.1"})
    with pytest.raises(sockserve.OptionError, match="sni"):
        sockserve.with_options(base, {"certfile": str(c.server), "sni": "no-equals-sign"})
    for bad in (0, -1, "1"):
        with pytest.raises(sockserve.OptionError, match="handshake_timeout"):
            sockserve.with_options(base, {"handshake_timeout": bad})
    client_side = sockserve.with_options(base, {"ssl_context": ssl.create_default_context()})
    with pytest.raises(sockserve.OptionError, match="client-side context"):
        client_side(LOOPBACK, Report)
    assert TLSLayer.handshake_timeout == HANDSHAKE_TIMEOUT == 10.0
    assert TLSLayer.min_version == "1.2" and TLSLayer.verify_client == "none"


def test_options_from_text_as_the_command_line_gives_them():
    c = certs()
    base = sockserve.compose("tcp", "threading", layers=[TLSLayer])
    options = parse_command_line_options(base, [
        f"certfile={c.server}", f"keyfile={c.server_key}", "alpn_protocols=h2, http/1.1",
        f"sni=other.test={c.other}:{c.other_key}", "min_version=1.3", "handshake_timeout=2.5",
        "verify_client=none", "alpn_required=yes",
    ])
    cls = sockserve.with_options(base, options)
    assert (cls.alpn_protocols, cls.min_version, cls.handshake_timeout) == ("h2, http/1.1", "1.3", 2.5)
    with serving(cls(LOOPBACK, Report)) as server:
        assert ask(server, client_context(alpn=["http/1.1"]), "other.test")[0] == (
            "TLSSocket TLSv1.3 sni=other.test alpn=http/1.1 peer=-")
    with pytest.raises(sockserve.OptionError, match="Python object"):
        parse_command_line_options(base, ["ssl_context=x"])


def test_a_ready_ssl_context_from_python():
    c = certs()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(c.other), str(c.other_key))
    seen: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: seen.append(name)
    cls = sockserve.compose("tcp", "threading", layers=[TLSLayer], options={"ssl_context": context})
    with serving(cls(LOOPBACK, Report)) as server:
        assert ask(server, hostname="other.test")[0].startswith("TLSSocket TLSv1.3 sni=other.test ")
        server.reload()  # nothing to re-read: the context is kept
        assert ask(server, hostname="other.test")[1] == "HI"
    assert seen == ["other.test", "other.test"]  # the context's own callback still runs


def test_tls_options_from_flags():
    assert tls_options_from_flags(None, None, None) == {}
    assert tls_options_from_flags("c.pem") == {"certfile": "c.pem"}
    assert tls_options_from_flags("c.pem", "k.pem", "pw") == {
        "certfile": "c.pem", "keyfile": "k.pem", "password_file": "pw"}
    with pytest.raises(sockserve.OptionError, match="--tls-key needs --tls-cert"):
        tls_options_from_flags(None, "k.pem")
    with pytest.raises(sockserve.OptionError, match="--tls-password-file needs --tls-cert"):
        tls_options_from_flags(None, None, "pw")


def test_the_handlers_request_is_a_tls_socket():
    assert issubclass(TLSSocket, ssl.SSLSocket)


# --------------------------------------------------------------------------- the command line


@pytest.fixture
def cli_tls_server(tmp_path: Path) -> Iterator[Any]:
    from support import clean_env, read_banner, sockserve_process

    c = certs()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(c.server, cert)
    shutil.copy(c.server_key, key)
    with sockserve_process("serve", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key),
                           cwd=tmp_path, env=clean_env(), timeout=30) as proc:
        banner = read_banner(proc, 30).decode()
        port = int(banner.split("serving on 127.0.0.1:")[1].split()[0])
        yield proc, ("127.0.0.1", port), cert, key


def test_sockserve_serve_tls_cert_flags_and_sighup_reload(cli_tls_server):
    proc, address, cert, key = cli_tls_server
    c = certs()
    with tls_connect(address) as tls:
        assert presented(tls) == der(c.server)
        tls.sendall(b"hello\n")
        assert tls.recv(100) == b"HELLO\n"
    shutil.copy(c.server_new, cert)
    shutil.copy(c.server_new_key, key)
    os.kill(proc.pid, signal.SIGHUP)

    def swapped() -> bool:
        with tls_connect(address) as tls:
            return presented(tls) == der(c.server_new)

    assert wait_until(swapped, timeout=10, interval=0.1)


def test_sockserve_serve_tls_key_without_tls_cert_exits_2(tmp_path):
    from support import clean_env

    got = subprocess.run([sys.executable, "-m", "sockserve", "serve", "127.0.0.1:0", "--tls-key", "k.pem"],
                         cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=30)
    assert got.returncode == 2
    assert "sockserve: error: bad value 'k.pem' for option 'keyfile': --tls-key needs --tls-cert" in got.stderr


class NoDelay(sockserve.BaseRequestHandler):
    """Answers each line with the connection's TCP_NODELAY setting, until EOF."""

    def handle(self) -> None:
        raw = socket.socket(fileno=os.dup(self.request.fileno()))  # the option is the fd's
        try:
            nodelay = raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            raw.close()
        while self.request.recv(1024):
            self.request.sendall(b"%d\n" % nodelay)


def test_tls_connections_answer_the_first_small_write_without_a_nagle_delay():
    """TLS 1.3 sends session tickets after the handshake; with Nagle on, the handler's
    first small reply waited for their (delayed) ACK, about 40 ms. The layer turns
    TCP_NODELAY on for TCP connections."""
    cls = compose("threading", min_version="1.3")
    with serving(cls(LOOPBACK, NoDelay)) as server:
        firsts = []
        for _ in range(5):
            with tls_connect(server.server_address) as tls:
                start = time.monotonic()
                tls.sendall(b"x")
                assert tls.recv(10) == b"1\n"
                firsts.append(time.monotonic() - start)
    assert sorted(firsts)[2] < 0.02, firsts  # median well under a delayed ACK
