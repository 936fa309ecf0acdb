"""BaseServer, TCPServer and UDPServer: the documented lifecycle, over real sockets.

Where sockserve promises the standard module's behaviour, the scenario runs against both
``sockserve`` and the standard ``socketserver`` (the ``mod`` fixture), so a difference
shows up as one of the pair failing. Behaviour that goes beyond the standard module
(shutdown waking the loop at once, shutdown before serving or from a handler, BindError)
is tested on sockserve alone.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import sys
import threading
import time

import pytest

import sockserve
from support import no_leaks, read_to_eof, requires_af_unix, start_serving, tcp_client, wait_until
from support import mod  # noqa: F401 - a fixture, named as a test parameter

#: Upper bound for anything that should happen "at once"; generous for a loaded CI box.
PROMPTLY = 2.0
#: Timeout of every blocking client call, so that no test can hang.
CLIENT_TIMEOUT = 5.0


def udp_client(server) -> socket.socket:
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(CLIENT_TIMEOUT)
    client.connect(server.server_address)
    return client


def start(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def stop(server, thread: threading.Thread) -> None:
    server.shutdown()
    thread.join(CLIENT_TIMEOUT)
    assert not thread.is_alive(), "serve_forever did not stop"


def upper_handler(mod):
    """A stream handler replying to one recv() with its upper-cased bytes."""

    class Upper(mod.BaseRequestHandler):
        def handle(self):
            self.request.sendall(self.request.recv(1024).upper())

    return Upper


# ------------------------------------------------------------------ fileno and attributes


def test_fileno_is_the_listening_socket_so_select_sees_clients(mod):
    with mod.TCPServer(("127.0.0.1", 0), mod.BaseRequestHandler) as server:
        assert server.fileno() == server.socket.fileno()
        assert select.select([server], [], [], 0) == ([], [], [])
        with tcp_client(server):
            readable, _, _ = select.select([server], [], [], CLIENT_TIMEOUT)
            assert readable == [server]


def test_udp_server_fileno_is_its_datagram_socket(mod):
    with mod.UDPServer(("127.0.0.1", 0), mod.BaseRequestHandler) as server:
        assert server.fileno() == server.socket.fileno()
        with udp_client(server) as client:
            client.send(b"ping")
            readable, _, _ = select.select([server], [], [], CLIENT_TIMEOUT)
            assert readable == [server]


@pytest.mark.parametrize(
    "name, family, socket_type",
    [
        ("TCPServer", socket.AF_INET, socket.SOCK_STREAM),
        ("UDPServer", socket.AF_INET, socket.SOCK_DGRAM),
        ("ThreadingTCPServer", socket.AF_INET, socket.SOCK_STREAM),
        ("ThreadingUDPServer", socket.AF_INET, socket.SOCK_DGRAM),
    ],
)
def test_socket_type_and_address_family_match_the_socket(mod, name, family, socket_type):
    cls = getattr(mod, name)
    assert cls.address_family == family
    assert cls.socket_type == socket_type
    with cls(("127.0.0.1", 0), mod.BaseRequestHandler) as server:
        assert server.socket.family == family
        assert server.socket.type == socket_type


@requires_af_unix
@pytest.mark.parametrize(
    "name, socket_type",
    [("UnixStreamServer", socket.SOCK_STREAM), ("UnixDatagramServer", socket.SOCK_DGRAM)],
)
def test_unix_servers_have_af_unix_and_their_socket_type(mod, name, socket_type, tmp_path):
    cls = getattr(mod, name)
    assert cls.address_family == socket.AF_UNIX
    assert cls.socket_type == socket_type
    with cls(str(tmp_path / "s.sock"), mod.BaseRequestHandler) as server:
        assert server.socket.family == socket.AF_UNIX
        assert server.socket.type == socket_type
        assert server.server_address == str(tmp_path / "s.sock")


def _bind_outcome(cls, address, handler):
    """What constructing *cls* at *address* gives: the bound address's shape, or the error."""
    try:
        server = cls(address, handler)
    except OSError as exc:
        return ("error", type(exc), exc.errno)
    with server:
        return ("bound", server.socket.family, type(server.server_address), len(server.server_address))


@pytest.mark.parametrize(
    "family, address",
    [
        pytest.param(
            "AF_VSOCK", (getattr(socket, "VMADDR_CID_ANY", 0), getattr(socket, "VMADDR_PORT_ANY", 0)),
            marks=pytest.mark.skipif(not hasattr(socket, "AF_VSOCK"), reason="no AF_VSOCK"),
        ),
        pytest.param(
            "AF_TIPC", (getattr(socket, "TIPC_ADDR_NAMESEQ", 0), 4711, 1, 1),
            marks=pytest.mark.skipif(not hasattr(socket, "AF_TIPC"), reason="no AF_TIPC"),
        ),
    ],
)
def test_address_family_without_a_plugin_is_used_as_given_like_the_standard_module(family, address):
    """A subclass may set any ``address_family``; with no family plugin for it, sockserve
    binds the address unchecked, exactly as the standard module does (or fails as it does
    where the kernel lacks the family)."""
    import socketserver

    outcomes = []
    for module in (socketserver, sockserve):
        cls = type("Server", (module.TCPServer,), {"address_family": getattr(socket, family)})
        with no_leaks():
            outcomes.append(_bind_outcome(cls, address, module.BaseRequestHandler))
    standard, ours = outcomes
    if standard[0] == "error":
        assert ours[:1] == ("error",) and issubclass(ours[1], standard[1]) and ours[2] == standard[2]
    else:
        assert ours == standard


@pytest.mark.parametrize("name", ["TCPServer", "UDPServer"])
def test_server_address_is_the_bound_address_after_port_0(mod, name):
    with getattr(mod, name)(("127.0.0.1", 0), mod.BaseRequestHandler) as server:
        host, port = server.server_address
        assert host == "127.0.0.1"
        assert port != 0
        assert server.server_address == server.socket.getsockname()


@pytest.mark.parametrize(
    "name",
    ["TCPServer", "UDPServer", "ThreadingTCPServer", "ForkingTCPServer", "UnixStreamServer"],
)
def test_request_queue_size_is_5_on_the_standard_classes(mod, name):
    assert getattr(mod, name).request_queue_size == 5


def count_completed_connections(server, attempts: int) -> int:
    """Start *attempts* non-blocking connects; return how many the kernel completed.

    Nobody accepts, so completed connections pile up in the listen backlog; Linux
    completes ``backlog + 1`` of them and drops the SYNs of the rest.
    """
    clients = []
    try:
        for _ in range(attempts):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.setblocking(False)
            clients.append(client)
            client.connect_ex(server.server_address)

        def completed() -> int:
            _, writable, _ = select.select([], clients, [], 0)
            return sum(c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 for c in writable)

        # Wait until no more complete for a while (handshakes on loopback take microseconds).
        seen, stable_since = completed(), time.monotonic()
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while time.monotonic() - stable_since < 0.3 and time.monotonic() < deadline:
            time.sleep(0.02)
            now = completed()
            if now != seen:
                seen, stable_since = now, time.monotonic()
        return seen
    finally:
        for client in clients:
            client.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux backlog accounting")
@pytest.mark.parametrize("queue_size", [5, 1])
def test_request_queue_size_is_the_listen_backlog(mod, queue_size):
    class Server(mod.TCPServer):
        request_queue_size = queue_size

    with Server(("127.0.0.1", 0), mod.BaseRequestHandler) as server:
        assert count_completed_connections(server, queue_size + 4) == queue_size + 1


@pytest.mark.parametrize("name", ["TCPServer", "UDPServer"])
def test_reuse_options_are_off_by_default(mod, name):
    cls = getattr(mod, name)
    assert cls.allow_reuse_address is False
    assert cls.allow_reuse_port is False
    with cls(("127.0.0.1", 0), mod.BaseRequestHandler) as server:
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
        if hasattr(socket, "SO_REUSEPORT"):
            assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0


@pytest.mark.parametrize("name", ["TCPServer", "UDPServer"])
def test_allow_reuse_address_sets_so_reuseaddr(mod, name):
    class Server(getattr(mod, name)):
        allow_reuse_address = True

    with Server(("127.0.0.1", 0), mod.BaseRequestHandler) as server:
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
        if hasattr(socket, "SO_REUSEPORT"):
            assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT")
@pytest.mark.parametrize("name", ["TCPServer", "UDPServer"])
def test_allow_reuse_port_sets_so_reuseport_so_two_servers_share_a_port(mod, name):
    class Server(getattr(mod, name)):
        allow_reuse_port = True

    with Server(("127.0.0.1", 0), mod.BaseRequestHandler) as first:
        assert first.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) != 0
        assert first.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
        with Server(first.server_address, mod.BaseRequestHandler) as second:
            assert second.server_address == first.server_address


def test_udp_max_packet_size_is_8192_and_such_a_datagram_arrives_whole(mod):
    received = []

    class Record(mod.BaseRequestHandler):
        def handle(self):
            received.append(self.request[0])

    assert mod.UDPServer.max_packet_size == 8192
    payload = bytes(range(256)) * 32  # 8192 bytes
    with mod.UDPServer(("127.0.0.1", 0), Record) as server, udp_client(server) as client:
        server.timeout = CLIENT_TIMEOUT
        client.send(payload)
        server.handle_request()
    assert received == [payload]


# ------------------------------------------------------------------ binding and activating


def test_bind_and_activate_false_leaves_binding_and_listening_to_the_caller(mod):
    server = mod.TCPServer(("127.0.0.1", 0), upper_handler(mod), bind_and_activate=False)
    with server:
        assert server.socket.getsockname() == ("0.0.0.0", 0)
        assert server.server_address == ("127.0.0.1", 0)
        # The point of the flag: socket options can be set before binding.
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.server_bind()
        assert server.server_address[1] != 0
        assert server.server_address == server.socket.getsockname()
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
        server.server_activate()
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        with tcp_client(server) as client:
            client.sendall(b"manual")
            server.handle_request()
            assert read_to_eof(client) == b"MANUAL"


def occupied_port():
    """A listening socket holding a loopback port."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


def test_failing_bind_raises_eaddrinuse_and_closes_the_socket(mod):
    with occupied_port() as holder:
        address = holder.getsockname()
        with no_leaks():
            with pytest.raises(OSError) as info:
                mod.TCPServer(address, mod.BaseRequestHandler)
        assert info.value.errno == errno.EADDRINUSE


def test_bind_error_names_the_address_and_keeps_the_os_error():
    with occupied_port() as holder:
        address = holder.getsockname()
        with no_leaks():
            with pytest.raises(sockserve.BindError) as info:
                sockserve.TCPServer(address, sockserve.BaseRequestHandler)
    error = info.value
    assert isinstance(error, OSError)
    assert error.errno == errno.EADDRINUSE
    assert error.address == address
    assert str(error) == (
        f"[Errno {errno.EADDRINUSE}] {os.strerror(errno.EADDRINUSE)}: "
        f"cannot bind inet address {address!r}"
    )
    assert isinstance(error.__cause__, OSError)
    assert error.__cause__.errno == errno.EADDRINUSE


def test_failing_listen_raises_and_closes_the_socket(mod):
    class DatagramListener(mod.TCPServer):
        # bind() works for a datagram socket, listen() does not.
        socket_type = socket.SOCK_DGRAM

    with no_leaks():
        with pytest.raises(OSError) as info:
            DatagramListener(("127.0.0.1", 0), mod.BaseRequestHandler)
    assert info.value.errno == errno.EOPNOTSUPP


def test_failing_server_activate_override_closes_the_socket(mod):
    sockets = []

    class Broken(mod.TCPServer):
        def server_activate(self):
            sockets.append(self.socket)
            raise RuntimeError("cannot activate")

    with no_leaks():
        with pytest.raises(RuntimeError, match="cannot activate"):
            Broken(("127.0.0.1", 0), mod.BaseRequestHandler)
    assert sockets[0].fileno() == -1


def test_context_manager_returns_the_server_and_closes_its_socket(mod):
    with no_leaks():
        with mod.TCPServer(("127.0.0.1", 0), mod.BaseRequestHandler) as server:
            assert isinstance(server, mod.TCPServer)
            assert server.socket.fileno() >= 0
        assert server.socket.fileno() == -1


def test_context_manager_closes_the_socket_when_the_body_raises(mod):
    with pytest.raises(KeyError):
        with mod.UDPServer(("127.0.0.1", 0), mod.BaseRequestHandler) as server:
            raise KeyError("body")
    assert server.socket.fileno() == -1


# ------------------------------------------------------------------ handle_request


def test_handle_request_serves_exactly_one_request(mod):
    with mod.TCPServer(("127.0.0.1", 0), upper_handler(mod)) as server:
        with tcp_client(server) as first, tcp_client(server) as second:
            first.sendall(b"one")
            second.sendall(b"two")
            server.handle_request()
            assert read_to_eof(first) == b"ONE"
            second.settimeout(0.2)
            with pytest.raises(TimeoutError):
                second.recv(1)
            second.settimeout(CLIENT_TIMEOUT)
            server.handle_request()
            assert read_to_eof(second) == b"TWO"


def test_handle_request_without_timeout_waits_for_a_request(mod):
    with mod.TCPServer(("127.0.0.1", 0), upper_handler(mod)) as server:
        thread = start(server.handle_request)
        time.sleep(0.2)
        assert thread.is_alive()
        with tcp_client(server) as client:
            client.sendall(b"late")
            thread.join(CLIENT_TIMEOUT)
            assert not thread.is_alive()
            assert read_to_eof(client) == b"LATE"


@pytest.mark.parametrize(
    "socket_timeout, server_timeout",
    [(None, 0.1), (0.1, None), (0.1, 60.0), (60.0, 0.1)],
    ids=["server", "socket", "socket-smaller", "server-smaller"],
)
def test_handle_request_times_out_after_the_smaller_timeout(mod, socket_timeout, server_timeout):
    timeouts = []

    class Server(mod.TCPServer):
        timeout = server_timeout

        def handle_timeout(self):
            timeouts.append(threading.get_ident())

    with Server(("127.0.0.1", 0), mod.BaseRequestHandler) as server:
        server.socket.settimeout(socket_timeout)
        began = time.monotonic()
        server.handle_request()
        took = time.monotonic() - began
    assert timeouts == [threading.get_ident()]
    assert 0.09 <= took < PROMPTLY


def test_handle_request_does_not_call_handle_timeout_when_a_request_comes(mod):
    timeouts = []

    class Server(mod.TCPServer):
        timeout = CLIENT_TIMEOUT

        def handle_timeout(self):
            timeouts.append(True)

    with Server(("127.0.0.1", 0), upper_handler(mod)) as server, tcp_client(server) as client:
        client.sendall(b"in time")
        server.handle_request()
        assert read_to_eof(client) == b"IN TIME"
    assert timeouts == []


# ------------------------------------------------------------------ serve_forever and shutdown


def test_serve_forever_calls_service_actions_on_every_poll(mod):
    calls = []

    class Server(mod.TCPServer):
        def service_actions(self):
            calls.append(threading.get_ident())

    with Server(("127.0.0.1", 0), mod.BaseRequestHandler) as server:
        thread = start_serving(server, poll_interval=0.01)
        try:
            assert wait_until(lambda: len(calls) >= 5, CLIENT_TIMEOUT, interval=0.005), (
                f"only {len(calls)} service_actions calls"
            )
        finally:
            stop(server, thread)
    assert set(calls) == {thread.ident}


def test_serve_forever_calls_service_actions_after_a_request_too(mod):
    calls = []

    class Server(mod.TCPServer):
        def service_actions(self):
            calls.append(time.monotonic())

    with Server(("127.0.0.1", 0), upper_handler(mod)) as server:
        # The first idle turn ends after 1 s; the request comes well before that.
        thread = start_serving(server, poll_interval=1.0)
        try:
            with tcp_client(server) as client:
                client.sendall(b"x")
                assert read_to_eof(client) == b"X"
                replied = time.monotonic()
            assert wait_until(lambda: len(calls) >= 1, timeout=0.5, interval=0.005)
            assert calls[0] - replied < 0.5
        finally:
            stop(server, thread)


def test_shutdown_from_another_thread_stops_serve_forever(mod):
    with mod.TCPServer(("127.0.0.1", 0), upper_handler(mod)) as server:
        thread = start_serving(server, poll_interval=0.05)
        with tcp_client(server) as client:
            client.sendall(b"before")
            assert read_to_eof(client) == b"BEFORE"
        began = time.monotonic()
        server.shutdown()
        assert time.monotonic() - began < PROMPTLY
        thread.join(CLIENT_TIMEOUT)
        assert not thread.is_alive()


def test_shutdown_wakes_the_loop_without_waiting_for_poll_interval():
    with sockserve.TCPServer(("127.0.0.1", 0), sockserve.BaseRequestHandler) as server:
        thread = start_serving(server, poll_interval=60)
        time.sleep(0.1)  # let the loop block in its wait
        began = time.monotonic()
        server.shutdown()
        assert time.monotonic() - began < PROMPTLY
        thread.join(PROMPTLY)
        assert not thread.is_alive()


def test_shutdown_twice_is_safe(mod):
    with mod.TCPServer(("127.0.0.1", 0), mod.BaseRequestHandler) as server:
        thread = start_serving(server, poll_interval=0.02)
        server.shutdown()
        began = time.monotonic()
        server.shutdown()
        assert time.monotonic() - began < PROMPTLY
        thread.join(CLIENT_TIMEOUT)
        assert not thread.is_alive()


def test_shutdown_before_serving_returns_and_next_serve_forever_returns_at_once():
    """The standard module's shutdown() blocks forever here; sockserve's returns."""
    with sockserve.TCPServer(("127.0.0.1", 0), upper_handler(sockserve)) as server:
        caller = start(server.shutdown)
        caller.join(PROMPTLY)
        assert not caller.is_alive(), "shutdown() before serve_forever() blocked"
        loop = start_serving(server, poll_interval=60)
        loop.join(PROMPTLY)
        assert not loop.is_alive(), "serve_forever() after an early shutdown() kept serving"
        # The early shutdown was used up: the next serve_forever serves.
        loop = start_serving(server, poll_interval=0.02)
        try:
            with tcp_client(server) as client:
                client.sendall(b"served")
                assert read_to_eof(client) == b"SERVED"
        finally:
            stop(server, loop)


def test_shutdown_from_a_sync_handler_stops_the_loop_after_that_request():
    """The standard module deadlocks here; sockserve's shutdown() returns at once."""
    shutdown_took = []

    class StopHandler(sockserve.BaseRequestHandler):
        def handle(self):
            began = time.monotonic()
            self.server.shutdown()
            shutdown_took.append(time.monotonic() - began)
            self.request.sendall(self.request.recv(1024).upper())

    with sockserve.TCPServer(("127.0.0.1", 0), StopHandler) as server:
        loop = start_serving(server, poll_interval=60)
        try:
            with tcp_client(server) as client:
                client.sendall(b"last")
                assert read_to_eof(client) == b"LAST"
            loop.join(PROMPTLY)
            assert not loop.is_alive(), "serve_forever went on after shutdown() in a handler"
        finally:
            stop(server, loop)
        assert len(shutdown_took) == 1 and shutdown_took[0] < PROMPTLY
        # Not served any more: a new connection waits in the backlog unanswered.
        with tcp_client(server) as client:
            client.sendall(b"ignored")
            client.settimeout(0.2)
            with pytest.raises(TimeoutError):
                client.recv(1)


def test_serve_forever_can_run_again_after_shutdown(mod):
    with mod.TCPServer(("127.0.0.1", 0), upper_handler(mod)) as server:
        for round_ in range(3):
            thread = start_serving(server, poll_interval=0.02)
            try:
                with tcp_client(server) as client:
                    client.sendall(b"round %d" % round_)
                    assert read_to_eof(client) == b"ROUND %d" % round_
            finally:
                stop(server, thread)


# ------------------------------------------------------------------ the request path


def test_finish_request_instantiates_the_handler_with_request_address_and_server(mod):
    seen = []

    class Record(mod.BaseRequestHandler):
        def handle(self):
            seen.append((self.request, self.client_address, self.server))
            self.request.sendall(b"peer %r" % (self.request.getpeername(),))

    with mod.TCPServer(("127.0.0.1", 0), Record) as server, tcp_client(server) as client:
        server.handle_request()
        reply = read_to_eof(client)
        own_address = client.getsockname()
    ((request, client_address, handler_server),) = seen
    assert isinstance(request, socket.socket)
    assert client_address == own_address
    assert reply == b"peer %r" % (client_address,)
    assert handler_server is server


def test_finish_request_override_sees_each_request(mod):
    calls = []

    class Server(mod.TCPServer):
        def finish_request(self, request, client_address):
            calls.append((type(request), client_address))
            super().finish_request(request, client_address)

    with Server(("127.0.0.1", 0), upper_handler(mod)) as server, tcp_client(server) as client:
        client.sendall(b"finish")
        server.handle_request()
        assert read_to_eof(client) == b"FINISH"
        assert calls == [(socket.socket, client.getsockname())]


def test_refused_request_is_shut_down_and_closed(mod):
    """verify_request returning False: the handler never runs and the client sees EOF."""
    verified = []
    handled = []

    class Refusing(mod.TCPServer):
        def verify_request(self, request, client_address):
            verified.append((request, client_address))
            return False

    class Handler(mod.BaseRequestHandler):
        def handle(self):
            handled.append(self.client_address)

    with Refusing(("127.0.0.1", 0), Handler) as server, tcp_client(server) as client:
        server.handle_request()
        assert client.recv(1024) == b""  # EOF, not a timeout
        ((request, client_address),) = verified
        assert client_address == client.getsockname()
    assert handled == []
    assert request.fileno() == -1


def test_verify_request_true_lets_the_request_through(mod):
    verified = []

    class Checking(mod.TCPServer):
        def verify_request(self, request, client_address):
            verified.append(client_address)
            return True

    with Checking(("127.0.0.1", 0), upper_handler(mod)) as server, tcp_client(server) as client:
        client.sendall(b"ok")
        server.handle_request()
        assert read_to_eof(client) == b"OK"
        assert verified == [client.getsockname()]


def test_process_request_override_decides_how_the_request_runs(mod):
    processed = []

    class Server(mod.TCPServer):
        def process_request(self, request, client_address):
            processed.append((threading.get_ident(), client_address))
            self.finish_request(request, client_address)
            request.sendall(b"+")  # after the handler, before the shutdown
            self.shutdown_request(request)

    with Server(("127.0.0.1", 0), upper_handler(mod)) as server, tcp_client(server) as client:
        client.sendall(b"custom")
        server.handle_request()
        assert read_to_eof(client) == b"CUSTOM+"
        assert processed == [(threading.get_ident(), client.getsockname())]


def test_handler_exception_goes_to_handle_error_and_the_server_keeps_serving(mod):
    errors = []

    class Flaky(mod.BaseRequestHandler):
        def handle(self):
            data = self.request.recv(1024)
            if data == b"fail":
                raise ValueError("bad request")
            self.request.sendall(data.upper())

    class Server(mod.TCPServer):
        def handle_error(self, request, client_address):
            exc = sys.exc_info()[1]
            errors.append((type(exc), str(exc), request.fileno() >= 0, client_address))

    with Server(("127.0.0.1", 0), Flaky) as server:
        thread = start_serving(server, poll_interval=0.02)
        try:
            with tcp_client(server) as client:
                client.sendall(b"fail")
                assert read_to_eof(client) == b""  # the request was still shut down
                failing_address = client.getsockname()
            with tcp_client(server) as client:
                client.sendall(b"fine")
                assert read_to_eof(client) == b"FINE"
        finally:
            stop(server, thread)
    # handle_error runs while the request is still open, before it is shut down.
    assert errors == [(ValueError, "bad request", True, failing_address)]


def test_default_handle_error_prints_the_traceback_to_stderr(mod, capsys):
    class Failing(mod.BaseRequestHandler):
        def handle(self):
            raise ValueError("printed to stderr")

    with mod.TCPServer(("127.0.0.1", 0), Failing) as server, tcp_client(server) as client:
        server.handle_request()
        address = client.getsockname()
        assert client.recv(1) == b""
    err = capsys.readouterr().err
    assert "-" * 40 in err
    assert f"Exception occurred during processing of request from {address!r}" in err
    assert "Traceback (most recent call last):" in err
    assert "ValueError: printed to stderr" in err


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
def test_base_exceptions_propagate_out_of_handle_request(mod, exc_type):
    """Only Exception subclasses go to handle_error; the request is still shut down."""
    errors = []

    class Exiting(mod.BaseRequestHandler):
        def handle(self):
            raise exc_type("stop now")

    class Server(mod.TCPServer):
        def handle_error(self, request, client_address):
            errors.append(sys.exc_info()[1])

    with Server(("127.0.0.1", 0), Exiting) as server, tcp_client(server) as client:
        with pytest.raises(exc_type, match="stop now"):
            server.handle_request()
        assert client.recv(1) == b""
    assert errors == []


# ------------------------------------------------------------------ get_request and closing


def test_tcp_get_request_returns_a_connected_socket_and_the_peer_address(mod):
    with mod.TCPServer(("127.0.0.1", 0), mod.BaseRequestHandler) as server:
        with tcp_client(server) as client:
            request, client_address = server.get_request()
            with request:
                assert isinstance(request, socket.socket)
                assert client_address == client.getsockname()
                assert request.getpeername() == client.getsockname()
                request.sendall(b"direct")
                assert client.recv(1024) == b"direct"


def test_udp_get_request_returns_data_and_the_server_socket(mod):
    with mod.UDPServer(("127.0.0.1", 0), mod.BaseRequestHandler) as server:
        with udp_client(server) as client:
            client.send(b"datagram")
            (data, sock), client_address = server.get_request()
            assert data == b"datagram"
            assert sock is server.socket
            assert client_address == client.getsockname()


@requires_af_unix
def test_unix_stream_get_request_gives_the_unbound_peer_as_empty_string(mod, tmp_path):
    path = str(tmp_path / "g.sock")
    with mod.UnixStreamServer(path, mod.BaseRequestHandler) as server:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(CLIENT_TIMEOUT)
            client.connect(path)
            request, client_address = server.get_request()
            with request:
                assert isinstance(request, socket.socket)
                assert client_address == ""


def test_tcp_shutdown_request_shuts_the_write_side_down_then_closes(mod):
    order = []

    class Server(mod.TCPServer):
        def shutdown_request(self, request):
            order.append("shutdown_request")
            super().shutdown_request(request)
            order.append(("closed after shutdown_request", request.fileno() == -1))

        def close_request(self, request):
            try:
                request.send(b"late")
                order.append("close_request: still writable")
            except BrokenPipeError:
                order.append("close_request: write side already shut down")
            super().close_request(request)

    with Server(("127.0.0.1", 0), upper_handler(mod)) as server, tcp_client(server) as client:
        client.sendall(b"order")
        server.handle_request()
        assert read_to_eof(client) == b"ORDER"
    assert order == [
        "shutdown_request",
        "close_request: write side already shut down",
        ("closed after shutdown_request", True),
    ]


def test_udp_shutdown_request_calls_close_request_and_keeps_the_server_socket(mod):
    order = []

    class Echo(mod.BaseRequestHandler):
        def handle(self):
            data, sock = self.request
            sock.sendto(data.upper(), self.client_address)

    class Server(mod.UDPServer):
        def shutdown_request(self, request):
            order.append(("shutdown_request", request[0]))
            super().shutdown_request(request)

        def close_request(self, request):
            order.append(("close_request", request[0]))
            super().close_request(request)

    with Server(("127.0.0.1", 0), Echo) as server, udp_client(server) as client:
        server.timeout = CLIENT_TIMEOUT
        for payload in (b"one", b"two"):
            client.send(payload)
            server.handle_request()
            assert client.recv(1024) == payload.upper()
        assert server.socket.fileno() >= 0
    assert order == [
        ("shutdown_request", b"one"),
        ("close_request", b"one"),
        ("shutdown_request", b"two"),
        ("close_request", b"two"),
    ]


@pytest.mark.parametrize("listening_timeout", [None, 5.0])
def test_accepted_socket_is_a_blocking_socket_of_the_listening_family_and_type(mod, listening_timeout):
    """What get_request returns, as socket.accept() makes it: same family and type, and
    blocking even when the listening socket has a timeout."""
    seen = {}

    class Inspect(mod.BaseRequestHandler):
        def handle(self):
            sock = self.request
            seen.update(cls=type(sock), family=sock.family, type=sock.type, timeout=sock.gettimeout())
            self.request.sendall(b"ok")

    with mod.TCPServer(("127.0.0.1", 0), Inspect) as server:
        server.socket.settimeout(listening_timeout)
        with tcp_client(server) as client:
            server.handle_request()
            assert read_to_eof(client) == b"ok"
    assert seen == {"cls": socket.socket, "family": socket.AF_INET,
                    "type": socket.SOCK_STREAM, "timeout": None}


def test_a_listening_socket_of_another_class_accepts_through_its_own_accept(mod):
    """A wrapped listening socket (ssl.SSLSocket, say) keeps the accept() it overrides."""

    class Recording(socket.socket):
        accepted = 0

        def accept(self):
            Recording.accepted += 1
            return super().accept()

    class Reply(mod.BaseRequestHandler):
        def handle(self):
            self.request.sendall(b"ok")

    with mod.TCPServer(("127.0.0.1", 0), Reply) as server:
        plain = server.socket
        server.socket = Recording(plain.family, plain.type, plain.proto, fileno=plain.detach())
        with tcp_client(server) as client:
            server.handle_request()
            assert read_to_eof(client) == b"ok"
    assert Recording.accepted == 1


@pytest.mark.parametrize("exc_type", [ValueError, KeyboardInterrupt])
def test_a_failing_sync_request_is_shut_down_exactly_once(mod, exc_type):
    """An Exception goes to handle_error and the server goes on; a BaseException leaves
    handle_request. Either way shutdown_request runs once for the request."""
    calls = []

    class Fails(mod.BaseRequestHandler):
        def handle(self):
            raise exc_type("from the handler")

    class Server(mod.TCPServer):
        def shutdown_request(self, request):
            calls.append(request)
            super().shutdown_request(request)

        def handle_error(self, request, client_address):
            calls.append("handle_error")

    with Server(("127.0.0.1", 0), Fails) as server:
        with tcp_client(server) as client:
            if exc_type is KeyboardInterrupt:
                with pytest.raises(KeyboardInterrupt):
                    server.handle_request()
            else:
                server.handle_request()
            assert read_to_eof(client) == b""
    shut_down = [call for call in calls if call != "handle_error"]
    assert len(shut_down) == 1
    if exc_type is ValueError:
        assert calls[0] == "handle_error"  # reported first, then shut down
    else:
        assert "handle_error" not in calls  # only Exceptions are handled


@pytest.mark.parametrize("name", ["TCPServer", "ThreadingTCPServer", "UDPServer"])
def test_an_unbound_server_takes_a_socket_handed_over_later_like_socket_activation(mod, name):
    """``bind_and_activate=False`` with no address yet, then a socket that is already bound
    (and listening): the systemd socket-activation pattern the standard module allows."""
    cls = getattr(mod, name)
    stream = cls.socket_type == socket.SOCK_STREAM

    class Echo(mod.BaseRequestHandler):
        def handle(self):
            if stream:
                self.request.sendall(self.request.recv(64).upper())
            else:
                data, sock = self.request
                sock.sendto(data.upper(), self.client_address)

    handed = socket.socket(socket.AF_INET, cls.socket_type)
    handed.bind(("127.0.0.1", 0))
    if stream:
        handed.listen()
    with no_leaks():
        server = cls(None, Echo, bind_and_activate=False)
        try:
            server.socket.close()
            server.socket = handed
            server.server_address = handed.getsockname()
            thread = start_serving(server)
            with socket.socket(socket.AF_INET, cls.socket_type) as client:
                client.settimeout(5)
                client.connect(server.server_address)
                client.sendall(b"activated")
                assert client.recv(64) == b"ACTIVATED"
        finally:
            server.shutdown()
            thread.join(5)
            server.server_close()
    assert handed.fileno() == -1  # server_close closed the socket it was handed


def test_an_unbound_server_checks_its_address_when_it_binds():
    server = sockserve.TCPServer(None, sockserve.BaseRequestHandler, bind_and_activate=False)
    try:
        with pytest.raises(sockserve.AddressError, match="expected"):
            server.server_bind()
        server.server_address = ("127.0.0.1", 0)
        server.server_bind()
        assert server.server_address[1] != 0
    finally:
        server.server_close()
