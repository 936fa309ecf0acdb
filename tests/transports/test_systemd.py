"""Socket activation: listen_fds() as sd_listen_fds_with_names, adopt() for fd://N, systemd and
systemd:NAME, ServerClass.from_socket, and the real systemd-socket-activate starting a service.

Descriptors are passed as systemd passes them: a child process gets them at 3, 4, ... with
LISTEN_PID set to its own pid (tests/scripts/activation_child.py ``launch`` does what systemd
does between its fork and the exec).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import sockserve
from sockserve.transports import _systemd
from sockserve.transports._systemd import (
    ActivationError,
    SocketMismatchError,
    adopt,
    is_activation_address,
    listen_fds,
    transport_for,
)
from support import (
    EchoUpper,
    HAS_IPV6,
    address_for,
    exchange,
    no_leaks,
    read_line,
    requirement,
    requires_af_unix,
    requires_fork,
    script_path,
    serving,
    terminate,
)

pytestmark = requires_af_unix

HAS_SOCKET_ACTIVATE = shutil.which("systemd-socket-activate") is not None
requires_socket_activate = requirement(
    HAS_SOCKET_ACTIVATE, "requires_socket_activate: systemd-socket-activate (Debian package systemd)"
)
CHILD = script_path("activation_child.py")


# ----------------------------------------------------------------- helpers


def run_child(fds: list[int], *command: str, names: str | None = None, pid: str = "self") -> Any:
    """Run activation_child.py with *fds* passed as systemd passes them; return its JSON."""
    args = [sys.executable, CHILD, "launch", "--fds", ",".join(map(str, fds)), "--pid", pid]
    if names is not None:
        args += ["--names", names]
    proc = subprocess.run([*args, "--", *command], pass_fds=fds, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """A listening TCP socket and a bound UDP socket on loopback."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(5)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    try:
        yield [tcp, udp]
    finally:
        tcp.close()
        udp.close()


@pytest.fixture
def clean_activation(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No LISTEN_* variables and nothing remembered as passed, before and after."""
    for name in _systemd.LISTEN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    _systemd._forget()
    yield
    _systemd._forget()


def closed_fd() -> int:
    """A descriptor number that is not open."""
    fd = 900
    while True:
        try:
            os.fstat(fd)
        except OSError:
            return fd
        fd += 1


# ----------------------------------------------------------------- listen_fds, as systemd passes them


def test_listen_fds_returns_the_passed_descriptors_from_3_with_their_names(sockets):
    result = run_child([s.fileno() for s in sockets], "report", names="web:dns")
    assert result["error"] is None
    assert result["fds"] == [[3, "web"], [4, "dns"]]
    # Inheritable as passed; close-on-exec afterwards, so that children do not get them.
    assert result["cloexec_before"] == {"3": False, "4": False}
    assert result["cloexec_after"] == {"3": True, "4": True}
    assert result["env_after"] == {}, "the variables are unset, for children not to see them"


def test_listen_fds_names_each_unknown_without_listen_fdnames(sockets):
    result = run_child([s.fileno() for s in sockets], "report")
    assert result["fds"] == [[3, "unknown"], [4, "unknown"]]


def test_listen_fds_keeps_the_variables_when_asked(sockets):
    result = run_child([sockets[0].fileno()], "report", "--keep-environment", names="web")
    assert result["fds"] == [[3, "web"]]
    assert set(result["env_after"]) == {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"}
    assert result["env_after"]["LISTEN_PID"] == str(result["pid"])


def test_listen_fds_takes_nothing_for_another_pid_and_unsets_the_variables(sockets):
    result = run_child([s.fileno() for s in sockets], "report", names="web:dns", pid="parent")
    assert result["error"] is None
    assert result["fds"] == []
    assert result["cloexec_after"] == {"3": False, "4": False}, "another process's: untouched"
    assert result["env_after"] == {}


def test_listen_fds_refuses_names_that_do_not_match_the_count_and_still_unsets(sockets):
    result = run_child([s.fileno() for s in sockets], "report", names="web")
    assert result["fds"] == []
    assert "LISTEN_FDNAMES='web' names 1 descriptor(s) but LISTEN_FDS=2" in result["error"]
    assert result["env_after"] == {}


@pytest.mark.parametrize("variable, value", [("LISTEN_PID", "12x"), ("LISTEN_PID", "-1"),
                                             ("LISTEN_FDS", "two")])
def test_listen_fds_refuses_malformed_variables(variable, value, monkeypatch, clean_activation):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv(variable, value)
    with pytest.raises(ActivationError, match=f"{variable}={value!r} is not a number"):
        listen_fds()
    assert variable not in os.environ


def test_listen_fds_without_variables_is_empty(clean_activation):
    assert listen_fds() == []


# ----------------------------------------------------------------- adopt


def test_names_select_sockets_and_each_is_adopted_once(sockets):
    tcp, udp = sockets
    results = run_child([tcp.fileno(), udp.fileno()], "adopt", "systemd", "systemd:nope",
                        "systemd:dns", "systemd:web", "systemd:web", names="web:dns")
    unnamed, missing, dns, web, again, env = results
    assert "2 sockets were passed ('web' (fd 3), 'dns' (fd 4))" in unnamed["error"]
    assert "choose one with systemd:NAME" in unnamed["error"]
    assert missing["error"] == ("systemd:nope: no socket named 'nope' was passed; passed: "
                                "'web' (fd 3), 'dns' (fd 4)")
    assert (dns["fd"], dns["family"], dns["type"]) == (4, "AF_INET", "SOCK_DGRAM")
    assert tuple(dns["address"]) == udp.getsockname()
    assert (web["fd"], web["type"], tuple(web["address"])) == (3, "SOCK_STREAM", tcp.getsockname())
    assert web["cloexec"] is True
    assert "adopted already" in again["error"]
    assert env == {"env_after": {}}


def test_systemd_with_one_socket_adopts_it(sockets):
    results = run_child([sockets[0].fileno()], "adopt", "systemd")
    assert tuple(results[0]["address"]) == sockets[0].getsockname()


def test_systemd_refuses_a_passed_descriptor_that_is_not_a_socket():
    read, write = os.pipe()
    try:
        results = run_child([read], "adopt", "systemd", names="fifo")
    finally:
        os.close(read)
        os.close(write)
    assert results[0]["error"] == ("systemd ('fifo'): descriptor 3 is not a socket (it is a pipe "
                                   "or FIFO)")


def test_systemd_with_nothing_passed_says_why(clean_activation, monkeypatch):
    with no_leaks():
        with pytest.raises(ActivationError, match=r"systemd: no sockets were passed to this process "
                           r"\(LISTEN_PID is not set\)"):
            adopt("systemd")
        monkeypatch.setenv("LISTEN_PID", "1")
        monkeypatch.setenv("LISTEN_FDS", "1")
        with pytest.raises(ActivationError, match=r"LISTEN_PID=1 is not this process"):
            adopt("systemd:web")
        assert "LISTEN_PID" not in os.environ


def test_fd_that_is_a_pipe_is_refused_and_left_open():
    read, write = os.pipe()
    try:
        with no_leaks():
            with pytest.raises(ActivationError) as caught:
                adopt(f"fd://{read}")
        assert str(caught.value) == f"fd://{read}: descriptor {read} is not a socket (it is a pipe or FIFO)"
        os.fstat(read)  # still open: it was not ours to close
    finally:
        os.close(read)
        os.close(write)


def test_fd_that_is_a_regular_file_is_refused(tmp_path):
    with open(tmp_path / "file", "wb") as f:
        with pytest.raises(ActivationError, match=r"is not a socket \(it is a regular file\)"):
            adopt(f"fd://{f.fileno()}")


def test_fd_that_is_not_open_is_refused():
    fd = closed_fd()
    with no_leaks():
        with pytest.raises(ActivationError, match=rf"^fd://{fd}: descriptor {fd} is not open \(Bad file descriptor\)$"):
            adopt(f"fd://{fd}")


@pytest.mark.parametrize("spec", ["fd://", "fd://x", "fd://-3", "fd:// 3", "systemd:", "systemdx", "unix:/x"])
def test_malformed_addresses_are_refused(spec):
    with pytest.raises(ActivationError):
        adopt(spec)


def test_is_activation_address():
    assert all(map(is_activation_address, ["fd://3", "systemd", "systemd:web"]))
    assert not any(map(is_activation_address, ["localhost:9999", "unix:/x", "systemdx", "fd:3"]))


def test_fd_adopts_a_socket_and_the_server_closes_it():
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    address = listening.getsockname()
    fd = listening.detach()  # the descriptor, as a parent would have passed it
    with no_leaks():
        sock = adopt(f"fd://{fd}")
        assert (sock.fileno(), sock.getsockname()) == (fd, address)
        assert not os.get_inheritable(fd)
        server = sockserve.ThreadingTCPServer.from_socket(sock, EchoUpper)
        with serving(server):
            assert exchange(server, b"hi") == b"HI"
        with pytest.raises(OSError):
            os.fstat(fd)


# ----------------------------------------------------------------- from_socket


def bound_socket(transport: str, tmp_path: Any) -> socket.socket:
    family = {"tcp": socket.AF_INET, "udp": socket.AF_INET, "tcp6": socket.AF_INET6,
              "udp6": socket.AF_INET6}.get(transport, socket.AF_UNIX)
    kind = socket.SOCK_DGRAM if transport in ("udp", "udp6", "unix-dgram") else socket.SOCK_STREAM
    sock = socket.socket(family, kind)
    sock.bind(address_for(transport, tmp_path))
    return sock


@pytest.mark.parametrize("transport", ["tcp", "tcp6", "udp", "udp6", "unix", "unix-dgram"])
def test_from_socket_serves_every_builtin_transport(transport, tmp_path):
    if transport.endswith("6") and not HAS_IPV6:
        pytest.skip("requires_ipv6: no IPv6 loopback")
    with no_leaks():
        sock = bound_socket(transport, tmp_path)
        assert transport_for(sock) == transport
        server = sockserve.compose(transport, "threading").from_socket(sock, EchoUpper)
        assert server.socket is sock
        assert server.server_address == sock.getsockname()
        assert server.owns_address is False
        with serving(server):
            assert exchange(server, b"hello", tmp_path) == b"HELLO"
        assert sock.fileno() == -1, "the server closes the socket it was given"


def test_from_socket_keeps_a_listening_socket_and_listens_on_a_bound_one():
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(3)
    bound = socket.socket()
    bound.bind(("127.0.0.1", 0))
    already = []
    for sock in (listening, bound):
        server = sockserve.TCPServer.from_socket(sock, EchoUpper)
        already.append(server._listening)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        with serving(server):
            assert exchange(server, b"x") == b"X"
    assert already == [True, False]


def test_a_unix_socket_file_from_a_descriptor_is_never_removed(tmp_path):
    path = str(tmp_path / "given.sock")
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        sock = socket.socket(socket.AF_UNIX, kind)
        sock.bind(path)
        name = "UnixStreamServer" if kind == socket.SOCK_STREAM else "UnixDatagramServer"
        server = getattr(sockserve, name).from_socket(sock, EchoUpper)
        server.server_close()
        assert os.path.exists(path), f"{name} removed a socket file it did not create"
        os.unlink(path)


def test_from_socket_fires_server_activate_and_takes_options():
    activated = []

    class Plugin:
        @sockserve.hookimpl
        def sockserve_server_activate(self, server):
            activated.append(server)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    cls = sockserve.compose("tcp", "threading", plugins=[Plugin()])
    server = cls.from_socket(sock, EchoUpper, drain_timeout=1.5)
    try:
        assert activated == [server]
        assert server.drain_timeout == 1.5
    finally:
        server.server_close()


@pytest.mark.parametrize("made, server_class, message", [
    ((socket.AF_INET6, socket.SOCK_DGRAM, ("::1", 0)), "UDPServer",
     "this socket is AF_INET6/SOCK_DGRAM (transport udp6) but UDPServer serves AF_INET/SOCK_DGRAM"),
    ((socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0)), "ThreadingTCPServer",
     "this socket is AF_INET/SOCK_DGRAM (transport udp) but ThreadingTCPServer serves AF_INET/SOCK_STREAM"),
    ((socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0)), "UnixStreamServer",
     "this socket is AF_INET/SOCK_STREAM (transport tcp) but UnixStreamServer serves AF_UNIX/SOCK_STREAM"),
])
def test_a_mismatch_names_both_and_leaves_the_socket_alone(made, server_class, message):
    family, kind, address = made
    if family == socket.AF_INET6 and not HAS_IPV6:
        pytest.skip("requires_ipv6: no IPv6 loopback")
    with socket.socket(family, kind) as sock:
        sock.bind(address)
        with no_leaks():
            with pytest.raises(SocketMismatchError) as caught:
                getattr(sockserve, server_class).from_socket(sock, EchoUpper)
        assert str(caught.value) == message
        assert isinstance(caught.value, sockserve.SockserveError)
        assert sock.fileno() != -1


def test_from_socket_refuses_prefork_reuse_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(sockserve.OptionError, match="reuse_port"):
            sockserve.compose("tcp", "prefork").from_socket(sock, EchoUpper, reuse_port=True)
        assert sock.fileno() != -1


def test_from_socket_refuses_socket_mode(tmp_path):
    from sockserve.transports._unix import UnixSocketMixIn

    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "s.sock"))
        wired = "socket_mode" in sockserve.option_fields(sockserve.UnixStreamServer)
        cls = sockserve.compose("unix", mixins=[] if wired else [UnixSocketMixIn],
                                options={"socket_mode": 0o600})
        with pytest.raises(sockserve.OptionError, match="SocketMode="):
            cls.from_socket(sock, EchoUpper)
        assert sock.fileno() != -1


def test_transport_for_a_socket_no_transport_serves():
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        with pytest.raises(SocketMismatchError, match=r"^no installed transport serves "
                           r"AF_UNIX/SOCK_SEQPACKET sockets \(installed: .*tcp.*\)$"):
            transport_for(sock)


@requires_fork
def test_prefork_workers_serve_the_passed_socket_without_the_variables(sockets):
    tcp = sockets[0]
    port = tcp.getsockname()[1]
    args = [sys.executable, CHILD, "launch", "--fds", str(tcp.fileno()), "--names", "web", "--",
            "serve", "systemd:web", "--concurrency", "prefork", "--workers", "2"]
    proc = subprocess.Popen(args, pass_fds=[tcp.fileno()], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tcp.close()  # the child has it now
    try:
        assert proc.stderr is not None
        assert "PreforkTCPServer" in proc.stderr.readline()
        replies = [ask(port, b"p%d\n" % i) for i in range(6)]
        assert [r["echo"] for r in replies] == [f"P{i}" for i in range(6)]
        assert proc.pid not in {r["pid"] for r in replies}, "the workers serve"
        assert all(r["env"] == {} for r in replies), "no LISTEN_* in a worker"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0
        assert proc.stderr is not None
        proc.stderr.close()


def test_from_socket_closes_the_socket_when_construction_fails():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))

    class Failing(sockserve.TCPServer):
        def server_activate(self):
            raise RuntimeError("boom")

    with no_leaks():
        with pytest.raises(RuntimeError, match="boom"):
            Failing.from_socket(sock, EchoUpper)
    assert sock.fileno() == -1


# ----------------------------------------------------------------- systemd-socket-activate


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Activator:
    """systemd-socket-activate running activation_child.py serve; its stderr collected."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} from systemd-socket-activate; stderr: {self.lines}")

    def stderr(self, timeout: float = 10.0) -> str:
        self._reader.join(timeout)
        return "\n".join(self.lines)


def passed_environment() -> list[str]:
    """-E flags for what the child needs of ours (systemd-socket-activate passes only those)."""
    return [arg for key in ("PYTHONPATH",) if key in os.environ for arg in ("-E", f"{key}={os.environ[key]}")]


@contextlib.contextmanager
def activated(activate_args: list[str], *serve_args: str, ports: int = 1, kind: int = socket.SOCK_STREAM,
              command: list[str] | None = None) -> Iterator[tuple[Activator, list[int]]]:
    """Start systemd-socket-activate on free loopback ports running activation_child.py
    serve SERVE_ARGS (or *command*), torn down by pid."""
    command = command or [sys.executable, CHILD, "serve", *serve_args]
    for _ in range(5):  # a free port may be taken between probing and listening
        chosen = [free_port(kind) for _ in range(ports)]
        listen = [arg for port in chosen for arg in ("-l", f"127.0.0.1:{port}")]
        proc = subprocess.Popen(
            ["systemd-socket-activate", *listen, *passed_environment(), *activate_args, *command],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        activator = Activator(proc)
        try:
            try:
                for port in chosen:
                    activator.wait_for(f"Listening on 127.0.0.1:{port}")
            except AssertionError:
                if "in use" in activator.stderr(1):
                    continue
                raise
            yield activator, chosen
            return
        finally:
            terminate(proc, grace=10, reap=10)
            activator.stderr(5)
            if proc.stderr is not None:
                proc.stderr.close()
    pytest.fail("no free loopback port for systemd-socket-activate after 5 tries")


def ask(port: int, line: bytes = b"hello\n", kind: int = socket.SOCK_STREAM) -> dict[str, Any]:
    with socket.socket(socket.AF_INET, kind) as client:
        client.settimeout(20)  # the service starts on the first connection: python starting up
        if kind == socket.SOCK_STREAM:
            client.connect(("127.0.0.1", port))
            client.sendall(line)
            data = read_line(client)
        else:
            client.sendto(line, ("127.0.0.1", port))
            data = client.recv(4096)
    return json.loads(data)


@requires_socket_activate
def test_socket_activate_serves_the_first_queued_connection():
    with activated(["-E", "GREETING=hello from -E"], "systemd") as (activator, (port,)):
        # Nothing runs yet: this connection waits in the backlog while the service starts.
        reply = ask(port)
        assert reply["echo"] == "HELLO"
        assert reply["pid"] == activator.proc.pid, "exec'd in place: the pid systemd set in LISTEN_PID"
        assert reply["env"] == {}, "LISTEN_* are unset once read"
        assert reply["greeting"] == "hello from -E"
        assert "serving ThreadingTCPServer on ('127.0.0.1', %d)" % port in activator.wait_for("serving")
        assert ask(port, b"again\n")["echo"] == "AGAIN"


@requires_socket_activate
@requires_fork
def test_socket_activate_prefork_workers_inherit_the_socket_not_the_variables():
    with activated([], "systemd", "--concurrency", "prefork", "--workers", "2") as (activator, (port,)):
        replies = [ask(port, b"w%d\n" % i) for i in range(6)]
        assert {r["echo"] for r in replies} == {f"W{i}" for i in range(6)}
        pids = {r["pid"] for r in replies}
        assert activator.proc.pid not in pids, "served by the workers, not the supervisor"
        assert all(r["env"] == {} for r in replies), "a worker sees no LISTEN_* variables"
        assert "PreforkTCPServer" in activator.wait_for("serving")


@requires_socket_activate
def test_socket_activate_fdname_selects_the_socket():
    with activated(["--fdname=web:admin"], "systemd:admin", ports=2) as (activator, (web, admin)):
        assert ask(admin, b"admin\n")["echo"] == "ADMIN"
        line = activator.wait_for("serving")
        assert f"('127.0.0.1', {admin})" in line


@requires_socket_activate
def test_socket_activate_several_sockets_without_a_name_exit_2_listing_them():
    with activated(["--fdname=web:admin"], "systemd", ports=2) as (activator, (web, admin)):
        with socket.create_connection(("127.0.0.1", web), timeout=10):
            assert activator.proc.wait(30) == 2
        message = activator.wait_for("activation_child: error:")
        assert "2 sockets were passed ('web' (fd 3), 'admin' (fd 4))" in message
        assert "systemd:NAME" in message


@requires_socket_activate
def test_socket_activate_datagram_gives_a_udp_socket():
    with activated(["--datagram"], "systemd", kind=socket.SOCK_DGRAM) as (activator, (port,)):
        reply = ask(port, b"datagram", kind=socket.SOCK_DGRAM)
        assert reply["echo"] == "DATAGRAM"
        assert reply["env"] == {}
        assert "ThreadingUDPServer" in activator.wait_for("serving")


@requires_socket_activate
def test_socket_activate_type_mismatch_is_a_clear_error_exit_2():
    with activated(["--datagram"], "systemd", "--transport", "tcp", kind=socket.SOCK_DGRAM) as (activator, (port,)):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"x", ("127.0.0.1", port))
            assert activator.proc.wait(30) == 2
        message = activator.wait_for("activation_child: error:")
        assert message.endswith("this socket is AF_INET/SOCK_DGRAM (transport udp) but "
                                "ThreadingTCPServer serves AF_INET/SOCK_STREAM")


# ----------------------------------------------------------------- sockserve serve (the lead wires it)



def sockserve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sockserve", "serve", *args]


def activated_cli(activate_args: list[str], *serve_args: str, kind: int = socket.SOCK_STREAM,
                  ports: int = 1) -> contextlib.AbstractContextManager[tuple[Activator, list[int]]]:
    """systemd-socket-activate starting ``sockserve serve ...``, torn down by pid."""
    return activated(activate_args, ports=ports, kind=kind, command=sockserve_command(*serve_args))


def ask_line(port: int, line: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
        client.sendall(line)
        return client.makefile("rb").readline()


@requires_socket_activate
def test_cli_serves_the_first_queued_connection_on_the_socket_systemd_passed():
    with activated_cli([], "systemd") as (activator, (port,)):
        assert ask_line(port, b"hello\n") == b"HELLO\n"
        line = activator.wait_for("serving on")
        assert f"ThreadingTCPServer serving on 127.0.0.1:{port}" in line
        os.kill(activator.proc.pid, signal.SIGTERM)
        assert activator.proc.wait(15) == 0


@requires_socket_activate
@requires_fork
def test_cli_prefork_on_a_passed_socket():
    with activated_cli([], "systemd", "-c", "prefork", "-o", "workers=2") as (activator, (port,)):
        assert [ask_line(port, b"w%d\n" % i) for i in range(4)] == [b"W%d\n" % i for i in range(4)]
        assert "PreforkTCPServer serving on" in activator.wait_for("serving on")


@requires_socket_activate
def test_cli_fdname_selects_the_socket_and_datagram_picks_udp():
    with activated_cli(["--fdname=web:admin"], "systemd:admin", ports=2) as (activator, (web, admin)):
        assert ask_line(admin, b"admin\n") == b"ADMIN\n"
        assert f"serving on 127.0.0.1:{admin}" in activator.wait_for("serving on")
    with activated_cli(["--datagram"], "systemd", kind=socket.SOCK_DGRAM) as (activator, (port,)):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(20)
            client.sendto(b"dgram\n", ("127.0.0.1", port))
            assert client.recv(100) == b"DGRAM\n"
        assert "ThreadingUDPServer serving on" in activator.wait_for("serving on")


@requires_socket_activate
def test_cli_type_mismatch_exits_2_naming_both():
    with activated_cli(["--datagram"], "systemd", "--transport", "tcp", kind=socket.SOCK_DGRAM) as (activator, (port,)):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"x", ("127.0.0.1", port))
            assert activator.proc.wait(30) == 2
        assert activator.wait_for("sockserve: error:") == (
            "sockserve: error: this socket is AF_INET/SOCK_DGRAM (transport udp) but "
            "ThreadingTCPServer serves AF_INET/SOCK_STREAM")


@requires_socket_activate
def test_cli_notifies_ready_watchdog_and_stopping(tmp_path):
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify"))
    receiver.settimeout(0.2)
    messages: list[str] = []

    def drain(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                messages.append(receiver.recv(4096).decode())
            except TimeoutError:
                pass

    try:
        env = ["-E", f"NOTIFY_SOCKET={tmp_path / 'notify'}", "-E", "WATCHDOG_USEC=1200000"]
        with activated_cli(env, "systemd") as (activator, (port,)):
            assert ask_line(port, b"hi\n") == b"HI\n"
            # A ping every 0.6 s asked for; the loop turns every 0.5 s, so one comes at
            # most about 1.1 s after the last: 3 s hold two or more, also under load.
            drain(3.0)
            assert f"READY=1\nSTATUS=serving on 127.0.0.1:{port}" in messages
            assert messages.count("WATCHDOG=1") >= 2
            os.kill(activator.proc.pid, signal.SIGTERM)
            assert activator.proc.wait(15) == 0
        drain(0.3)
        assert any(m.startswith("STOPPING=1") for m in messages), messages
    finally:
        receiver.close()


def cli(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    return subprocess.run(sockserve_command(*args), capture_output=True, text=True, timeout=30,
                          env=env, pass_fds=pass_fds, stdin=subprocess.DEVNULL)


def test_cli_bad_activation_addresses_exit_2_with_a_clear_error():
    read, write = os.pipe()
    try:
        proc = cli(f"fd://{read}", pass_fds=(read,))
    finally:
        os.close(read)
        os.close(write)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"sockserve: error: fd://{read}: descriptor {read} is not a socket "
                                   "(it is a pipe or FIFO)")
    fd = closed_fd()
    proc = cli(f"fd://{fd}")
    assert (proc.returncode, proc.stderr.strip()) == (
        2, f"sockserve: error: fd://{fd}: descriptor {fd} is not open (Bad file descriptor)")
    proc = cli("systemd")
    assert proc.returncode == 2
    assert proc.stderr.startswith("sockserve: error: systemd: no sockets were passed to this process "
                                  "(LISTEN_PID is not set)")


def test_cli_serves_fd_n():
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    proc = subprocess.Popen(sockserve_command(f"fd://{listening.fileno()}"), pass_fds=(listening.fileno(),),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    listening.close()
    try:
        assert proc.stderr is not None
        assert f"serving on 127.0.0.1:{port}".encode() in proc.stderr.readline()
        assert ask_line(port, b"fd\n") == b"FD\n"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(15)
        assert proc.stderr is not None
        proc.stderr.close()
