"""Test helpers: servers on loopback or in a temporary directory, clients, leak checks.

Imported by tests as ``support`` (``pythonpath = tests`` in pyproject.toml)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import sockserve

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


HAS_IPV6 = _has_ipv6()
requires_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="requires_fork: no os.fork")
requires_af_unix = pytest.mark.skipif(
    not hasattr(socket, "AF_UNIX"), reason="requires_af_unix: no AF_UNIX"
)
requires_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="requires_ipv6: no IPv6 loopback")


def address_for(transport: str, tmp_path: Any) -> Any:
    """A bindable address for *transport*: loopback port 0 or a path in *tmp_path*."""
    if transport in ("tcp", "udp"):
        return ("127.0.0.1", 0)
    if transport in ("tcp6", "udp6"):
        return ("::1", 0)
    return str(tmp_path / f"{transport}.sock")


def skip_unless_supported(transport: str, concurrency: str) -> None:
    if transport in ("tcp6", "udp6") and not HAS_IPV6:
        pytest.skip("requires_ipv6: no IPv6 loopback")
    if transport.startswith("unix") and not hasattr(socket, "AF_UNIX"):
        pytest.skip("requires_af_unix: no AF_UNIX")
    if concurrency in ("forking", "prefork") and not hasattr(os, "fork"):
        pytest.skip("requires_fork: no os.fork")


@contextlib.contextmanager
def serving(server: Any, poll_interval: float = 0.05) -> Iterator[Any]:
    """Run ``server.serve_forever`` in a thread; shut down, join and close on exit."""
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
        assert not thread.is_alive(), "serve_forever did not stop"


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


def exchange(server: Any, payload: bytes, tmp_path: Any = None) -> bytes:
    """Send *payload* and return the whole reply (stream: until EOF; datagram: one)."""
    with connect(server, tmp_path) as client:
        client.sendall(payload)
        if server.socket_type == socket.SOCK_STREAM:
            client.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := client.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)
        return client.recv(65536)


class EchoUpper(sockserve.BaseRequestHandler):
    """Upper-case echo for both socket types: stream reads to EOF, datagram one packet."""

    def handle(self) -> None:
        if isinstance(self.request, tuple):
            data, sock = self.request
            sock.sendto(data.upper(), self.client_address)
            return
        chunks = []
        while chunk := self.request.recv(65536):
            chunks.append(chunk)
        self.request.sendall(b"".join(chunks).upper())


# ----------------------------------------------------------------- resource accounting


def open_fds() -> set[int]:
    """Descriptors open in this process."""
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def child_pids() -> set[int]:
    """Process ids of this process's children (live or zombie)."""
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
        # The command name may contain spaces; fields after the last ')' are fixed.
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[1]) == me:
            found.add(int(entry))
    return found


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
