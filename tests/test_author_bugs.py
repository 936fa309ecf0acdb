"""The bugs a plugin author found (issue 8, item 10), and the tests the review of the suite
asked for (item 12): one test per bug, over real sockets and real processes.

What belongs here: one scenario per reported bug, named after the behaviour that holds
now; scripts that run in other processes live in ``tests/scripts/``. Bullets already
covered elsewhere are not repeated here (a forked child's ``shutdown()`` leaving the
parent in ``accept()``: ``tests/concurrency/test_forking.py::
test_shutdown_called_in_a_child_stops_neither_the_child_nor_the_parent``).
Every blocking call is bounded; only processes a test started are ever signalled.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sockserve
from sockserve.concurrency import TERMINATE_GRACE
from support import (
    EchoUpper,
    PreforkScript,
    bounded,
    child_pids,
    clean_env,
    exchange,
    is_running,
    make_distribution,
    no_leaks,
    read_banner,
    read_line,
    read_to_eof,
    requires_fork,
    serving,
    sockserve_process,
    start_serving,
    tcp_client,
    wait_until,
)

LOOPBACK = ("127.0.0.1", 0)
#: The scripts and handler modules other processes run.
SCRIPTS = Path(__file__).parent / "scripts"
#: Seconds a process gets to start serving, or to finish: generous for a loaded CI box.
START_TIMEOUT = 30
FINISH_TIMEOUT = 30
#: "Promptly": far above scheduling noise, far below the waits the bugs caused.
PROMPT = 1.0
SERVING = re.compile(r"sockserve: (\S+) serving on (\S+) with ")


class Holding(sockserve.BaseRequestHandler):
    """``hold``: reply ``start PID``, then wait for the client's EOF (at most
    ``limit`` seconds), then reply ``released``. Anything else: upper-cased, at once."""

    limit = 10.0

    def handle(self) -> None:
        self.request.settimeout(self.limit)
        line = read_line(self.request).strip()
        if line != b"hold":
            self.request.sendall(line.upper())
            return
        self.request.sendall(b"start %d\n" % os.getpid())
        while self.request.recv(1024):
            pass
        self.request.sendall(b"released")


def hold(address: Any) -> tuple[socket.socket, int]:
    """Start a held request; return its client and the pid of the process serving it."""
    client = socket.create_connection(address, timeout=10)
    client.sendall(b"hold\n")
    word, pid = read_line(client).split()
    assert word == b"start"
    return client, int(pid)


def release(client: socket.socket) -> bytes:
    """End a held request from the client's side; return the rest of its reply."""
    with client:
        client.shutdown(socket.SHUT_WR)
        return read_to_eof(client)


class Outcomes:
    """A lifecycle plugin: how each admitted request ended, by client address."""

    def __init__(self) -> None:
        self.admitted: list[Any] = []
        self.finished: list[Any] = []
        self.denied: list[tuple[Any, str]] = []

    @sockserve.hookimpl
    def sockserve_verify_request(self, client_address: Any) -> None:
        self.admitted.append(client_address)  # None: the server's verify_request decides

    @sockserve.hookimpl
    def sockserve_request_finish(self, client_address: Any, exc: BaseException | None) -> None:
        self.finished.append(client_address)

    @sockserve.hookimpl
    def sockserve_request_denied(self, client_address: Any, reason: str) -> None:
        self.denied.append((client_address, reason))

    def assert_each_ended_once(self) -> None:
        """Every admitted request ended in exactly one of request_finish or request_denied."""
        assert self.admitted, "no request was admitted"
        endings = collections.Counter(self.finished + [a for a, _ in self.denied])
        assert endings == collections.Counter(self.admitted), (
            f"admitted {self.admitted}, finished {self.finished}, denied {self.denied}"
        )


# =========================================================================== the serve loop


@pytest.mark.parametrize("layered", [False, True], ids=["plain", "layered"])
def test_the_sync_path_runs_every_request_through_run_request_with_no_hook_implemented(layered):
    """Documented for every strategy: sync too, also when no plugin implements a hook
    (seen by a subclass overriding run_request, and by a layer's prepare_request)."""
    manager = sockserve.get_plugin_manager()
    for hook in ("sockserve_request_start", "sockserve_request_finish",
                 "sockserve_request_prepared", "sockserve_request_denied"):
        assert not getattr(manager.hook, hook).get_hookimpls(), f"a plugin implements {hook}"
    ran: list[Any] = []
    prepared: list[Any] = []

    class RecordingLayer:
        def prepare_request(self, request: Any, client_address: Any) -> tuple[Any, Any]:
            prepared.append(client_address)
            return super().prepare_request(request, client_address)  # type: ignore[misc]

    base = sockserve.compose("tcp", "sync", layers=[RecordingLayer] if layered else [])

    class Server(base):  # type: ignore[misc, valid-type]
        def run_request(self, request: Any, client_address: Any) -> bool:
            ran.append(client_address)
            return super().run_request(request, client_address)

    with no_leaks():
        with serving(Server(LOOPBACK, EchoUpper)) as server:
            assert exchange(server, b"one") == b"ONE"
            assert exchange(server, b"two") == b"TWO"
        with Server(LOOPBACK, EchoUpper) as server:
            with tcp_client(server) as client:
                client.sendall(b"three")
                client.shutdown(socket.SHUT_WR)
                server.handle_request()
                assert read_to_eof(client) == b"THREE"
    assert len(ran) == 3
    assert prepared == (ran if layered else [])


def test_a_wake_up_alone_does_not_make_the_loop_accept():
    """The loop reads its wake-up socket and accepts only when the listening socket is
    readable: after a wake-up with no client it goes on turning (it is not blocked in
    accept()), and shutdown() returns at once."""
    turns: list[float] = []

    class Server(sockserve.TCPServer):
        def service_actions(self) -> None:
            turns.append(time.monotonic())

    with no_leaks():
        server = Server(LOOPBACK, EchoUpper)
        thread = start_serving(server, poll_interval=0.02)
        try:
            assert wait_until(lambda: len(turns) > 2)
            server.pause_accepting()
            seen = len(turns)
            assert wait_until(lambda: len(turns) > seen + 2)  # it polls without the socket
            server.resume_accepting()  # another thread: wakes the loop; no client comes
            seen = len(turns)
            assert wait_until(lambda: len(turns) > seen + 5, timeout=3), (
                "the loop stopped turning after a wake-up (blocked in accept()?)"
            )
            assert bounded(server.shutdown, timeout=10) < PROMPT
            thread.join(10)
        finally:
            if thread.is_alive():  # free a loop stuck in accept(), then stop it
                with contextlib.suppress(OSError):
                    socket.create_connection(server.server_address, timeout=5).close()
                server.shutdown()
                thread.join(10)
            server.server_close()
    assert not thread.is_alive()


# =========================================================================== forking


@requires_fork
def test_forking_at_max_children_keeps_the_loop_turning_and_shutdown_returns_at_once():
    """At the limit the server pauses accepting; it does not wait in waitpid() for a
    child to exit (shutdown() waited for the child: 3.8 s in the report)."""
    turns: list[float] = []

    class Limited(sockserve.ForkingTCPServer):
        max_children = 1

        def service_actions(self) -> None:
            turns.append(time.monotonic())
            super().service_actions()

    with no_leaks():
        server = Limited(LOOPBACK, Holding)
        thread = start_serving(server, poll_interval=0.02)
        client = None
        try:
            client, child = hold(server.server_address)
            assert server.active_children == {child}
            seen = len(turns)
            assert wait_until(lambda: len(turns) > seen + 5, timeout=3), (
                "the serve loop stopped turning at max_children"
            )
            assert bounded(server.shutdown, timeout=10) < PROMPT
            thread.join(10)
            assert not thread.is_alive()
            assert release(client) == b"released"
            client = None
        finally:
            if client is not None:
                release(client)
            server.shutdown()
            thread.join(10)
            server.server_close()  # block_on_close: reaps the child


def foreign_exit_code() -> int:
    """Run a process of our own, as an application would, and return its exit code.

    It is left unreaped for a while (many serve-loop turns), so that a server reaping
    any child would take it first; Popen.wait() then reports 0.
    """
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    try:
        assert wait_until(lambda: not is_running(proc.pid), timeout=20)
        time.sleep(0.3)
        return proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@requires_fork
def test_forking_reaps_only_its_own_children():
    """Popen.wait() of a process the application started returns its own exit code (7),
    while the forking server is at max_children and after its child exited."""

    class Limited(sockserve.ForkingTCPServer):
        max_children = 1

    with no_leaks():
        with serving(Limited(LOOPBACK, Holding), poll_interval=0.02) as server:
            client, child = hold(server.server_address)
            try:
                assert foreign_exit_code() == 7  # at the limit
            finally:
                assert release(client) == b"released"
            assert wait_until(lambda: not server.active_children)  # its own: reaped
            assert child not in child_pids()
            assert foreign_exit_code() == 7  # below the limit, reaping as it turns


@requires_fork
def test_forked_children_do_not_keep_the_listening_socket():
    """After server_close(), with a child still in its handler, new clients are refused
    (not left hanging in a backlog nobody accepts from) and the port can be bound again."""

    class Server(sockserve.ForkingTCPServer):
        block_on_close = False  # server_close returns while the child runs
        # As a restarting server sets it: the child's connection (which inherits the
        # option) does not block the bind, only a socket still listening does.
        allow_reuse_address = True

    server = Server(LOOPBACK, Holding)
    address = server.server_address
    thread = start_serving(server, poll_interval=0.02)
    client, child = hold(address)
    try:
        server.shutdown()
        thread.join(10)
        assert not thread.is_alive()
        server.server_close()
        assert is_running(child)
        try:
            late = socket.create_connection(address, timeout=2)
        except ConnectionRefusedError:
            pass
        else:
            late.close()
            pytest.fail(f"a client connected to {address} after server_close(): the child holds the socket")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as again:
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(address)  # EADDRINUSE while a child listens on it
            again.listen()
        assert is_running(child)  # all of that while the child still ran its handler
    finally:
        assert release(client) == b"released"
        assert wait_until(lambda: os.waitpid(child, os.WNOHANG)[0] == child, timeout=10)


# =========================================================================== request endings


def test_requests_queued_in_the_threadpool_at_close_end_denied():
    """A request admitted and dropped unrun at close fires sockserve_request_denied
    (reason ``closing``); each admitted request ends in exactly one of finish or denied."""
    outcomes = Outcomes()
    cls = sockserve.compose(
        "tcp", "threadpool", plugins=[outcomes],
        options={"threads": 1, "backlog": 4, "block_on_close": False},
    )
    with no_leaks():
        server = cls(LOOPBACK, Holding)
        thread = start_serving(server, poll_interval=0.02)
        held, _ = hold(server.server_address)
        queued = []
        try:
            for _ in range(2):
                client = socket.create_connection(server.server_address, timeout=10)
                client.sendall(b"hold\n")
                queued.append(client)
            assert wait_until(lambda: len(outcomes.admitted) == 3)
            server.shutdown()  # the loop ends after handing the last one to the pool
            thread.join(10)
            server.server_close()  # without block_on_close: queued requests are dropped
            for client in queued:
                # Shut down unread: EOF, or a reset for the unread "hold" line.
                with contextlib.suppress(ConnectionResetError):
                    assert read_to_eof(client) == b"", "a queued request ran after close"
            assert sorted(outcomes.denied) == sorted(
                (c.getsockname(), "closing") for c in queued
            )
            assert server.requests_denied == collections.Counter({"closing": 2})
            assert outcomes.finished == []  # the running one is still running
        finally:
            for client in queued:
                client.close()
            assert release(held) == b"released"
            server.shutdown()
            thread.join(10)
            server.server_close()
        assert wait_until(lambda: len(outcomes.finished) == 1)
    outcomes.assert_each_ended_once()


def ask_closing_early(server: Any, payload: bytes) -> tuple[Any, bytes | None]:
    """Send *payload* and read the reply to EOF: (client address, reply), the reply None
    when the server closed the connection before it read the payload (a reset)."""
    with tcp_client(server) as client:
        address = client.getsockname()
        try:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            return address, read_to_eof(client)
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE):
                raise
            return address, None


@pytest.mark.parametrize("concurrency", ["sync", "threading", "threadpool"])
def test_a_request_whose_process_request_raises_ends_denied(concurrency):
    """process_request raising before the request runs: handle_error reports it,
    sockserve_request_denied fires (reason ``process_request``), the handler never runs."""
    outcomes = Outcomes()
    errors: list[tuple[Any, BaseException | None]] = []
    handled: list[bytes] = []

    class Upper(sockserve.BaseRequestHandler):
        def handle(self) -> None:
            data = read_to_eof(self.request)
            handled.append(data)
            self.request.sendall(data.upper())

    class Server(sockserve.compose("tcp", concurrency, plugins=[outcomes])):  # type: ignore[misc]
        calls = 0

        def process_request(self, request: Any, client_address: Any) -> None:
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("no worker for this one")
            super().process_request(request, client_address)

        def handle_error(self, request: Any, client_address: Any) -> None:
            errors.append((client_address, sys.exc_info()[1]))

    addresses = {}
    with no_leaks():
        with serving(Server(LOOPBACK, Upper)) as server:
            for payload in (b"first", b"second", b"third"):
                address, reply = ask_closing_early(server, payload)
                addresses[payload] = address
                if payload == b"second":
                    assert reply in (b"", None)  # shut down unrun
                else:
                    assert reply == payload.upper()
            assert wait_until(lambda: len(outcomes.finished) == 2)
    second = addresses[b"second"]
    assert outcomes.denied == [(second, "process_request")]
    assert sorted(outcomes.finished) == sorted([addresses[b"first"], addresses[b"third"]])
    assert sorted(handled) == [b"first", b"third"]
    assert [(a, type(e), str(e)) for a, e in errors] == [(second, RuntimeError, "no worker for this one")]
    assert server.requests_denied == collections.Counter({"process_request": 1})
    outcomes.assert_each_ended_once()


def test_requests_cut_off_counts_only_connections_really_shut_down(caplog):
    """At the drain deadline two requests are in flight: one blocked on its connection
    (cut off: counted), one whose handler closed its socket itself (shutdown() fails on
    it: not counted)."""

    class Handler(sockserve.BaseRequestHandler):
        def handle(self) -> None:
            self.request.settimeout(10)
            kind = self.request.recv(16)
            self.request.sendall(b"started")
            if kind == b"closes":
                self.request.close()
                time.sleep(0.8)  # past the deadline, inside the cut-off grace
            else:
                self.request.recv(16)  # until the cut-off ends it

    cls = sockserve.compose("tcp", "threading", options={"drain_timeout": 0.3})
    with no_leaks():
        with serving(cls(LOOPBACK, Handler)) as server:
            clients = []
            for kind in (b"closes", b"blocks"):
                client = tcp_client(server)
                clients.append(client)
                client.sendall(kind)
                assert client.recv(16) == b"started"
        # serving() closed the server: the drain cut off what was left at 0.3 s.
        for client in clients:
            assert read_to_eof(client) == b""
            client.close()
    assert server.requests_cut_off == 1


# =========================================================================== TLS listening socket


def self_signed_certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 and its key, made with the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("requires_openssl: no openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def test_an_ssl_listening_socket_still_serves_and_warns_once_pointing_at_the_tls_layer(tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))

    class UpperLine(sockserve.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.readline().upper())

    class TLSListening(sockserve.TCPServer):  # a class of its own: nothing warned for it yet
        pass

    replies = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with no_leaks():
            server = TLSListening(LOOPBACK, UpperLine)
            server.socket = server_context.wrap_socket(server.socket, server_side=True)
            with serving(server):
                for i in range(3):
                    raw = socket.create_connection(server.server_address, timeout=10)
                    with client_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                        tls.sendall(b"secret %d\n" % i)
                        replies.append(read_line(tls))
    assert replies == [b"SECRET %d\n" % i for i in range(3)]
    mine = [w for w in caught if "SSLSocket" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    assert issubclass(mine[0].category, DeprecationWarning)
    assert "'tls' layer" in str(mine[0].message)


# =========================================================================== composed classes


class TagLayer:
    """A layer for composing: tags the client address."""

    def prepare_request(self, request: Any, client_address: Any) -> tuple[Any, Any]:
        request, client_address = super().prepare_request(request, client_address)  # type: ignore[misc]
        return request, ("tagged", client_address[1])


#: Compositions anyone can spell again in a new process: (transport, concurrency, mixins).
REBUILDABLE = [
    ("tcp", "prefork", ()),
    ("tcp", "prefork", ("threadpool",)),
    ("udp", "threadpool", ()),
    ("unix", "prefork", ()),
    ("tcp", "forking", ()),
]


def composed(transport: str, concurrency: str, mixins: tuple[str, ...]) -> type:
    loaded = [sockserve.registry.load("concurrency", name) for name in mixins]
    return sockserve.compose(transport, concurrency, mixins=loaded)


@pytest.mark.parametrize("transport, concurrency, mixins", REBUILDABLE)
def test_composed_classes_resolve_in_sockserve_and_pickle_here_and_in_a_new_process(
    transport, concurrency, mixins
):
    cls = composed(transport, concurrency, mixins)
    assert cls.__module__ == "sockserve"
    assert getattr(sockserve, cls.__qualname__) is cls
    assert pickle.loads(pickle.dumps(cls)) is cls
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "load_pickled_class.py"), pickle.dumps(cls).hex()],
        capture_output=True, text=True, timeout=FINISH_TIMEOUT, env=clean_env(), check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "module": "sockserve",
        "qualname": cls.__qualname__,
        "mro": [f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__],
        "resolves": True,
    }


def test_builtin_mixins_and_a_composition_with_a_layer_resolve_and_pickle():
    for name in sockserve.registry.names("concurrency"):
        mixin = sockserve.registry.load("concurrency", name)
        if mixin.__module__ != "sockserve":
            continue  # a third party's mixin has a home of its own
        assert getattr(sockserve, mixin.__qualname__) is mixin, name
        assert pickle.loads(pickle.dumps(mixin)) is mixin, name
    assert sockserve.PreforkMixIn is sockserve.registry.load("concurrency", "prefork")
    cls = sockserve.compose("tcp", "threading", layers=[TagLayer])
    assert getattr(sockserve, cls.__qualname__) is cls
    assert pickle.loads(pickle.dumps(cls)) is cls


def test_a_composition_with_plugins_is_named_apart_from_the_plain_one():
    plain = sockserve.compose("tcp", "threading")
    first = sockserve.compose("tcp", "threading", plugins=[Outcomes()])
    second = sockserve.compose("tcp", "threading", plugins=[Outcomes()])
    names = [plain.__qualname__, first.__qualname__, second.__qualname__]
    assert len(set(names)) == 3, names
    assert first.__name__ != plain.__name__
    for cls in (plain, first, second):
        assert cls.__module__ == "sockserve"
        assert getattr(sockserve, cls.__qualname__) is cls
        assert pickle.loads(pickle.dumps(cls)) is cls


def test_a_custom_registry_binds_its_classes_to_its_own_family(tmp_path):
    calls: list[str] = []

    class Recorded(sockserve.AddressFamily):
        name = "recorded-inet"
        address_family = socket.AF_INET
        expected = "a (host, port) tuple"

        def check_address(self, address: Any) -> Any:
            calls.append("check_address")
            return address

        def before_bind(self, server: Any) -> None:
            calls.append("before_bind")

        def bound_address(self, server: Any) -> Any:
            calls.append("bound_address")
            return server.socket.getsockname()

        def release(self, server: Any) -> None:
            calls.append("release")

    registry = sockserve.Registry()
    registry.add("family", "recorded-inet", Recorded())
    registry.add(
        "transport", "recorded-tcp",
        sockserve.Transport("recorded-tcp", "recorded-inet", "stream", "RecordedTCP"),
    )
    cls = registry.compose("recorded-tcp", "threading")
    assert cls.__name__ == "ThreadingRecordedTCPServer"
    assert getattr(sockserve, cls.__qualname__) is cls
    with no_leaks():
        with serving(cls(LOOPBACK, EchoUpper)) as server:
            assert exchange(server, b"own family") == b"OWN FAMILY"
    assert calls == ["check_address", "before_bind", "bound_address", "release"]


# =========================================================================== the command line


@pytest.fixture
def author_site(tmp_path: Path) -> Path:
    """A distribution (metadata only; its modules are in tests/scripts) with a layer
    ``author-tag`` and a transport ``described-tcp``."""
    site = tmp_path / "site"
    make_distribution(site, "sockserve-author-bugs", "1.0", {
        "sockserve.layers": {"author-tag": "author_layer:AuthorTagLayer"},
        "sockserve.transports": {"described-tcp": "author_layer:DESCRIBED_TCP"},
    })
    return site


def script_env(*paths: Path) -> dict[str, str]:
    return clean_env(PYTHONPATH=os.pathsep.join(str(p) for p in (SCRIPTS, *paths)))


@contextlib.contextmanager
def cli_serving(*args: str, cwd: Path, env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[bytes], str, Any]]:
    """``python -m sockserve serve ARGS``: (process, class name, address) once it serves."""
    with sockserve_process("serve", *args, cwd=cwd, env=env, timeout=FINISH_TIMEOUT) as proc:
        banner = read_banner(proc, START_TIMEOUT).decode(errors="replace")
        match = SERVING.search(banner)
        assert match, banner
        host, _, port = match.group(2).rpartition(":")
        yield proc, match.group(1), (host.strip("[]"), int(port))


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """Wait (bounded) for *proc* to exit; its status and the rest of its stderr."""
    _, err = proc.communicate(timeout=FINISH_TIMEOUT)
    return proc.returncode, err.decode(errors="replace")


def refused(address: Any) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
    except (ConnectionRefusedError, ConnectionResetError):
        # Reset: the probe reached the backlog just as the listening socket was closed.
        return True
    return False


CLI_STRATEGIES = [
    pytest.param("threading"),
    pytest.param("forking", marks=requires_fork),
    pytest.param("threadpool"),
    pytest.param("prefork", marks=requires_fork),
]


@pytest.mark.parametrize("concurrency", CLI_STRATEGIES)
def test_cli_drain_completes_the_request_in_flight(concurrency, tmp_path):
    args = ["127.0.0.1:0", "author_handlers:Hold", "-c", concurrency]
    if concurrency == "prefork":
        args += ["-o", "workers=1"]
    with cli_serving(*args, cwd=tmp_path, env=script_env()) as (proc, _, address):
        with socket.create_connection(address, timeout=10) as client:
            client.sendall(b"slow\n")
            word, pid = read_line(client).split()
            assert word == b"start"
            proc.send_signal(signal.SIGTERM)
            assert read_line(client) == b"done " + pid + b"\n"
        status, err = finish(proc)
    assert status == 0, err
    assert "Traceback" not in err
    assert err.rstrip().endswith("sockserve: stopped")


@pytest.mark.parametrize("concurrency", CLI_STRATEGIES)
def test_cli_second_sigterm_during_the_drain_ends_the_wait_and_exits_0(concurrency, tmp_path):
    """The drain would wait 30 s for the held request; a second SIGTERM stops the wait:
    the request is cut off and the process exits 0 (not killed by the signal: 143)."""
    args = ["127.0.0.1:0", "author_handlers:Hold", "-c", concurrency, "-o", "drain_timeout=30"]
    if concurrency == "prefork":
        args += ["-o", "workers=1"]
    with cli_serving(*args, cwd=tmp_path, env=script_env()) as (proc, _, address):
        with socket.create_connection(address, timeout=10) as client:
            client.sendall(b"hold\n")
            assert read_line(client).startswith(b"start ")
            proc.send_signal(signal.SIGTERM)
            if concurrency != "prefork":  # the parent's socket stays open during its drain
                assert wait_until(lambda: refused(address), timeout=10), "no drain started"
            time.sleep(0.5)  # well into the drain
            assert proc.poll() is None, "the first SIGTERM did not wait for the held request"
            proc.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            status = proc.wait(FINISH_TIMEOUT)
            elapsed = time.monotonic() - stopped
        # Closed: a forked child left running (the process died of the signal) ends too,
        # and with it the stderr pipe it inherited.
        _, err = finish(proc)
    assert status == 0, f"exit status {status}:\n{err}"
    assert "second signal" in err
    assert elapsed < 5.0, elapsed  # the drain deadline was 30 s away
    assert err.rstrip().endswith("sockserve: stopped")


@requires_fork
def test_cli_forked_children_stop_on_the_drains_sigterm(tmp_path):
    """At the drain deadline the forking strategy sends its children SIGTERM; a child
    (which inherited the command line's handler) dies of it: no SIGKILL a second later."""
    drain = 0.5
    args = ["127.0.0.1:0", "author_handlers:Hold", "-c", "forking", "-o", f"drain_timeout={drain}"]
    with cli_serving(*args, cwd=tmp_path, env=script_env()) as (proc, _, address):
        with socket.create_connection(address, timeout=10) as client:
            client.sendall(b"hold\n")
            word, pid = read_line(client).split()
            assert word == b"start"
            child = int(pid)
            assert child != proc.pid
            proc.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            status, err = finish(proc)
            elapsed = time.monotonic() - stopped
    assert status == 0, err
    assert "terminating 1 child process(es)" in err
    assert "killing" not in err, err
    assert elapsed < drain + TERMINATE_GRACE, elapsed
    assert not is_running(child)


def test_cli_serve_with_a_layer_by_name(author_site, tmp_path):
    args = ["127.0.0.1:0", "author_handlers:Report", "--layer", "author-tag"]
    with cli_serving(*args, cwd=tmp_path, env=script_env(author_site)) as (proc, name, address):
        assert name == "ThreadingAuthorTagTCPServer"
        with socket.create_connection(address, timeout=10) as client:
            port = client.getsockname()[1]
            client.sendall(b"who\n")
            reply = read_line(client).decode()
        proc.send_signal(signal.SIGTERM)
        status, err = finish(proc)
    assert reply == f"ThreadingAuthorTagTCPServer ('tagged-by-layer', {port}) TaggedSocket\n"
    assert status == 0, err


def test_cli_plugins_shows_each_transports_description(author_site, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sockserve", "plugins"], cwd=tmp_path, env=script_env(author_site),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=FINISH_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    expected = {
        "tcp": "TCP over IPv4; IPv6 literals work too",
        "unix-dgram": "Unix datagram sockets (socket_mode option)",
        "described-tcp": "TCP with a description from a third party",
    }
    for name, description in expected.items():
        rows = [i for i, line in enumerate(lines) if re.match(rf"^  {re.escape(name)}\s", line)]
        assert len(rows) == 1, (name, proc.stdout)
        following = lines[rows[0] + 1]
        assert following.startswith("  ") and following.strip() == description, (name, proc.stdout)


# =========================================================================== prefork


@requires_fork
def test_prefork_serving_in_its_main_thread_stops_gracefully_on_sigint():
    """SIGINT (Ctrl-C) drains like SIGTERM: the request in flight completes, every worker
    exits, serve_forever returns and the process exits 0 without a traceback."""
    server = PreforkScript()
    try:
        server.wait_ready()
        assert server.signal_during_a_request(signal.SIGINT) in server.workers
        assert server.proc.wait(FINISH_TIMEOUT) == 0
        assert server.readline() == "stopped"
        assert wait_until(lambda: not any(map(is_running, server.workers)), timeout=5)
        assert server.proc.stderr is not None
        err = server.proc.stderr.read().decode(errors="replace")
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    finally:
        server.close()
