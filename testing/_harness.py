"""What the kit's scenarios are built from: platform checks, the server under test,
clients, bounded waits, and what a process holds (descriptors, threads, children).

Every blocking call here has a timeout: a scenario that goes wrong fails, it never hangs.
Slightly over 400 lines: the helpers every scenario module uses, kept together.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

import sockserve

__all__ = [
    "CLIENT_THREADS",
    "TIMEOUT",
    "Holdings",
    "Subject",
    "access_log_to",
    "ask",
    "bounded",
    "child_pids",
    "drive",
    "fd_targets",
    "is_refused",
    "is_stream_transport",
    "kill_children",
    "read_line",
    "read_to_eof",
    "read_until",
    "require",
    "serving",
    "start",
    "stop",
    "transport_needs",
]

#: Seconds any client call or wait may take before the scenario fails.
TIMEOUT = 10.0
#: Client threads driving the many-connections scenarios: enough for requests to overlap.
CLIENT_THREADS = 4


# --------------------------------------------------------------------------- the platform


def _has_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


FEATURES: dict[str, bool] = {
    "ipv6": _has_ipv6(),
    "af_unix": hasattr(socket, "AF_UNIX"),
    "fork": hasattr(os, "fork"),
    "proc": os.path.isdir("/proc/self/fd"),
}


def require(feature: str) -> None:
    """Skip the test, naming the missing *feature* (``requires_ipv6``), unless present.

    Under ``CI=true`` a missing feature fails the test instead: CI must not pass by
    skipping what it was meant to run.
    """
    if FEATURES[feature]:
        return
    reason = f"requires_{feature}: not available here"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a missing feature fails instead of skipping)")
    pytest.skip(reason)


def transport_needs(transport: Any) -> list[str]:
    """The FEATURES *transport* needs: its address family's, and /proc for the checks."""
    family = sockserve.compose(transport).address_family  # type: ignore[attr-defined]
    needs = ["proc"]
    if family == socket.AF_INET6:
        needs.append("ipv6")
    elif family == getattr(socket, "AF_UNIX", None):
        needs.append("af_unix")
    return needs


def is_stream_transport(transport: Any) -> bool:
    """*transport* is connection-oriented (anything but SOCK_DGRAM)."""
    return sockserve.compose(transport).socket_type != socket.SOCK_DGRAM  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- the subject


def _identity(sock: socket.socket) -> socket.socket:
    return sock


@attrs.define
class Subject:
    """What a scenario runs: a transport, a strategy (and mixins), layers, options.

    :ivar session: the client's side of the layers, called on each connected stream
        socket before the request is sent (a TLS client wraps it here); returns the socket
        to use.
    """

    transport: Any
    strategy: Any = "sync"
    mixins: tuple[type, ...] = ()
    layers: tuple[Any, ...] = ()
    options: dict[str, Any] = attrs.field(factory=dict)
    session: Callable[[socket.socket], socket.socket] = _identity
    #: Where Unix sockets go (a short directory of its own: AF_UNIX paths are short).
    directory: Path = attrs.field(factory=lambda: Path(tempfile.mkdtemp(prefix="kit-")))

    def server_class(
        self, *, layers: Sequence[Any] = (), plugins: Sequence[object] = (), **options: Any
    ) -> type:
        """The composed class: the subject's parts, plus *layers*, *plugins* and *options*."""
        return sockserve.compose(
            self.transport, self.strategy, mixins=self.mixins,
            layers=(*self.layers, *layers), plugins=plugins,
            options={**self.options, **options},
        )

    def address(self, cls: type) -> Any:
        """A bindable address for *cls*: loopback port 0, or a fresh path for AF_UNIX."""
        family = cls.address_family  # type: ignore[attr-defined]
        if family == socket.AF_INET:
            return ("127.0.0.1", 0)
        if family == socket.AF_INET6:
            return ("::1", 0)
        return str(self.directory / f"s{time.monotonic_ns() % 10**9}.sock")

    def make(self, cls: type, handler: type) -> Any:
        """A server of *cls* on a fresh address, handled by *handler*."""
        return cls(self.address(cls), handler)

    def check_platform(self) -> None:
        """Skip (``require``) when the transport needs what is missing here."""
        for feature in transport_needs(self.transport):
            require(feature)

    def is_stream(self) -> bool:
        """The transport is connection-oriented (anything but SOCK_DGRAM)."""
        return is_stream_transport(self.transport)

    def connect(self, server: Any, *, session: bool = True) -> socket.socket:
        """A client connected to *server*: through ``session`` for stream transports
        (unless not *session*), bound to a path of its own for Unix datagrams (to get a
        reply)."""
        client = socket.socket(server.address_family, server.socket_type)
        try:
            client.settimeout(TIMEOUT)
            if server.socket_type == socket.SOCK_DGRAM and server.address_family == getattr(
                socket, "AF_UNIX", None
            ):
                client.bind(str(self.directory / f"c{time.monotonic_ns() % 10**9}.sock"))
            client.connect(server.server_address)
            if session and server.socket_type != socket.SOCK_DGRAM:
                client = self.session(client)
        except BaseException:
            client.close()
            raise
        return client

    def cleanup(self) -> None:
        """Remove the directory for Unix sockets (and what is left in it)."""
        for path in self.directory.iterdir():
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            self.directory.rmdir()


# --------------------------------------------------------------------------- reading


def read_line(sock: Any) -> bytes:
    """Bytes up to the first newline, or to EOF (at most 64 KiB).

    Reads whole chunks (no ``MSG_PEEK``: a TLS socket refuses flags): the kit's clients
    send one line and then wait, so nothing after the newline is lost.
    """
    data = b""
    while b"\n" not in data and len(data) < 65536:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def read_until(sock: Any, marker: bytes) -> bytes:
    """Bytes received until *marker* has arrived (or EOF), all of them."""
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def read_to_eof(sock: Any) -> bytes:
    """Everything received on stream socket *sock* until the peer ends it."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def fd_targets() -> dict[int, str]:
    """This process's descriptors and what each is (``socket:[1234]``, ``pipe:[5]``)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return found


# --------------------------------------------------------------------------- running it


def bounded(func: Callable[[], Any], timeout: float = TIMEOUT * 3, what: str = "") -> float:
    """Call *func* in a helper thread; return the seconds it took, failing if it hangs."""
    outcome: list[BaseException] = []

    def target() -> None:
        try:
            func()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome.append(exc)

    thread = threading.Thread(target=target, name="kit-bounded", daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(timeout)
    took = time.monotonic() - started
    assert not thread.is_alive(), f"{what or func} did not return within {timeout}s"
    if outcome:
        raise outcome[0]
    return took


def start(server: Any, poll_interval: float = 0.05) -> threading.Thread:
    """Run ``server.serve_forever(poll_interval)`` in a daemon thread; return the thread."""
    thread = threading.Thread(
        target=server.serve_forever, args=(poll_interval,), name="kit-serve", daemon=True
    )
    thread.start()
    return thread


def stop(server: Any, thread: threading.Thread, timeout: float = TIMEOUT * 3) -> None:
    """``shutdown()``, join the serving thread and ``server_close()``, each bounded."""
    try:
        bounded(server.shutdown, timeout, "shutdown()")
        thread.join(timeout)
        assert not thread.is_alive(), f"serve_forever did not return within {timeout}s"
    finally:
        bounded(server.server_close, timeout, "server_close()")


@contextlib.contextmanager
def serving(server: Any, poll_interval: float = 0.05) -> Iterator[Any]:
    """Serve in a thread for the ``with`` block; then stop and close (bounded)."""
    thread = start(server, poll_interval)
    try:
        yield server
    finally:
        stop(server, thread)


def ask(subject: Subject, server: Any, payload: bytes) -> bytes:
    """One request: send *payload*; the reply (stream: up to EOF; datagram: one)."""
    with subject.connect(server) as client:
        client.sendall(payload)
        if server.socket_type == socket.SOCK_DGRAM:
            return client.recv(65536)
        try:
            return read_to_eof(client)
        except ConnectionResetError:
            return b""


def drive(count: int, worker: Callable[[range], list[Any]]) -> list[Any]:
    """Run *worker* over CLIENT_THREADS interleaved slices of range(count); join them.

    Each worker returns its failures; the combined list is returned.
    """
    failures: list[Any] = []

    def run(k: int) -> None:
        try:
            failures.extend(worker(range(k, count, CLIENT_THREADS)))
        except BaseException as exc:  # a failure, not lost in the thread
            failures.append(("client thread", repr(exc)))

    threads = [threading.Thread(target=run, args=(k,), name=f"kit-client-{k}")
               for k in range(CLIENT_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 9)
    assert not any(t.is_alive() for t in threads), "client threads did not finish"
    return failures


@contextlib.contextmanager
def access_log_to(path: Path) -> Iterator[Path]:
    """Write the ``access-log`` plugin's lines (logger ``sockserve.access``) to *path*.

    A file handler, so that lines written in forked workers arrive too; removed on exit.
    """
    logger = logging.getLogger("sockserve.access")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


# --------------------------------------------------------------------------- what a process holds


def child_pids() -> set[int]:
    """Process ids of this process's children (live or zombie), from /proc."""
    me = os.getpid()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces; the fields after the last ')' are fixed.
        if int(stat[stat.rindex(b")") + 2:].split()[1]) == me:
            found.add(int(entry))
    return found


def kill_children(pids: set[int]) -> None:
    """SIGKILL and reap *pids* (children a failed scenario left behind)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


@attrs.frozen
class Holdings:
    """What this process holds: descriptors, the number of threads, child processes."""

    fds: dict[int, str]
    threads: int
    children: frozenset[int]

    @classmethod
    def now(cls) -> Holdings:
        return cls(fd_targets(), threading.active_count(), frozenset(child_pids()))

    def left_over(self, settle: float = 5.0) -> list[str]:
        """What is held now and was not then, waiting up to *settle* seconds for it to go."""
        deadline = time.monotonic() + settle
        while True:
            now = Holdings.now()
            extra = []
            if len(now.fds) > len(self.fds):
                new = {fd: t for fd, t in now.fds.items() if self.fds.get(fd) != t}
                extra.append(f"{len(now.fds) - len(self.fds)} more descriptors: {new}")
            if now.threads > self.threads:
                extra.append(f"{now.threads - self.threads} more threads: {threading.enumerate()}")
            if now.children - self.children:
                extra.append(f"child processes left: {sorted(now.children - self.children)}")
            if not extra or time.monotonic() > deadline:
                return extra
            time.sleep(0.02)


def is_refused(exc: OSError) -> bool:
    """A connect() that found nobody listening."""
    return isinstance(exc, (ConnectionRefusedError, FileNotFoundError)) or exc.errno in (
        errno.ECONNREFUSED, errno.ENOENT
    )
