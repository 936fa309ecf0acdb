"""The inet and inet6 address families: IPv6 literals, ipv6_only, port range and shapes.

Servers bind only to loopback. Where the standard ``socketserver`` behaves differently the
same call runs against it side by side (imported only as the reference to compare against).
"""

from __future__ import annotations

import errno
import socket
import socketserver

import pytest

import sockserve
from support import EchoUpper, exchange, no_leaks, requires_ipv6, serving

INET_EXPECTED = (
    "expected a (host, port) tuple with a str host and an int port 0-65535, "
    "e.g. ('127.0.0.1', 8000)"
)
INET6_EXPECTED = (
    "expected a (host, port[, flowinfo[, scope_id]]) tuple with a str host and an int port "
    "0-65535, e.g. ('::1', 8000)"
)


# ----------------------------------------------------------------- IPv6 literals


@requires_ipv6
@pytest.mark.parametrize("name", ["TCPServer", "UDPServer", "ThreadingTCPServer", "ThreadingUDPServer"])
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_ipv6_literal_serves_where_the_standard_module_raises_gaierror(name, host):
    with pytest.raises(socket.gaierror):
        getattr(socketserver, name)((host, 0), EchoUpper)
    with no_leaks():
        with serving(getattr(sockserve, name)((host, 0), EchoUpper)) as server:
            assert server.address_family == socket.AF_INET6
            assert server.socket.family == socket.AF_INET6
            assert server.server_address[0] == "::1"
            assert server.server_address[1] > 0
            assert exchange(server, b"over ipv6") == b"OVER IPV6"


def test_ipv4_address_keeps_an_ipv4_socket():
    with sockserve.TCPServer(("127.0.0.1", 0), EchoUpper) as server:
        assert server.address_family == socket.AF_INET
        assert server.socket.family == socket.AF_INET
        assert server.server_address[0] == "127.0.0.1"


@requires_ipv6
def test_ipv6_literal_does_not_change_the_class_address_family():
    """Only the instance gets AF_INET6; the class stays the documented AF_INET one."""
    with sockserve.TCPServer(("::1", 0), EchoUpper):
        pass
    assert sockserve.TCPServer.address_family == socket.AF_INET


@requires_ipv6
@pytest.mark.parametrize("transport", ["tcp6", "udp6"])
def test_inet6_transports_accept_the_four_tuple_form(transport):
    with serving(sockserve.compose(transport)(("::1", 0, 0, 0), EchoUpper)) as server:
        assert server.server_address[:2] == ("::1", server.server_address[1])
        assert exchange(server, b"four") == b"FOUR"


# ----------------------------------------------------------------- ipv6_only
#
# Binding '::' would expose the port beyond loopback, so dual-stack behaviour is shown on
# the IPv4-mapped loopback address instead: an IPv6 socket bound to ::ffff:127.0.0.1
# serves IPv4 clients of 127.0.0.1, which only a socket that is not IPv6-only may do.
# (Linux turns IPV6_V6ONLY on by itself for a socket bound to '::1', so the option is
# only telling before such a bind.)

MAPPED_LOOPBACK = "::ffff:127.0.0.1"
INET6_TRANSPORTS = ["tcp6", "udp6", "tcp", "udp"]  # tcp/udp take IPv6 literals too
requires_v6only = pytest.mark.skipif(
    not hasattr(socket, "IPV6_V6ONLY"), reason="no IPV6_V6ONLY on this platform"
)


class SaysWhoCalls(sockserve.BaseRequestHandler):
    """Replies with the client's host as the server sees it."""

    def handle(self) -> None:
        host = str(self.client_address[0]).encode()
        if isinstance(self.request, tuple):
            self.request[1].sendto(host, self.client_address)
        else:
            self.request.sendall(host)


def ipv4_client_sees(server: object) -> bytes:
    """Ask *server* from an IPv4 socket connected to 127.0.0.1; return the reply."""
    port = server.server_address[1]  # type: ignore[attr-defined]
    with socket.socket(socket.AF_INET, server.socket_type) as client:  # type: ignore[attr-defined]
        client.settimeout(10)
        client.connect(("127.0.0.1", port))
        client.sendall(b"hello")
        return client.recv(1024)


def v6only(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)


def system_default_v6only() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        return v6only(sock)


def with_ipv6_only(transport: str, ipv6_only: bool | None) -> type:
    return type("Server", (sockserve.compose(transport),), {"ipv6_only": ipv6_only})


@requires_ipv6
@requires_v6only
@pytest.mark.parametrize("transport", INET6_TRANSPORTS)
def test_ipv6_only_false_serves_ipv4_clients_through_a_mapped_address(transport):
    with no_leaks():
        server = with_ipv6_only(transport, False)((MAPPED_LOOPBACK, 0), SaysWhoCalls)
        with serving(server):
            assert server.socket.family == socket.AF_INET6
            assert v6only(server.socket) == 0
            assert ipv4_client_sees(server) == MAPPED_LOOPBACK.encode()


@requires_ipv6
@requires_v6only
@pytest.mark.parametrize("transport", INET6_TRANSPORTS)
def test_ipv6_only_true_refuses_ipv4_through_a_mapped_address(transport):
    family = "inet6" if transport.endswith("6") else "inet"
    with no_leaks():
        with pytest.raises(sockserve.BindError) as raised:
            with_ipv6_only(transport, True)((MAPPED_LOOPBACK, 0), SaysWhoCalls)
    exc = raised.value
    assert exc.errno == errno.EINVAL
    assert exc.address == (MAPPED_LOOPBACK, 0)
    assert str(exc) == (
        f"[Errno {errno.EINVAL}] Invalid argument: cannot bind {family} address "
        f"({MAPPED_LOOPBACK!r}, 0)"
    )


@requires_ipv6
@requires_v6only
@pytest.mark.parametrize("transport", INET6_TRANSPORTS)
def test_ipv6_only_true_serves_ipv6_with_the_option_set(transport):
    with serving(with_ipv6_only(transport, True)(("::1", 0), EchoUpper)) as server:
        assert v6only(server.socket) == 1
        assert exchange(server, b"v6") == b"V6"


@requires_ipv6
@requires_v6only
@pytest.mark.parametrize("transport", INET6_TRANSPORTS)
def test_ipv6_only_none_leaves_the_system_default(transport):
    cls = with_ipv6_only(transport, None)
    if system_default_v6only():
        with pytest.raises(sockserve.BindError):
            cls((MAPPED_LOOPBACK, 0), SaysWhoCalls)
        return
    with serving(cls((MAPPED_LOOPBACK, 0), SaysWhoCalls)) as server:
        assert v6only(server.socket) == 0
        assert ipv4_client_sees(server) == MAPPED_LOOPBACK.encode()


def test_ipv6_only_is_ignored_for_an_ipv4_address():
    cls = type("Server", (sockserve.TCPServer,), {"ipv6_only": True})
    with serving(cls(("127.0.0.1", 0), EchoUpper)) as server:
        assert server.socket.family == socket.AF_INET
        assert exchange(server, b"v4") == b"V4"


def test_ipv6_only_defaults_to_none_on_every_standard_inet_class():
    for name in ("TCPServer", "UDPServer", "ThreadingTCPServer", "ForkingUDPServer"):
        assert getattr(sockserve, name).ipv6_only is None


# ----------------------------------------------------------------- port range


@pytest.mark.parametrize("port", [65536, 70000, -1])
@pytest.mark.parametrize("name", ["TCPServer", "UDPServer"])
def test_port_out_of_range_is_an_overflow_error_as_in_the_standard_module(name, port):
    with pytest.raises(OverflowError, match="port must be 0-65535"):
        getattr(socketserver, name)(("127.0.0.1", port), EchoUpper)
    with no_leaks():
        with pytest.raises(sockserve.PortRangeError) as raised:
            getattr(sockserve, name)(("127.0.0.1", port), EchoUpper)
    exc = raised.value
    assert isinstance(exc, OverflowError)
    assert isinstance(exc, sockserve.AddressError)
    assert isinstance(exc, ValueError)
    assert exc.address == ("127.0.0.1", port)
    assert exc.family == "inet"
    assert str(exc) == (
        f"bad inet address ('127.0.0.1', {port}): port {port} is out of range; {INET_EXPECTED}"
    )


@requires_ipv6
def test_port_out_of_range_on_inet6_names_the_inet6_shapes():
    with pytest.raises(sockserve.PortRangeError) as raised:
        sockserve.compose("tcp6")(("::1", 65536), EchoUpper)
    assert raised.value.family == "inet6"
    assert str(raised.value) == (
        f"bad inet6 address ('::1', 65536): port 65536 is out of range; {INET6_EXPECTED}"
    )


@pytest.mark.parametrize("port", [0, 65535])
def test_ports_at_the_ends_of_the_range_are_accepted(port):
    """0 binds an ephemeral port; 65535 is checked only for shape (it may be taken)."""
    try:
        server = sockserve.TCPServer(("127.0.0.1", port), EchoUpper)
    except sockserve.BindError:
        assert port == 65535  # in use on this machine: the range check passed all the same
        return
    with server:
        assert 0 < server.server_address[1] <= 65535


# ----------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "address, problem",
    [
        ("127.0.0.1:8000", ""),
        (None, ""),
        (("127.0.0.1",), ""),
        (("127.0.0.1", 0, 0), ""),
        (("127.0.0.1", "80"), ": the port must be an int"),
        (("127.0.0.1", 1.5), ": the port must be an int"),
        ((8000, 0), ": the host must be a str"),
    ],
    ids=["str", "None", "1-tuple", "3-tuple", "str-port", "float-port", "int-host"],
)
def test_bad_shape_is_an_address_error_and_a_type_error_as_in_the_standard_module(address, problem):
    with pytest.raises(TypeError):
        socketserver.TCPServer(address, EchoUpper)
    with no_leaks():
        with pytest.raises(sockserve.AddressError) as raised:
            sockserve.TCPServer(address, EchoUpper)
    exc = raised.value
    assert isinstance(exc, TypeError)
    assert exc.address == address
    assert exc.family == "inet"
    assert exc.expected == INET_EXPECTED[len("expected "):]
    assert str(exc) == f"bad inet address {address!r}{problem}; {INET_EXPECTED}"


def test_bool_port_is_refused():
    """True would bind port 1; it is refused before any socket exists (not run on stdlib)."""
    with no_leaks():
        with pytest.raises(sockserve.AddressError, match="the port must be an int"):
            sockserve.TCPServer(("127.0.0.1", True), EchoUpper)


@requires_ipv6
def test_inet6_refuses_a_five_tuple():
    address = ("::1", 0, 0, 0, 0)
    with pytest.raises(sockserve.AddressError) as raised:
        sockserve.compose("udp6")(address, EchoUpper)
    assert raised.value.family == "inet6"
    assert str(raised.value) == f"bad inet6 address {address!r}; {INET6_EXPECTED}"
