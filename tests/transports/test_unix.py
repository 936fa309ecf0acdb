"""The unix address family: socket files, stale and live sockets, abstract names, limits.

Where the standard ``socketserver`` behaves differently the same scenario runs against it
side by side (it is imported only as the reference to compare against).
"""

from __future__ import annotations

import errno
import os
import socket
import socketserver
import uuid

import pytest

import sockserve
from support import (
    EchoUpper,
    exchange,
    no_leaks,
    requires_af_unix,
    serving,
    skip_unless_supported,
)

pytestmark = requires_af_unix

#: The Unix server classes of both modules, by socket type.
CLASS_NAMES = {"stream": "UnixStreamServer", "dgram": "UnixDatagramServer"}
SOCKET_TYPES = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM}
#: sizeof(sun_path) on Linux less the terminating NUL.
MAX_PATH_BYTES = 107


def stale_socket_file(path: str, kind: str) -> None:
    """Leave a socket file at *path* that nobody listens on (a crashed server's)."""
    sock = socket.socket(socket.AF_UNIX, SOCKET_TYPES[kind])
    sock.bind(path)
    sock.close()
    assert os.path.exists(path)


def abstract_name(kind: str) -> str:
    return f"\0sockserve-test-{kind}-{uuid.uuid4().hex}"


# ----------------------------------------------------------------- the socket file


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_server_close_removes_the_socket_file_where_the_standard_module_leaves_it(kind, tmp_path):
    name = CLASS_NAMES[kind]
    theirs, ours = str(tmp_path / "standard.sock"), str(tmp_path / "ours.sock")
    getattr(socketserver, name)(theirs, EchoUpper).server_close()
    assert os.path.exists(theirs)  # the standard module leaves it behind
    server = getattr(sockserve, name)(ours, EchoUpper)
    assert os.path.exists(ours)
    server.server_close()
    assert not os.path.exists(ours)


@pytest.mark.parametrize("concurrency", ["sync", "threading", "forking"])
@pytest.mark.parametrize("transport", ["unix", "unix-dgram"])
def test_socket_file_stays_while_serving_and_goes_on_close(transport, concurrency, tmp_path):
    """Forked workers end without touching the file; only the server that bound it removes it."""
    skip_unless_supported(transport, concurrency)
    path = str(tmp_path / "server.sock")
    with no_leaks():
        with serving(sockserve.compose(transport, concurrency)(path, EchoUpper)) as server:
            for i in range(3):
                assert exchange(server, b"req %d" % i, tmp_path) == b"REQ %d" % i
            assert os.path.exists(path)
        assert not os.path.exists(path)


def test_a_file_that_replaced_the_socket_file_is_not_removed(tmp_path):
    path = tmp_path / "server.sock"
    server = sockserve.UnixStreamServer(str(path), EchoUpper)
    path.unlink()
    path.write_text("someone else's")
    server.server_close()
    assert path.read_text() == "someone else's"


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_another_servers_socket_file_at_the_same_path_is_not_removed(kind, tmp_path):
    """The first server's file was deleted and a second server bound the path anew."""
    path = str(tmp_path / "server.sock")
    cls = getattr(sockserve, CLASS_NAMES[kind])
    first = cls(path, EchoUpper)
    os.unlink(path)
    with serving(cls(path, EchoUpper)) as second:
        first.server_close()
        assert os.path.exists(path)
        assert exchange(second, b"still mine", tmp_path) == b"STILL MINE"
    assert not os.path.exists(path)


# ----------------------------------------------------------------- what is in the way


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_binding_over_a_stale_socket_file_works_where_the_standard_module_fails(kind, tmp_path):
    name = CLASS_NAMES[kind]
    theirs, ours = str(tmp_path / "standard.sock"), str(tmp_path / "ours.sock")
    stale_socket_file(theirs, kind)
    with pytest.raises(OSError) as raised:
        getattr(socketserver, name)(theirs, EchoUpper)
    assert raised.value.errno == errno.EADDRINUSE
    stale_socket_file(ours, kind)
    with no_leaks():
        with serving(getattr(sockserve, name)(ours, EchoUpper)) as server:
            assert exchange(server, b"fresh", tmp_path) == b"FRESH"


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_binding_over_a_live_socket_fails_and_leaves_the_live_server_alone(kind, tmp_path):
    path = str(tmp_path / "server.sock")
    cls = getattr(sockserve, CLASS_NAMES[kind])
    with serving(cls(path, EchoUpper)) as live:
        # Once it has answered, the live server's loop holds all it will hold.
        assert exchange(live, b"first", tmp_path) == b"FIRST"
        with no_leaks():
            with pytest.raises(sockserve.BindError) as raised:
                cls(path, EchoUpper)
        exc = raised.value
        assert isinstance(exc, OSError)
        assert exc.errno == errno.EADDRINUSE
        assert exc.address == path
        assert str(exc) == (
            f"[Errno {errno.EADDRINUSE}] cannot bind unix socket {path!r}: "
            "another process is listening on it"
        )
        # The failed server closed without removing the live server's file.
        assert os.path.exists(path)
        assert exchange(live, b"undisturbed", tmp_path) == b"UNDISTURBED"


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_a_regular_file_in_the_way_is_a_bind_error_and_is_left_alone(kind, tmp_path):
    path = tmp_path / "server.sock"
    path.write_text("precious")
    with no_leaks():
        with pytest.raises(sockserve.BindError) as raised:
            getattr(sockserve, CLASS_NAMES[kind])(str(path), EchoUpper)
    exc = raised.value
    assert exc.errno == errno.EADDRINUSE
    assert exc.address == str(path)
    assert str(exc) == (
        f"[Errno {errno.EADDRINUSE}] cannot bind unix socket {str(path)!r}: "
        "a file that is not a socket is in the way"
    )
    assert path.read_text() == "precious"


# ----------------------------------------------------------------- abstract names


@pytest.mark.skipif(not os.path.exists("/proc/net/unix"), reason="abstract names are Linux-only")
@pytest.mark.parametrize("as_bytes", [False, True], ids=["str", "bytes"])
@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_abstract_name_serves_and_keeps_the_type_it_was_given(kind, as_bytes, tmp_path):
    name = abstract_name(kind)
    address = name.encode() if as_bytes else name
    with no_leaks():
        server = getattr(sockserve, CLASS_NAMES[kind])(address, EchoUpper)
        with serving(server):
            assert server.server_address == address
            assert type(server.server_address) is type(address)
            assert exchange(server, b"abstract", tmp_path) == b"ABSTRACT"
    # Nothing in the filesystem: only the datagram client's own socket files.
    assert [p for p in os.listdir(tmp_path) if not p.startswith("client-")] == []


@pytest.mark.skipif(not os.path.exists("/proc/net/unix"), reason="abstract names are Linux-only")
def test_standard_module_turns_a_str_abstract_name_into_bytes():
    """The reference behaviour: server_address changes type after binding."""
    name = abstract_name("stream")
    with socketserver.UnixStreamServer(name, EchoUpper) as standard:
        assert standard.server_address == name.encode()
    with sockserve.UnixStreamServer(name, EchoUpper) as ours:
        assert ours.server_address == name


# ----------------------------------------------------------------- address shapes


def test_longest_path_binds_and_one_byte_more_is_an_address_error(tmp_path):
    base = str(tmp_path) + "/"
    longest = base + "s" * (MAX_PATH_BYTES - len(base.encode()))
    assert len(longest.encode()) == MAX_PATH_BYTES
    with sockserve.UnixStreamServer(longest, EchoUpper) as server:
        assert server.server_address == longest
    too_long = longest + "s"
    with no_leaks():
        with pytest.raises(sockserve.PathTooLongError) as raised:
            sockserve.UnixStreamServer(too_long, EchoUpper)
    exc = raised.value
    assert isinstance(exc, sockserve.AddressError)
    assert isinstance(exc, OSError)  # what the standard module raises
    assert isinstance(exc, TypeError) and isinstance(exc, ValueError)
    assert exc.address == too_long
    assert exc.family == "unix"
    assert str(exc) == (
        f"bad unix address {too_long!r}: it is {MAX_PATH_BYTES + 1} bytes long; expected a "
        f"filesystem path (str, bytes or os.PathLike) of at most {MAX_PATH_BYTES} bytes, "
        "or an abstract name starting with '\\0'"
    )
    assert not os.path.exists(too_long)


def test_too_long_path_says_what_is_accepted_where_the_standard_module_says_only_too_long(tmp_path):
    """Both raise OSError; only sockserve's says how long it was and what fits."""
    path = str(tmp_path / ("x" * 200))
    with pytest.raises(OSError, match="^AF_UNIX path too long$"):
        socketserver.UnixStreamServer(path, EchoUpper)
    with pytest.raises(OSError, match=r"it is \d+ bytes long; expected a filesystem path .* of at most 107 bytes"):
        sockserve.UnixStreamServer(path, EchoUpper)


def test_path_like_address_is_accepted(tmp_path):
    path = tmp_path / "pathlike.sock"
    with serving(sockserve.UnixStreamServer(path, EchoUpper)) as server:
        assert server.server_address == str(path)
        assert exchange(server, b"path", tmp_path) == b"PATH"
    assert not path.exists()


@pytest.mark.parametrize("address", [123, ("/tmp/x", 0), None], ids=["int", "tuple", "None"])
def test_address_of_the_wrong_type_is_an_address_error_and_a_type_error(address):
    with no_leaks():
        with pytest.raises(sockserve.AddressError) as raised:
            sockserve.UnixStreamServer(address, EchoUpper)
    exc = raised.value
    assert isinstance(exc, TypeError)
    assert exc.address == address
    assert exc.family == "unix"
    assert str(exc).startswith(f"bad unix address {address!r}; expected a filesystem path")
