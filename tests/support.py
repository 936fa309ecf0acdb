"""Test helpers: servers on loopback or in a temporary directory, clients, leak checks,
plugin distributions written to disk, processes started by tests (HAProxy, the prefork
script, ``sockserve`` command lines) and their teardown by pid.

What belongs here: a helper that more than one test module needs, once; each section
below is one of the kinds above. What does not: helpers of one test module (they stay in
it), the PROXY-protocol tests' encoder and servers (``tests/transports/proxy_support.py``),
and scripts that run in other processes (files in ``tests/scripts/``).

Imported by tests as ``support`` (``pythonpath = tests`` in pyproject.toml)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import selectors
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

import sockserve
from sockserve.testing._harness import bounded as _kit_bounded

TRANSPORTS = ["tcp", "tcp6", "udp", "udp6", "unix", "unix-dgram"]
CONCURRENCY = ["sync", "threading", "forking", "threadpool", "prefork"]
#: The built-in concurrency plugin names, sorted as the registry lists them.
BUILTIN_CONCURRENCY = ("forking", "prefork", "sync", "threading", "threadpool")
STREAM_TRANSPORTS = {"tcp", "tcp6", "unix"}

def _has_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


#: Under ``CI=true`` a missing requirement of ``requires_ipv6`` / ``requires_ss`` fails the
#: test instead of skipping it: CI provides them (``.ci/run`` installs iproute2), so a
#: skip there would only hide that the test never ran.
IN_CI = os.environ.get("CI") == "true"


def missing(reason: str) -> NoReturn:
    """Skip the running test for lack of what *reason* names; under ``CI=true`` fail it."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: missing requirements fail, they do not skip)", pytrace=False)
    pytest.skip(reason)


def requirement(available: bool, reason: str) -> Callable[[Any], Any]:
    """A decorator for tests needing a feature: without it, a skip marked *reason*, or
    under ``CI=true`` a failure saying *reason*."""

    def decorate(test: Any) -> Any:
        if available:
            return test
        if not IN_CI:
            return pytest.mark.skipif(True, reason=reason)(test)

        @functools.wraps(test)  # the same signature: pytest still gives it its fixtures
        def fails_in_ci(*args: Any, **kwargs: Any) -> None:
            missing(reason)

        return fails_in_ci

    return decorate


HAS_IPV6 = _has_ipv6()
#: ``ss`` (iproute2) reads listen backlogs; only on Linux.
HAS_SS = shutil.which("ss") is not None and sys.platform.startswith("linux")
requires_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="requires_fork: no os.fork")
requires_af_unix = pytest.mark.skipif(
    not hasattr(socket, "AF_UNIX"), reason="requires_af_unix: no AF_UNIX"
)
requires_ipv6 = requirement(HAS_IPV6, "requires_ipv6: no IPv6 loopback")
requires_ss = requirement(HAS_SS, "requires_ss: the ss tool (iproute2) to read listen backlogs")
#: The haproxy program: the PROXY protocol peer and the load balancer of the rolling tests.
HAPROXY = shutil.which("haproxy")
requires_haproxy = requirement(HAPROXY is not None, "requires_haproxy: the haproxy program")


def address_for(transport: str, tmp_path: Any) -> Any:
    """A bindable address for *transport*: loopback port 0 or a path in *tmp_path*."""
    if transport in ("tcp", "udp"):
        return ("127.0.0.1", 0)
    if transport in ("tcp6", "udp6"):
        return ("::1", 0)
    return str(tmp_path / f"{transport}.sock")


def skip_unless_supported(transport: str, concurrency: str) -> None:
    if transport in ("tcp6", "udp6") and not HAS_IPV6:
        missing("requires_ipv6: no IPv6 loopback")
    if transport.startswith("unix") and not hasattr(socket, "AF_UNIX"):
        pytest.skip("requires_af_unix: no AF_UNIX")
    if concurrency in ("forking", "prefork") and not hasattr(os, "fork"):
        pytest.skip("requires_fork: no os.fork")


@pytest.fixture(params=[sockserve, socketserver], ids=["sockserve", "socketserver"])
def mod(request: pytest.FixtureRequest) -> Any:
    """The module under test: sockserve, or the standard socketserver as the reference.

    Import it into a test module (``from support import mod``) to run that module's
    tests against both, side by side.
    """
    return request.param


@contextlib.contextmanager
def serving(server: Any, poll_interval: float = 0.05) -> Iterator[Any]:
    """Run ``server.serve_forever`` in a thread; shut down, join and close on exit.

    A prefork server's workers are all forked before this returns: a worker forked while
    the test runs a subprocess would inherit that Popen's error pipe and hold its exec
    report back (Popen then waits for the worker to exit).
    """
    workers = getattr(server, "workers", None) if hasattr(server, "worker_id") else None
    before = child_pids() if isinstance(workers, int) else set()
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval,), daemon=True)
    thread.start()
    if isinstance(workers, int):
        wait_until(lambda: len(child_pids() - before) >= workers, timeout=10)
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
        assert not thread.is_alive(), "serve_forever did not stop"


def start_serving(server: Any, poll_interval: float = 0.05) -> threading.Thread:
    """Start ``server.serve_forever`` in a daemon thread and return the thread.

    For tests that call ``shutdown()``, join the thread and ``server_close()`` themselves.
    """
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval,), daemon=True)
    thread.start()
    return thread


def bounded(func: Callable[[], Any], timeout: float = 10.0) -> float:
    """Call *func* in a helper thread; return the seconds it took, failing if it has not
    returned within *timeout* seconds (what it raised is raised here).

    The conformance kit's ``bounded`` (one copy for the kit and the tests), with the 10 s
    these tests give a call by default where the kit gives 30.
    """
    return _kit_bounded(func, timeout)


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll *predicate* every *interval* seconds: True once it holds, False after *timeout*."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def connect(server: Any, tmp_path: Any = None, timeout: float = 10.0) -> socket.socket:
    """A client socket connected to *server* (bound first for Unix datagram servers)."""
    client = socket.socket(server.address_family, server.socket_type)
    client.settimeout(timeout)
    if server.address_family == getattr(socket, "AF_UNIX", None) and server.socket_type == socket.SOCK_DGRAM:
        # A Unix datagram client needs an address of its own to receive the reply.
        assert tmp_path is not None, "a Unix datagram client needs tmp_path"
        path = str(tmp_path / f"client-{time.monotonic_ns()}.sock")
        client.bind(path)
    client.connect(server.server_address)
    return client


def tcp_client(server: Any, timeout: float = 5.0) -> socket.socket:
    """A TCP client connected to *server*, every blocking call bounded by *timeout*."""
    return socket.create_connection(server.server_address, timeout=timeout)


@contextlib.contextmanager
def held_connections(address: Any, count: int, payload: bytes = b"x",
                     timeout: float = 10.0) -> Iterator[list[socket.socket]]:
    """*count* clients connected to *address*, each having sent *payload* (so that its
    handler runs or waits for a thread); closed on exit, also when the block fails."""
    clients: list[socket.socket] = []
    try:
        for _ in range(count):
            client = socket.create_connection(address, timeout=timeout)
            clients.append(client)
            client.sendall(payload)
        yield clients
    finally:
        for client in clients:
            client.close()


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything received on stream socket *sock* until the peer ends it (give it a timeout)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def read_line(sock: socket.socket) -> bytes:
    """Bytes up to and including the first newline (or to EOF; give *sock* a timeout).

    One byte at a time, so that nothing after the newline is taken from the socket: what
    follows is there for the next read (``read_to_eof``, another ``read_line``).
    """
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def closed_by_server(client: socket.socket, within: float) -> bool:
    """The server ended *client* (EOF or reset) within *within* seconds."""
    client.settimeout(within)
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def exchange(server: Any, payload: bytes, tmp_path: Any = None) -> bytes:
    """Send *payload* and return the whole reply (stream: until EOF; datagram: one)."""
    with connect(server, tmp_path) as client:
        client.sendall(payload)
        if server.socket_type == socket.SOCK_STREAM:
            client.shutdown(socket.SHUT_WR)
            return read_to_eof(client)
        return client.recv(65536)


def ask_stream(address: Any, payload: bytes, family: int = socket.AF_INET) -> bytes:
    """Connect a stream client to *address*, send *payload*, return the reply up to EOF.

    The client does not end its side: the server decides when the request is over (a
    line-based handler answers one line, then closes).
    """
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(address)
        client.sendall(payload)
        return read_to_eof(client)


class EchoUpper(sockserve.BaseRequestHandler):
    """Upper-case echo for both socket types: stream reads to EOF, datagram one packet."""

    def handle(self) -> None:
        if isinstance(self.request, tuple):
            data, sock = self.request
            sock.sendto(data.upper(), self.client_address)
            return
        self.request.sendall(read_to_eof(self.request).upper())


class UpperFailSlow(sockserve.BaseRequestHandler):
    """Stream upper-case echo of everything up to EOF, with two special requests.

    ``b"fail"`` raises ``ValueError("bad request")`` (no reply); ``b"slow"`` sleeps
    ``slow`` seconds before it replies. For plugins that record how requests ended
    and how long they took.
    """

    #: Seconds a ``b"slow"`` request sleeps before its reply.
    slow = 0.05

    def handle(self) -> None:
        data = read_to_eof(self.request)
        if data == b"fail":
            raise ValueError("bad request")
        if data == b"slow":
            time.sleep(self.slow)
        self.request.sendall(data.upper())


# ----------------------------------------------------------------- resource accounting


def open_fds() -> set[int]:
    """Descriptors open in this process."""
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@contextlib.contextmanager
def no_stray_children() -> Iterator[None]:
    """Fail, and kill by pid, any child process left running by the block (prefork tests)."""
    before = child_pids()
    yield
    stray = child_pids() - before
    for pid in stray:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not stray, f"worker processes left running: {sorted(stray)}"


def proc_stat(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, pgrp,
    session, ...), or None once *pid* is gone (reaped, or never there)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; the fields after the last ')' are fixed.
    return stat[stat.rindex(b")") + 2:].split()


def processes() -> Iterator[tuple[int, list[bytes]]]:
    """Every process in ``/proc``, zombies too, with its ``proc_stat()`` fields."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := proc_stat(entry)) is not None:
            yield int(entry), fields


def child_pids(parent: int | None = None) -> set[int]:
    """Process ids of the children (live or zombie) of *parent*, by default this process."""
    me = os.getpid() if parent is None else parent
    return {pid for pid, fields in processes() if int(fields[1]) == me}


def session_members(sid: int) -> set[int]:
    """Live (not zombie) processes in session *sid*: for a process started with
    ``start_new_session=True`` and *sid* its pid, itself and every process it started."""
    return {pid for pid, fields in processes() if fields[0] != b"Z" and int(fields[3]) == sid}


def is_running(pid: int) -> bool:
    """True while *pid* exists and has not exited (a zombie has exited)."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] != b"Z"


def runs_script(pid: int, path: str) -> bool:
    """True when *pid* runs the script at *path* (one of its arguments): a pid the
    system has recycled for another program must not be signalled."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return path.encode() in f.read().split(b"\0")
    except OSError:
        return False


@contextlib.contextmanager
def no_leaks(settle: float = 5.0) -> Iterator[None]:
    """Assert that descriptors, threads and child processes are back to where they were."""
    fds = open_fds()
    threads = set(threading.enumerate())
    children = child_pids()
    yield
    deadline = time.monotonic() + settle
    while True:
        extra_fds = open_fds() - fds
        extra_threads = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        extra_children = child_pids() - children
        if not (extra_fds or extra_threads or extra_children) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    details = {
        fd: os.readlink(f"/proc/self/fd/{fd}") for fd in extra_fds if os.path.exists(f"/proc/self/fd/{fd}")
    }
    assert not extra_fds, f"leaked descriptors: {details}"
    assert not extra_threads, f"leaked threads: {extra_threads}"
    assert not extra_children, f"leaked child processes: {extra_children}"


# ----------------------------------------------------------------- plugin distributions


def make_distribution(
    root: Path,
    name: str,
    version: str,
    entry_points: dict[str, dict[str, str]],
    modules: dict[str, str] | None = None,
) -> Path:
    """Write an installed distribution (a ``*.dist-info`` directory) and its modules into *root*.

    :param entry_points: ``{group: {entry point name: "module:attr"}}`` for entry_points.txt.
    :param modules: ``{file name: source}``, written (dedented) next to the dist-info.
    :returns: the ``*.dist-info`` directory.
    """
    dist_info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
    )
    sections = []
    for group, table in entry_points.items():
        lines = "\n".join(f"{ep} = {value}" for ep, value in table.items())
        sections.append(f"[{group}]\n{lines}\n")
    (dist_info / "entry_points.txt").write_text("\n".join(sections), encoding="utf-8")
    for filename, source in (modules or {}).items():
        (root / filename).write_text(textwrap.dedent(source), encoding="utf-8")
    return dist_info


#: The scripts and handler modules that tests run in other processes.
SCRIPTS = Path(__file__).parent / "scripts"


def script_path(name: str) -> str:
    """The path of ``tests/scripts/<name>``, as a command line takes it; fails if it is missing."""
    path = SCRIPTS / name
    assert path.is_file(), f"no script {path}"
    return str(path)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment for a subprocess, without PYTHONPATH and the variables
    that turn plugins off (SOCKSERVE_DISABLE_PLUGIN_AUTOLOAD, SOCKSERVE_BLOCK_PLUGINS),
    updated with *extra*."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "SOCKSERVE_DISABLE_PLUGIN_AUTOLOAD", "SOCKSERVE_BLOCK_PLUGINS")
    }
    env.update(extra)
    return env


def probe_autoload(name: str, tmp_path: Path) -> dict[str, Any]:
    """Ask a fresh interpreter, with autoload on, what became of plugin *name*.

    A control plugin (``probe``, in a distribution written into ``tmp_path / "site"``)
    shows that autoload ran. Returns the JSON of ``tests/scripts/autoload_probe.py``: ``listed``,
    ``registered``, ``autoload_attribute`` and ``control_registered``.
    """
    site = tmp_path / "site"
    module = f"{name.replace('-', '')}_probe"
    make_distribution(
        site,
        "sockserve-probe",
        "1.0",
        {"sockserve.plugins": {"probe": module}},
        {
            f"{module}.py": """
                import sockserve

                @sockserve.hookimpl
                def sockserve_server_close(server):
                    pass
            """
        },
    )
    proc = subprocess.run(
        [sys.executable, script_path("autoload_probe.py"), name],
        cwd=tmp_path, env=clean_env(PYTHONPATH=str(site)), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ----------------------------------------------------------------- processes torn down by pid


def terminate(proc: subprocess.Popen[Any], grace: float = 5.0, reap: float = 5.0) -> None:
    """Teardown by pid: SIGTERM *proc* if it still runs, SIGKILL it if it has not exited
    *grace* seconds later, then reap it (waiting up to *reap* seconds).

    Only *proc* itself is signalled, never its process group: for what it started, see
    ``session_members``.
    """
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait(reap)


@contextlib.contextmanager
def running_haproxy(directory: Path, config: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``haproxy -f DIRECTORY/haproxy.cfg -db`` with *config*, in its own session,
    its output in ``DIRECTORY/haproxy.log``; on exit stop it by pid (``terminate``).

    Waits for nothing: the caller knows what "ready" means for its configuration. Tests
    using it are marked ``requires_haproxy``.
    """
    assert HAPROXY is not None, "mark the test requires_haproxy"
    (directory / "haproxy.cfg").write_text(config)
    with open(directory / "haproxy.log", "wb") as out:
        proc = subprocess.Popen([HAPROXY, "-f", str(directory / "haproxy.cfg"), "-db"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        terminate(proc)


class PreforkScript:
    """``tests/scripts/prefork_server.py`` in a subprocess: a prefork server with two
    workers serving in the script's main thread (for signals sent to a whole process).

    ``wait_ready()`` reads what it announces on stdout: ``port N``, then one ``worker PID``
    per worker; ``readline()`` reads what comes after (``stopped``). Every read is
    bounded. ``close()`` is the teardown, by pid.
    """

    #: The script, as its workers' command lines show it (see ``runs_script``).
    SCRIPT = str(SCRIPTS / "prefork_server.py")
    #: Workers the script runs (its ``WORKERS``).
    WORKERS = 2

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, script_path("prefork_server.py")],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
        )
        self._buffer = b""
        #: The port it serves on, once ``wait_ready()`` returned.
        self.port = 0
        #: Its workers' pids, once ``wait_ready()`` returned.
        self.workers: set[int] = set()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Read the ``port`` line, then the ``worker`` lines; fail on anything else."""
        kind, _, value = self.readline(timeout).partition(" ")
        assert kind == "port", f"expected the port line first, got {kind} {value}"
        self.port = int(value)
        while len(self.workers) < self.WORKERS:
            kind, _, value = self.readline(timeout).partition(" ")
            assert kind == "worker", f"expected a worker line, got {kind} {value}"
            self.workers.add(int(value))

    def readline(self, timeout: float = 10.0) -> str:
        """The next line of its stdout, without the newline; fails after *timeout* seconds
        or if the process ends its stdout first."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise AssertionError(f"no line from the server process within {timeout}s; so far {self._buffer!r}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"server process ended; so far {self._buffer!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def signal_during_a_request(self, signum: int) -> int:
        """Send *signum* to the server process while a request is in flight in a worker
        (after its ``start``, before its ``done``); return the pid of the worker whose
        ``done`` reply completed it after the signal."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as client:
            client.sendall(b"hi")
            assert read_line(client) == b"start\n"  # in flight in a worker
            os.kill(self.proc.pid, signum)
            rest = read_to_eof(client)
        assert rest.startswith(b"done "), f"the request in flight was not completed: {rest!r}"
        return int(rest.split()[1])

    def close(self) -> list[int]:
        """SIGKILL, by pid, the workers still running the script and the server process if
        it runs; reap it, close its pipes. Returns the workers that were still running."""
        survivors = [pid for pid in self.workers if is_running(pid) and runs_script(pid, self.SCRIPT)]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return survivors


# ----------------------------------------------------------------- the command line


@contextlib.contextmanager
def sockserve_process(
    *args: str, cwd: Path, env: dict[str, str], timeout: float, python: str = sys.executable
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``python -m sockserve ARGS`` with stdin empty and stdout, stderr piped.

    On exit the process is killed (by its pid) if it still runs, reaped (waiting up to
    *timeout* seconds) and its pipes are closed.
    """
    proc = subprocess.Popen(
        [python, "-m", "sockserve", *args],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()


def banner_line(seen: bytes) -> bool:
    """True once *seen* holds the whole ``serving on`` line of ``sockserve serve``."""
    return b"serving on" in seen and seen.endswith(b"\n")


def read_banner(
    proc: subprocess.Popen[bytes], timeout: float, until: Callable[[bytes], Any] = banner_line
) -> bytes:
    """Read *proc*'s stderr until ``until(all read so far)`` is true; return all of it.

    Fails with everything read so far if the process exits first or *timeout* seconds pass.
    """
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    deadline = time.monotonic() + timeout
    seen = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while not until(seen):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no banner within {timeout}s: {seen!r}"
            if selector.select(remaining):
                chunk = os.read(fd, 4096)
                assert chunk, f"sockserve serve exited ({proc.wait(timeout)}): {seen!r}"
                seen += chunk
    return seen
