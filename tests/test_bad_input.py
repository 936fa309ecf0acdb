"""Bad input: wrong address shapes, busy addresses and unknown plugin names give errors that
say what was expected, are caught by what the standard module raises, and leak nothing."""

from __future__ import annotations

import errno
import os
import pickle
import socket
import socketserver

import pytest

import sockserve
from support import BUILTIN_CONCURRENCY, EchoUpper, no_leaks, requires_af_unix, requires_ipv6

INET_EXPECTED = (
    "a (host, port) tuple with a str host and an int port 0-65535, e.g. ('127.0.0.1', 8000)"
)
INET6_EXPECTED = (
    "a (host, port[, flowinfo[, scope_id]]) tuple with a str host and an int port 0-65535, "
    "e.g. ('::1', 8000)"
)
UNIX_EXPECTED = (
    "a filesystem path (str, bytes or os.PathLike) of at most 107 bytes, "
    "or an abstract name starting with '\\0'"
)
TOO_LONG = "/tmp/" + "x" * 200

#: transport, address, family, problem (after the address in the message), error class.
BAD_ADDRESSES = [
    ("tcp", "127.0.0.1:8000", "inet", "", sockserve.AddressError),
    ("tcp", ("127.0.0.1", 0, 0), "inet", "", sockserve.AddressError),
    ("tcp", ("127.0.0.1",), "inet", "", sockserve.AddressError),
    ("tcp", ["127.0.0.1", 0], "inet", "", sockserve.AddressError),
    ("tcp", ("127.0.0.1", "80"), "inet", ": the port must be an int", sockserve.AddressError),
    ("tcp", ("127.0.0.1", 80.0), "inet", ": the port must be an int", sockserve.AddressError),
    ("tcp", (80, 80), "inet", ": the host must be a str", sockserve.AddressError),
    ("tcp", ("127.0.0.1", 70000), "inet", ": port 70000 is out of range", sockserve.PortRangeError),
    ("tcp", ("127.0.0.1", -1), "inet", ": port -1 is out of range", sockserve.PortRangeError),
    ("udp", "127.0.0.1:8000", "inet", "", sockserve.AddressError),
    ("udp", ("127.0.0.1", 0, 0), "inet", "", sockserve.AddressError),
    ("udp", ("127.0.0.1", "53"), "inet", ": the port must be an int", sockserve.AddressError),
    ("udp", ("127.0.0.1", 70000), "inet", ": port 70000 is out of range", sockserve.PortRangeError),
    ("tcp6", ("::1", 0, 0, 0, 0), "inet6", "", sockserve.AddressError),
    ("tcp6", "::1", "inet6", "", sockserve.AddressError),
    ("udp6", ("::1", 65536), "inet6", ": port 65536 is out of range", sockserve.PortRangeError),
    ("unix", 5, "unix", "", sockserve.AddressError),
    ("unix", ("/tmp/x.sock", 0), "unix", "", sockserve.AddressError),
    ("unix", TOO_LONG, "unix", ": it is 205 bytes long", sockserve.AddressError),
    ("unix-dgram", TOO_LONG.encode(), "unix", ": it is 205 bytes long", sockserve.AddressError),
]
EXPECTED = {"inet": INET_EXPECTED, "inet6": INET6_EXPECTED, "unix": UNIX_EXPECTED}


def _id(case):
    return f"{case[0]}-{case[1]!r}"[:60]


@pytest.mark.parametrize("concurrency", ["sync", "threading"])
@pytest.mark.parametrize("transport,address,family,problem,error", BAD_ADDRESSES, ids=map(_id, BAD_ADDRESSES))
def test_bad_address_says_which_shape_was_expected_and_leaks_nothing(
    transport, address, family, problem, error, concurrency
):
    if transport.startswith("unix") and not hasattr(socket, "AF_UNIX"):
        pytest.skip("requires_af_unix: no AF_UNIX")
    cls = sockserve.compose(transport, concurrency)
    with no_leaks():
        with pytest.raises(error) as caught:
            cls(address, EchoUpper)
    exc = caught.value
    assert isinstance(exc, error)
    assert isinstance(exc, sockserve.PortRangeError) == (error is sockserve.PortRangeError)
    assert str(exc) == f"bad {family} address {address!r}{problem}; expected {EXPECTED[family]}"
    assert exc.address == address
    assert exc.family == family
    assert exc.expected == EXPECTED[family]
    assert isinstance(exc, (TypeError, ValueError, sockserve.SockserveError))


def test_port_out_of_range_is_also_an_overflow_error():
    with no_leaks():
        with pytest.raises(OverflowError) as caught:
            sockserve.TCPServer(("127.0.0.1", 70000), EchoUpper)
    assert isinstance(caught.value, sockserve.PortRangeError)
    assert isinstance(caught.value, sockserve.AddressError)
    assert isinstance(caught.value, ValueError)


class _Quiet(socketserver.BaseRequestHandler):
    pass


@pytest.mark.parametrize(
    "name,address",
    [
        ("TCPServer", "127.0.0.1:8000"),
        ("TCPServer", ("127.0.0.1", 0, 0)),
        ("TCPServer", ("127.0.0.1", "80")),
        ("TCPServer", (80, 80)),
        ("TCPServer", ("127.0.0.1", 70000)),
        ("UDPServer", ("127.0.0.1", -1)),
        pytest.param("UnixStreamServer", 5, marks=requires_af_unix),
        pytest.param("UnixStreamServer", TOO_LONG, marks=requires_af_unix),
        pytest.param("UnixDatagramServer", TOO_LONG.encode(), marks=requires_af_unix),
    ],
)
def test_bad_address_is_caught_by_what_the_standard_module_raises(name, address):
    """Side by side: ``except`` clauses written for socketserver still catch our error."""
    with pytest.raises(Exception) as standard:
        getattr(socketserver, name)(address, _Quiet)
    with no_leaks():
        with pytest.raises(type(standard.value)):
            getattr(sockserve, name)(address, _Quiet)


# --------------------------------------------------------------------------- busy addresses


@pytest.mark.parametrize("transport,kind", [("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)])
def test_busy_port_raises_bind_error_naming_the_address_and_closes_the_socket(transport, kind):
    with socket.socket(socket.AF_INET, kind) as busy:
        busy.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            busy.listen()
        address = busy.getsockname()
        with no_leaks():
            with pytest.raises(sockserve.BindError) as caught:
                sockserve.compose(transport, "threading")(address, EchoUpper)
    exc = caught.value
    assert isinstance(exc, OSError)
    assert exc.errno == errno.EADDRINUSE
    assert exc.address == address
    assert str(exc) == (
        f"[Errno {errno.EADDRINUSE}] {os.strerror(errno.EADDRINUSE)}: "
        f"cannot bind inet address {address!r}"
    )
    assert isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.EADDRINUSE


@pytest.mark.parametrize(
    "name,address,expected",
    [
        ("TCPServer", ("no-such-host.invalid", 0), socket.gaierror),
        pytest.param(
            "UnixStreamServer", "/nonexistent-dir/x.sock", FileNotFoundError,
            marks=requires_af_unix,
        ),
    ],
)
def test_bind_error_is_also_the_error_bind_raised_as_in_the_standard_module(
    name, address, expected
):
    """``except socket.gaierror`` / ``except FileNotFoundError`` written for the standard
    module still catch it, and it still names the address; it survives pickling."""
    with pytest.raises(expected) as standard:
        getattr(socketserver, name)(address, _Quiet)
    assert type(standard.value) is expected
    with no_leaks():
        with pytest.raises(expected) as caught:
            getattr(sockserve, name)(address, _Quiet)
    exc = caught.value
    assert isinstance(exc, sockserve.BindError)
    assert exc.errno == standard.value.errno
    assert exc.address == address
    assert f"cannot bind {'unix' if name.startswith('Unix') else 'inet'} address {address!r}" in str(exc)
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc) and (copy.errno, copy.address) == (exc.errno, exc.address)


@requires_ipv6
def test_busy_ipv6_port_raises_bind_error():
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as busy:
        busy.bind(("::1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with no_leaks():
            with pytest.raises(sockserve.BindError) as caught:
                sockserve.compose("tcp6")(("::1", port), EchoUpper)
    assert caught.value.errno == errno.EADDRINUSE
    assert caught.value.address == ("::1", port)
    assert f"cannot bind inet6 address ('::1', {port})" in str(caught.value)


@requires_af_unix
def test_live_unix_socket_raises_bind_error_and_is_left_alone(tmp_path):
    path = str(tmp_path / "live.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(path)
        live.listen()
        with no_leaks():
            with pytest.raises(sockserve.BindError) as caught:
                sockserve.UnixStreamServer(path, EchoUpper)
        assert os.path.exists(path)
    exc = caught.value
    assert exc.errno == errno.EADDRINUSE
    assert exc.address == path
    assert str(exc) == (
        f"[Errno {errno.EADDRINUSE}] cannot bind unix socket {path!r}: "
        "another process is listening on it"
    )


@requires_af_unix
def test_file_in_the_way_of_a_unix_socket_raises_bind_error_and_is_kept(tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_text("precious", encoding="utf-8")
    with no_leaks():
        with pytest.raises(sockserve.BindError) as caught:
            sockserve.UnixStreamServer(str(path), EchoUpper)
    assert caught.value.errno == errno.EADDRINUSE
    assert "a file that is not a socket is in the way" in str(caught.value)
    assert path.read_text(encoding="utf-8") == "precious"


# --------------------------------------------------------------------------- unknown plugins


def test_unknown_transport_in_compose_lists_installed_transports():
    with pytest.raises(sockserve.UnknownPluginError) as caught:
        sockserve.compose("sctp")
    assert str(caught.value) == (
        "no transport plugin named 'sctp'; "
        "installed transport plugins: tcp, tcp6, udp, udp6, unix, unix-dgram"
    )
    assert isinstance(caught.value, LookupError)
    assert (caught.value.kind, caught.value.plugin_name) == ("transport", "sctp")


def test_unknown_concurrency_in_compose_lists_installed_strategies():
    with pytest.raises(sockserve.UnknownPluginError) as caught:
        sockserve.compose("udp", "asyncio")
    assert str(caught.value) == (
        "no concurrency plugin named 'asyncio'; installed concurrency plugins: "
        + ", ".join(BUILTIN_CONCURRENCY)
    )
    assert caught.value.installed == BUILTIN_CONCURRENCY
