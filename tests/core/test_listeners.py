"""One server, several listening sockets: ``BaseServer.add_listener``, ``listeners``,
``close_listeners`` (core/_server.py) and ``TCPServer.add_address`` (transports/_stream.py).

Every scenario binds real sockets on loopback or in a temporary directory, answers a
client on each address, closes, and checks that the addresses can be bound again.
"""

from __future__ import annotations

import errno
import http.client
import http.server
import os
import socket

import pytest

import sockserve
from support import (
    EchoUpper,
    child_pids,
    no_leaks,
    read_to_eof,
    requires_af_unix,
    requires_fork,
    requires_ipv6,
    serving,
)

#: Timeout of every blocking client call, so that no test can hang.
CLIENT_TIMEOUT = 5.0


def ask(address, payload: bytes, family: int = socket.AF_INET) -> bytes:
    """Send *payload* to a stream server at *address*, end our side, read the reply."""
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(CLIENT_TIMEOUT)
        client.connect(address)
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        return read_to_eof(client)


def assert_bindable(address, family: int = socket.AF_INET) -> None:
    """Nothing listens on *address* any more: it can be bound again (SO_REUSEADDR:
    closed connections may linger in TIME_WAIT; a listening socket still fails the bind)."""
    with socket.socket(family, socket.SOCK_STREAM) as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(address)


class Where(sockserve.BaseRequestHandler):
    """Replies with the client address's shape and the local address of the connection."""

    def handle(self):
        read_to_eof(self.request)
        shape = type(self.client_address).__name__
        self.request.sendall(f"{shape} {self.request.getsockname()!r}".encode())


@pytest.mark.parametrize("concurrency", ["sync", "threading", "threadpool",
                                         pytest.param("prefork", marks=requires_fork)])
def test_two_tcp_addresses_one_server_both_answer(concurrency):
    options = {"workers": 2} if concurrency == "prefork" else None
    cls = sockserve.compose("tcp", concurrency, options=options)
    with no_leaks():
        server = cls(("127.0.0.1", 0), EchoUpper)
        second = server.add_address(("127.0.0.1", 0))
        first = server.server_address
        assert second != first and second[1] != 0  # the real port of port 0
        assert [s.getsockname() for s in server.listeners] == [first, second]
        with serving(server):
            for _ in range(5):  # prefork: both workers race for each address
                assert ask(first, b"one") == b"ONE"
                assert ask(second, b"two") == b"TWO"
        for sock in server.listeners:
            assert sock.fileno() == -1  # server_close closed both
        assert_bindable(first)
        assert_bindable(second)


@requires_af_unix
@pytest.mark.parametrize("concurrency", ["threading", pytest.param("prefork", marks=requires_fork)])
def test_tcp_and_unix_in_one_server_each_with_its_own_client_address(concurrency, tmp_path):
    options = {"workers": 1} if concurrency == "prefork" else None
    server = sockserve.compose("tcp", concurrency, options=options)(("127.0.0.1", 0), Where)
    path = str(tmp_path / "extra.sock")
    assert server.add_address(path, family="unix") == path
    with serving(server):
        over_tcp = ask(server.server_address, b"?").decode()
        over_unix = ask(path, b"?", socket.AF_UNIX).decode()
    assert over_tcp == f"tuple {server.server_address!r}"
    assert over_unix == f"str {path!r}"  # the Unix peer's address, the Unix socket's name
    assert not os.path.exists(path)  # removed at close, as the server's own socket file is
    assert_bindable(server.server_address)


@requires_ipv6
def test_ipv4_and_ipv6_on_the_same_port_with_ipv6_only():
    cls = sockserve.compose("tcp", "threading", options={"ipv6_only": True})
    server = cls(("127.0.0.1", 0), Where)
    port = server.server_address[1]
    bound = server.add_address(("::1", port))  # IPV6_V6ONLY: the IPv4 port does not clash
    assert bound[:2] == ("::1", port)
    with serving(server):
        assert ask(("127.0.0.1", port), b"?").decode().startswith("tuple ('127.0.0.1'")
        assert ask(("::1", port), b"?", socket.AF_INET6).decode().startswith("tuple ('::1'")
    assert_bindable(("127.0.0.1", port))
    assert_bindable(("::1", port), socket.AF_INET6)


@requires_ipv6
def test_http_server_handler_answers_on_ipv4_and_ipv6_listeners():
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = repr(self.client_address[0]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = sockserve.ThreadingTCPServer(("127.0.0.1", 0), Hello)
    six = server.add_address(("::1", 0))
    with serving(server):
        for host, port in (server.server_address, six[:2]):
            conn = http.client.HTTPConnection(host, port, timeout=CLIENT_TIMEOUT)
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                assert response.status == 200
                assert response.read() == repr(host).encode()
            finally:
                conn.close()


def test_udp_server_with_two_sockets_replies_from_the_one_asked():
    server = sockserve.ThreadingUDPServer(("127.0.0.1", 0), EchoUpper)
    second = server.add_address(("127.0.0.1", 0))
    with serving(server):
        for address in (server.server_address, second):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(CLIENT_TIMEOUT)
                client.sendto(b"datagram", address)
                reply, sender = client.recvfrom(100)
            assert (reply, sender) == (b"DATAGRAM", address)


def test_an_added_listener_is_non_blocking_so_a_lost_race_gets_eagain():
    server = sockserve.TCPServer(("127.0.0.1", 0), EchoUpper)
    try:
        server.add_address(("127.0.0.1", 0))
        extra = server.listeners[1]
        assert extra.getblocking() is False
        with pytest.raises(BlockingIOError):
            extra.accept()  # nothing pending: what a worker that lost the race sees
    finally:
        server.server_close()


def test_handle_request_serves_a_client_of_an_added_listener():
    server = sockserve.TCPServer(("127.0.0.1", 0), EchoUpper)
    server.timeout = CLIENT_TIMEOUT
    try:
        second = server.add_address(("127.0.0.1", 0))
        with socket.create_connection(second, timeout=CLIENT_TIMEOUT) as client:
            client.sendall(b"once")
            client.shutdown(socket.SHUT_WR)
            server.handle_request()
            assert read_to_eof(client) == b"ONCE"
    finally:
        server.server_close()


def test_a_busy_second_address_fails_naming_it_and_leaves_nothing_open():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()
        with no_leaks():
            server = sockserve.TCPServer(("127.0.0.1", 0), EchoUpper)
            try:
                with pytest.raises(sockserve.BindError) as caught:
                    server.add_address(taken)
                assert caught.value.errno == errno.EADDRINUSE
                assert repr(taken) in str(caught.value)
                assert len(server.listeners) == 1
            finally:
                server.server_close()


@requires_af_unix
def test_a_failed_unix_address_leaves_the_servers_own_socket_file(tmp_path):
    own = str(tmp_path / "own.sock")
    server = sockserve.UnixStreamServer(own, EchoUpper)
    try:
        with pytest.raises(sockserve.BindError):
            server.add_address(str(tmp_path / "no-such-dir" / "x.sock"))
        assert os.path.exists(own)
    finally:
        server.server_close()
    assert not os.path.exists(own)


def test_add_listener_refuses_another_socket_type_and_a_served_socket():
    server = sockserve.TCPServer(("127.0.0.1", 0), EchoUpper)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dgram:
            with pytest.raises(TypeError, match="SOCK_DGRAM"):
                server.add_listener(dgram)
        with pytest.raises(ValueError, match="served already"):
            server.add_listener(server.socket)
    finally:
        server.server_close()


def test_add_listener_listens_on_a_bound_socket_and_close_listeners_closes_it():
    server = sockserve.TCPServer(("127.0.0.1", 0), EchoUpper)
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        server.add_listener(sock)  # bound, not listening: it is made to listen
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        with socket.create_connection(sock.getsockname(), timeout=CLIENT_TIMEOUT):
            pass  # accepted into the backlog
        server.close_listeners()
        assert sock.fileno() == -1 and server.listeners == (server.socket,)
    finally:
        sock.close()
        server.server_close()


class ListenersClosed(sockserve.BaseRequestHandler):
    """Replies whether this process still holds any of the server's listening sockets."""

    def handle(self):
        read_to_eof(self.request)
        held = [s for s in self.server.listeners if s.fileno() != -1]
        self.request.sendall(b"held %d" % len(held))


@requires_fork
def test_a_forking_child_closes_every_listening_socket_not_only_its_own():
    with no_leaks():
        server = sockserve.ForkingTCPServer(("127.0.0.1", 0), ListenersClosed)
        second = server.add_address(("127.0.0.1", 0))
        with serving(server):
            assert ask(server.server_address, b"x") == b"held 0"
            assert ask(second, b"x") == b"held 0"
        assert_bindable(second)


@requires_fork
def test_prefork_refuses_reuse_port_with_a_second_address_before_forking_and_leaks_nothing():
    cls = sockserve.compose("tcp", "prefork", options={"workers": 2, "reuse_port": True})
    with no_leaks():
        with cls(("127.0.0.1", 0), EchoUpper) as server:
            extra = server.add_address(("127.0.0.1", 0))
            before = child_pids()
            with pytest.raises(sockserve.OptionError, match="bad value True for option 'reuse_port'") as caught:
                server.serve_forever()
            assert child_pids() == before, "no worker was forked"
            assert repr(extra) in str(caught.value) and "turn reuse_port off" in str(caught.value)
    # Without the second address the same class serves: the check refuses only the mix.
    with cls(("127.0.0.1", 0), EchoUpper) as server, serving(server):
        assert ask(server.server_address, b"one") == b"ONE"
