"""socket_mode: the permission bits of a Unix socket file, set after bind and before listen.

Why before listen is enough for a stream socket: connect() to a bound socket that does not
listen yet is refused (ECONNREFUSED), so no client gets in while the file still has the
mode the umask gave it; the first connection that succeeds comes after listen(), which
comes after the chmod. The tests check both halves: the mode seen inside server_activate
(before listen) and the mode a client racing the constructor sees at its first connect.
"""

from __future__ import annotations

import os
import socket
import stat
import threading

import pytest

import sockserve
from sockserve.core._options import option_fields, parse_command_line_options
from sockserve.transports._unix import UnixSocketMixIn, socket_mode_bits
from support import EchoUpper, exchange, no_leaks, requires_af_unix, serving

pytestmark = requires_af_unix

TRANSPORTS = {"stream": "unix", "dgram": "unix-dgram"}


def wired(transport: str) -> bool:
    """The registered transport declares socket_mode (transports/_pairs.py gives it the mixin)."""
    return "socket_mode" in option_fields(sockserve.registry.transport_class(transport))


def unix_class(kind: str, concurrency: str = "sync", **options: object) -> type:
    """The unix transport class with socket_mode, composed through the public factory."""
    transport = TRANSPORTS[kind]
    mixins = [] if wired(transport) else [UnixSocketMixIn]
    return sockserve.compose(transport, concurrency, mixins=mixins, options=options or None)


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("kind", ["stream", "dgram"])
@pytest.mark.parametrize("given, bits", [(0o660, 0o660), (0o600, 0o600), ("660", 0o660),
                                         ("0o640", 0o640), ("0600", 0o600), (0o777, 0o777)])
def test_the_socket_file_gets_the_mode(kind, given, bits, tmp_path, umask_022):
    path = str(tmp_path / "s.sock")
    server = unix_class(kind, socket_mode=given)(path, EchoUpper)
    try:
        assert mode_of(path) == bits
        with serving(server):
            assert exchange(server, b"hi", tmp_path) == b"HI"
    finally:
        server.server_close()
    assert not os.path.exists(path)


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_without_socket_mode_the_umask_decides(kind, tmp_path):
    path = str(tmp_path / "s.sock")
    old = os.umask(0o027)
    try:
        server = unix_class(kind)(path, EchoUpper)
    finally:
        os.umask(old)
    try:
        assert mode_of(path) == 0o750
    finally:
        server.server_close()


def test_the_mode_is_set_before_listen(tmp_path, umask_022):
    path = str(tmp_path / "s.sock")
    seen = {}

    class Spy(unix_class("stream", socket_mode=0o600)):
        def server_activate(self):
            seen["mode"] = mode_of(path)
            with socket.socket(socket.AF_UNIX) as client:  # not listening: nobody gets in
                with pytest.raises(ConnectionRefusedError):
                    client.connect(path)
            super().server_activate()

    server = Spy(path, EchoUpper)
    server.server_close()
    assert seen["mode"] == 0o600


def test_a_client_racing_the_constructor_first_connects_to_the_final_mode(tmp_path, umask_022):
    cls = unix_class("stream", socket_mode=0o600)
    for attempt in range(20):
        path = str(tmp_path / f"race{attempt}.sock")
        first: list[int] = []
        stop = threading.Event()

        def race(path: str = path, first: list[int] = first, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                with socket.socket(socket.AF_UNIX) as client:
                    try:
                        client.connect(path)
                    except OSError:  # not there yet, or not listening yet
                        continue
                    first.append(mode_of(path))
                    return

        thread = threading.Thread(target=race)
        thread.start()
        server = cls(path, EchoUpper)
        try:
            thread.join(5)
        finally:
            stop.set()
            thread.join(5)
            server.server_close()
        assert first == [0o600], f"attempt {attempt}: the first connect saw {first}"


def test_command_line_text_is_octal(tmp_path):
    base = unix_class("stream")
    for text in ("660", "0o660", "0660"):
        options = parse_command_line_options(base, [f"socket_mode={text}"])
        path = str(tmp_path / f"{text}.sock")
        server = sockserve.with_options(base, options)(path, EchoUpper)
        try:
            assert mode_of(path) == 0o660, text
        finally:
            server.server_close()


@pytest.mark.parametrize("value, message", [
    (660, "an int is taken as it is: write 0o660, not 660"),
    ("999", "must be octal permission bits"),
    ("rw-rw----", "must be octal permission bits"),
    (0o4755, "must be permission bits 0o000-0o777"),
    (-1, "must be permission bits"),
    (True, "must be an int such as 0o660"),
    (6.6, "must be an int such as 0o660"),
])
def test_bad_modes_are_refused_naming_the_option(value, message):
    with pytest.raises(sockserve.OptionError, match="socket_mode") as caught:
        unix_class("stream", socket_mode=value)
    assert message in str(caught.value)


def test_an_abstract_name_has_no_file_to_chmod():
    with no_leaks():
        with pytest.raises(sockserve.OptionError, match="abstract or unnamed Unix socket has no file"):
            unix_class("stream", socket_mode=0o600)("\0sockserve-mode-test", EchoUpper)


def test_socket_mode_bits():
    assert socket_mode_bits("660") == socket_mode_bits("0o660") == socket_mode_bits(0o660) == 0o660


def test_socket_mode_is_a_unix_option_only():
    assert "socket_mode" not in option_fields(sockserve.TCPServer)
    assert "socket_mode" in option_fields(unix_class("dgram", "threading"))


@pytest.mark.skipif(not wired("unix"), reason="needs transports/_pairs.py wiring (mixin=UnixSocketMixIn)")
def test_the_registered_unix_transports_declare_socket_mode(tmp_path):
    for transport in ("unix", "unix-dgram"):
        path = str(tmp_path / f"{transport}.sock")
        server = sockserve.compose(transport, options={"socket_mode": "640"})(path, EchoUpper)
        try:
            assert mode_of(path) == 0o640
        finally:
            server.server_close()
