"""BaseRequestHandler, StreamRequestHandler and DatagramRequestHandler over real sockets.

Each scenario runs against sockserve and the standard ``socketserver`` (the ``mod``
fixture) where sockserve promises the standard behaviour, so that a difference shows.
"""

from __future__ import annotations

import array
import io
import select
import socket
import struct
import sys
import threading

import pytest

import sockserve
from support import read_to_eof, requires_af_unix, tcp_client
from support import mod  # noqa: F401 - a fixture, named as a test parameter

#: Timeout of every blocking call, so that no test can hang.
TIMEOUT = 5.0


def recording_server(mod, base: str = "TCPServer"):
    """A server class whose handle_error records the exception instead of printing it."""

    class Recording(getattr(mod, base)):
        errors: list

        def handle_error(self, request, client_address):
            self.errors.append(sys.exc_info()[1])

    Recording.errors = []
    return Recording


def handle_in_thread(server) -> threading.Thread:
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    return thread


def joined(thread: threading.Thread) -> bool:
    thread.join(TIMEOUT)
    return not thread.is_alive()


# ------------------------------------------------------------------ BaseRequestHandler


def test_setup_handle_finish_run_in_order_on_one_instance(mod):
    calls = []

    class Ordered(mod.BaseRequestHandler):
        def setup(self):
            calls.append(("setup", id(self)))

        def handle(self):
            calls.append(("handle", id(self)))
            self.request.sendall(b"handled")

        def finish(self):
            calls.append(("finish", id(self)))

    server_class = recording_server(mod)
    with server_class(("127.0.0.1", 0), Ordered) as server, tcp_client(server) as client:
        server.handle_request()
        assert read_to_eof(client) == b"handled"
    assert [name for name, _ in calls] == ["setup", "handle", "finish"]
    assert len({instance for _, instance in calls}) == 1
    assert server.errors == []


def test_every_request_gets_a_new_handler_instance(mod):
    instances = []

    class Counting(mod.BaseRequestHandler):
        def handle(self):
            instances.append(self)

    with mod.TCPServer(("127.0.0.1", 0), Counting) as server:
        for _ in range(2):
            with tcp_client(server):
                server.handle_request()
    assert len(instances) == 2 and instances[0] is not instances[1]


def test_finish_is_not_called_when_setup_raises(mod):
    calls = []

    class BadSetup(mod.BaseRequestHandler):
        def setup(self):
            calls.append("setup")
            raise ValueError("setup failed")

        def handle(self):
            calls.append("handle")

        def finish(self):
            calls.append("finish")

    server_class = recording_server(mod)
    with server_class(("127.0.0.1", 0), BadSetup) as server, tcp_client(server) as client:
        server.handle_request()
        assert client.recv(1) == b""
    assert calls == ["setup"]
    assert [(type(e), str(e)) for e in server.errors] == [(ValueError, "setup failed")]


def test_finish_is_called_when_handle_raises(mod):
    calls = []

    class BadHandle(mod.BaseRequestHandler):
        def setup(self):
            calls.append("setup")

        def handle(self):
            calls.append("handle")
            raise ValueError("handle failed")

        def finish(self):
            calls.append("finish")
            self.request.sendall(b"finished anyway")

    server_class = recording_server(mod)
    with server_class(("127.0.0.1", 0), BadHandle) as server, tcp_client(server) as client:
        server.handle_request()
        assert read_to_eof(client) == b"finished anyway"
    assert calls == ["setup", "handle", "finish"]
    assert [(type(e), str(e)) for e in server.errors] == [(ValueError, "handle failed")]


def test_base_handler_stores_request_client_address_and_server(mod):
    seen = {}

    class Record(mod.BaseRequestHandler):
        def setup(self):
            # Set before setup() runs, so setup can already use them.
            seen["setup"] = (self.request, self.client_address, self.server)

    with mod.TCPServer(("127.0.0.1", 0), Record) as server, tcp_client(server) as client:
        server.handle_request()
        request, client_address, handler_server = seen["setup"]
        assert isinstance(request, socket.socket)
        assert client_address == client.getsockname()
        assert handler_server is server


# ------------------------------------------------------------------ StreamRequestHandler


@pytest.mark.parametrize(
    "base", ["TCPServer", pytest.param("UnixStreamServer", marks=requires_af_unix)]
)
def test_stream_handler_reads_lines_from_rfile_and_writes_wfile(mod, base, tmp_path):
    seen = {}

    class Lines(mod.StreamRequestHandler):
        def handle(self):
            seen["connection is request"] = self.connection is self.request
            seen["rfile"] = (self.rfile.readable(), self.rfile.closed)
            seen["wfile"] = (self.wfile.writable(), self.wfile.closed)
            seen["handler"] = self
            for line in self.rfile:
                self.wfile.write(line.upper())

    address = ("127.0.0.1", 0) if base == "TCPServer" else str(tmp_path / "l.sock")
    with getattr(mod, base)(address, Lines) as server:
        with socket.socket(server.address_family, socket.SOCK_STREAM) as client:
            client.settimeout(TIMEOUT)
            client.connect(server.server_address)
            client.sendall(b"first\nsecond\n")
            client.shutdown(socket.SHUT_WR)
            server.handle_request()
            assert read_to_eof(client) == b"FIRST\nSECOND\n"
    assert seen["connection is request"] is True
    assert seen["rfile"] == (True, False)
    assert seen["wfile"] == (True, False)
    # finish() closed both files.
    assert seen["handler"].rfile.closed and seen["handler"].wfile.closed


def test_stream_handler_defaults_match_the_standard_module(mod):
    cls = mod.StreamRequestHandler
    assert (cls.rbufsize, cls.wbufsize, cls.timeout, cls.disable_nagle_algorithm) == (
        -1,
        0,
        None,
        False,
    )


def test_default_rbufsize_gives_a_buffered_reader_and_a_blocking_connection(mod):
    seen = {}

    class Inspect(mod.StreamRequestHandler):
        def handle(self):
            seen["rfile"] = type(self.rfile)
            seen["timeout"] = self.connection.gettimeout()
            seen["nodelay"] = self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    with mod.TCPServer(("127.0.0.1", 0), Inspect) as server, tcp_client(server):
        server.handle_request()
    assert seen == {"rfile": io.BufferedReader, "timeout": None, "nodelay": 0}


def test_rbufsize_0_reads_unbuffered_so_the_rest_stays_in_the_socket(mod):
    """readline() on an unbuffered rfile takes no byte past the newline."""
    seen = {}

    class Unbuffered(mod.StreamRequestHandler):
        rbufsize = 0

        def handle(self):
            seen["raw"] = isinstance(self.rfile, io.RawIOBase)
            seen["line"] = self.rfile.readline()
            seen["rest"] = self.connection.recv(1024)

    with mod.TCPServer(("127.0.0.1", 0), Unbuffered) as server, tcp_client(server) as client:
        client.sendall(b"line\nrest of it")
        server.handle_request()
    assert seen == {"raw": True, "line": b"line\n", "rest": b"rest of it"}


def test_wbufsize_0_wfile_is_an_unbuffered_buffered_io_base(mod):
    """Every write is sent at once and returns the full byte count."""
    seen = {}
    client_read = threading.Event()

    class Writer(mod.StreamRequestHandler):
        def handle(self):
            w = self.wfile
            seen["is BufferedIOBase"] = isinstance(w, io.BufferedIOBase)
            seen["writable"] = w.writable()
            seen["closed"] = w.closed
            seen["counts"] = [
                w.write(b"abc"),
                w.write(bytearray(b"de")),
                w.write(memoryview(array.array("i", [1, 2]))),  # 2 ints: nbytes, not len
            ]
            seen["writelines"] = w.writelines([b"f", b"gh"])
            seen["flush"] = w.flush()
            # Sent already, without a flush and before the handler returns.
            seen["client read it in time"] = client_read.wait(TIMEOUT)
            seen["handler"] = self

    expected = b"abcde" + array.array("i", [1, 2]).tobytes() + b"fgh"
    with mod.TCPServer(("127.0.0.1", 0), Writer) as server, tcp_client(server) as client:
        thread = handle_in_thread(server)
        received = b""
        while len(received) < len(expected):
            chunk = client.recv(1024)
            assert chunk, "connection closed early"
            received += chunk
        client_read.set()
        assert joined(thread)
        assert received == expected
        assert client.recv(1) == b""
    assert seen["counts"] == [3, 2, 2 * array.array("i").itemsize]
    assert seen["writelines"] is None and seen["flush"] is None
    assert seen["is BufferedIOBase"] and seen["writable"] and not seen["closed"]
    assert seen["client read it in time"]
    assert seen["handler"].wfile.closed


def test_wbufsize_positive_buffers_writes_until_flush(mod):
    seen = {}

    class Buffered(mod.StreamRequestHandler):
        wbufsize = 65536

        def handle(self):
            seen["wfile"] = type(self.wfile)
            self.wfile.write(b"held back")
            self.rfile.readline()  # the client says when it has checked
            self.wfile.flush()
            self.rfile.readline()

    with mod.TCPServer(("127.0.0.1", 0), Buffered) as server, tcp_client(server) as client:
        thread = handle_in_thread(server)
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recv(1024)  # nothing sent yet: it is in the buffer
        client.settimeout(TIMEOUT)
        client.sendall(b"checked\n")
        assert client.recv(1024) == b"held back"
        client.sendall(b"done\n")
        assert joined(thread)
    assert seen["wfile"] is io.BufferedWriter


def test_wbufsize_positive_is_flushed_by_finish(mod):
    class Buffered(mod.StreamRequestHandler):
        wbufsize = 65536

        def handle(self):
            self.wfile.write(b"flushed by finish")

    with mod.TCPServer(("127.0.0.1", 0), Buffered) as server, tcp_client(server) as client:
        server.handle_request()
        assert read_to_eof(client) == b"flushed by finish"


def test_timeout_is_applied_to_the_connection(mod):
    """A silent client makes the handler's read raise socket.timeout."""
    seen = {}

    class Impatient(mod.StreamRequestHandler):
        timeout = 0.2

        def handle(self):
            seen["timeout"] = self.connection.gettimeout()
            try:
                self.rfile.readline()
            except socket.timeout as exc:
                seen["raised"] = type(exc)
            self.wfile.write(b"gave up")

    server_class = recording_server(mod)
    with server_class(("127.0.0.1", 0), Impatient) as server, tcp_client(server) as client:
        server.handle_request()
        assert read_to_eof(client) == b"gave up"
    assert seen == {"timeout": 0.2, "raised": socket.timeout}
    assert server.errors == []


def test_timeout_raised_out_of_handle_goes_to_handle_error(mod):
    class Impatient(mod.StreamRequestHandler):
        timeout = 0.1

        def handle(self):
            self.rfile.readline()

    server_class = recording_server(mod)
    with server_class(("127.0.0.1", 0), Impatient) as server, tcp_client(server) as client:
        server.handle_request()
        assert client.recv(1) == b""
    assert [type(e) for e in server.errors] == [socket.timeout]


def test_disable_nagle_algorithm_sets_tcp_nodelay(mod):
    seen = []

    class NoDelay(mod.StreamRequestHandler):
        disable_nagle_algorithm = True

        def handle(self):
            seen.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    with mod.TCPServer(("127.0.0.1", 0), NoDelay) as server, tcp_client(server):
        server.handle_request()
    assert len(seen) == 1 and seen[0] != 0


def reset_connection(client: socket.socket) -> None:
    """Close *client* with a TCP reset (SO_LINGER 0), as a crashed peer would."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def peer_gone_handler(mod, wbufsize: int, finished: list):
    class PeerGone(mod.StreamRequestHandler):
        def handle(self):
            # Wait for the reset to arrive: it makes the connection readable.
            select.select([self.connection], [], [], TIMEOUT)
            if self.wbufsize:
                self.wfile.write(b"x" * 1000)  # only buffered: finish() sends it

        def finish(self):
            super().finish()
            finished.append((self.wfile.closed, self.rfile.closed))

    PeerGone.wbufsize = wbufsize
    return PeerGone


def test_finish_tolerates_a_client_that_went_away(mod):
    finished = []
    server_class = recording_server(mod)
    handler = peer_gone_handler(mod, 0, finished)
    with server_class(("127.0.0.1", 0), handler) as server:
        reset_connection(tcp_client(server))
        server.handle_request()
    assert server.errors == []
    assert finished == [(True, True)]


def test_finish_tolerates_a_client_that_went_away_with_data_still_buffered():
    """The final flush fails; finish() swallows that and still closes both files.

    (The standard module's finish() re-raises the error from ``wfile.close()``.)
    """
    finished = []
    server_class = recording_server(sockserve)
    handler = peer_gone_handler(sockserve, 65536, finished)
    with server_class(("127.0.0.1", 0), handler) as server:
        reset_connection(tcp_client(server))
        server.handle_request()
    assert server.errors == []
    assert finished == [(True, True)]


# ------------------------------------------------------------------ DatagramRequestHandler


def datagram_setup(mod, kind: str, tmp_path):
    """(server class, server address, client factory) for *kind*."""
    if kind == "udp":

        def client_factory():
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.settimeout(TIMEOUT)
            client.bind(("127.0.0.1", 0))
            return client

        return mod.UDPServer, ("127.0.0.1", 0), client_factory
    counter = iter(range(100))

    def unix_client_factory():
        client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        client.settimeout(TIMEOUT)
        client.bind(str(tmp_path / f"c{next(counter)}.sock"))  # to get a reply
        return client

    return mod.UnixDatagramServer, str(tmp_path / "d.sock"), unix_client_factory


DATAGRAM_KINDS = ["udp", pytest.param("unix-dgram", marks=requires_af_unix)]


@pytest.mark.parametrize("kind", DATAGRAM_KINDS)
def test_datagram_handler_reads_the_packet_and_replies_on_finish(mod, kind, tmp_path):
    seen = {}
    go = threading.Event()

    class Upper(mod.DatagramRequestHandler):
        def handle(self):
            data, sock = self.request
            seen["request"] = (data, sock is self.server.socket)
            seen["client_address"] = self.client_address
            seen["rfile"] = self.rfile.read()
            self.wfile.write(seen["rfile"].upper())
            self.wfile.write(b"!")
            go.wait(TIMEOUT)  # the reply must not leave before finish()

    server_cls, address, make_client = datagram_setup(mod, kind, tmp_path)
    with server_cls(address, Upper) as server, make_client() as client:
        server.timeout = TIMEOUT
        thread = handle_in_thread(server)
        client.sendto(b"packet", server.server_address)
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recvfrom(1024)
        client.settimeout(TIMEOUT)
        go.set()
        reply, sender = client.recvfrom(1024)
        assert joined(thread)
        assert reply == b"PACKET!"
        assert sender == server.server_address
        assert seen == {
            "request": (b"packet", True),
            "client_address": client.getsockname(),
            "rfile": b"packet",
        }


@pytest.mark.parametrize("kind", DATAGRAM_KINDS)
def test_datagram_handler_that_writes_nothing_sends_an_empty_reply(mod, kind, tmp_path):
    class Silent(mod.DatagramRequestHandler):
        def handle(self):
            pass

    server_cls, address, make_client = datagram_setup(mod, kind, tmp_path)
    with server_cls(address, Silent) as server, make_client() as client:
        server.timeout = TIMEOUT
        client.sendto(b"anyone?", server.server_address)
        server.handle_request()
        assert client.recvfrom(1024) == (b"", server.server_address)


def test_datagram_handler_answers_each_client_at_its_own_address(mod, tmp_path):
    class Echo(mod.DatagramRequestHandler):
        def handle(self):
            self.wfile.write(self.rfile.read() + b" back")

    server_cls, address, make_client = datagram_setup(mod, "udp", tmp_path)
    with server_cls(address, Echo) as server, make_client() as one, make_client() as two:
        server.timeout = TIMEOUT
        one.sendto(b"one", server.server_address)
        server.handle_request()
        two.sendto(b"two", server.server_address)
        server.handle_request()
        assert one.recv(1024) == b"one back"
        assert two.recv(1024) == b"two back"
