"""The systemd plugin: sd_notify READY / STOPPING / WATCHDOG to a NOTIFY_SOCKET receiver.

The receiver is what systemd is: a SOCK_DGRAM Unix socket (a file in tmp_path, or an
abstract name) with SO_PASSCRED, so that each message comes with the sender's pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

import sockserve
from sockserve.plugins._systemd import SYSTEMD, describe_address
from sockserve.transports._systemd import notify, watchdog_interval
from support import EchoUpper, exchange, requires_af_unix, requires_fork, script_path, serving, terminate

pytestmark = requires_af_unix

_UCRED = struct.Struct("iII")  # pid, uid, gid


class Receiver:
    """A NOTIFY_SOCKET: collects (sender pid, message) pairs."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.messages: list[tuple[int, str]] = []

    def collect(self, seconds: float) -> list[tuple[int, str]]:
        """Receive for *seconds*; return everything received so far."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except TimeoutError:
                break
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(payload[:_UCRED.size])[0]
            self.messages.append((pid, data.decode()))
        return self.messages

    def wait_for(self, text: str, timeout: float = 10.0) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid, message in self.messages:
                if text in message.splitlines():
                    return pid, message
            self.collect(0.05)
        raise AssertionError(f"no {text!r} within {timeout} s; received {self.messages}")

    def texts(self) -> list[str]:
        return [m for _, m in self.messages]

    def count(self, line: str) -> int:
        return sum(line in m.splitlines() for m in self.texts())


@pytest.fixture
def receiver(tmp_path, monkeypatch) -> Iterator[Receiver]:
    path = str(tmp_path / "notify")
    r = Receiver(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield r
    finally:
        r.sock.close()


def notify_class(concurrency: str = "threading") -> type:
    return sockserve.compose("tcp", concurrency, plugins=[SYSTEMD])


def test_ready_with_the_address_watchdog_at_the_interval_and_stopping_under_threading(receiver, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    server = notify_class()(("127.0.0.1", 0), EchoUpper)
    with serving(server, poll_interval=0.02):
        pid, ready = receiver.wait_for("READY=1")
        assert pid == os.getpid()
        assert f"STATUS=serving on 127.0.0.1:{server.server_address[1]}" in ready.splitlines()
        start = len(receiver.messages)
        receiver.collect(0.5)
        pings = sum(m == "WATCHDOG=1" for _, m in receiver.messages[start:])
        assert 3 <= pings <= 6, f"WATCHDOG_USEC=200000 asks for a ping every 0.1 s; got {pings} in 0.5 s"
        assert exchange(server, b"hi") == b"HI"
        assert receiver.count("STOPPING=1") == 0
    receiver.wait_for("STOPPING=1")
    receiver.collect(0.2)
    assert receiver.count("READY=1") == 1
    assert receiver.count("STOPPING=1") == 1
    assert receiver.texts().index(next(m for m in receiver.texts() if "STOPPING=1" in m)) > 0
    assert not any(m == "WATCHDOG=1" for m in receiver.texts()[receiver.texts().index(
        next(m for m in receiver.texts() if "STOPPING=1" in m)):]), "no ping once stopping"


def test_a_server_that_never_served_says_nothing(receiver):
    notify_class()(("127.0.0.1", 0), EchoUpper).server_close()
    assert receiver.collect(0.2) == []


def test_abstract_notify_socket(monkeypatch):
    name = f"sockserve-notify-{uuid.uuid4().hex}"
    r = Receiver("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1") is True
        assert r.collect(0.2)[0][1] == "READY=1"
    finally:
        r.sock.close()


def test_no_watchdog_without_watchdog_usec_or_for_another_pid(receiver, monkeypatch):
    for env in ({}, {"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        server = notify_class()(("127.0.0.1", 0), EchoUpper)
        with serving(server, poll_interval=0.02):
            receiver.wait_for("READY=1")
            receiver.collect(0.3)
        assert "WATCHDOG=1" not in receiver.texts(), env
        receiver.messages.clear()


def test_watchdog_interval_reads_the_variables(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    assert watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 1.5
    for usec in ("0", "", "x", "-5"):
        monkeypatch.setenv("WATCHDOG_USEC", usec)
        assert watchdog_interval() is None


@pytest.mark.parametrize("value", [None, "", "relative/path", "vsock:2:1234"])
def test_no_notify_socket_is_not_an_error(value, monkeypatch):
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert notify("READY=1") is False
    server = notify_class()(("127.0.0.1", 0), EchoUpper)
    with serving(server):
        assert exchange(server, b"ok") == b"OK"


def test_a_dead_or_missing_receiver_is_not_an_error(tmp_path, monkeypatch):
    dead = tmp_path / "dead"
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).bind(str(dead))  # closed: nobody reads
    for path in (dead, tmp_path / "missing", tmp_path):
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("READY=1") is False
        server = notify_class()(("127.0.0.1", 0), EchoUpper)
        with serving(server):
            assert exchange(server, b"ok") == b"OK"


def test_describe_address():
    assert describe_address(("127.0.0.1", 80)) == "127.0.0.1:80"
    assert describe_address(("::1", 80, 0, 0)) == "[::1]:80"
    assert describe_address("/run/app.sock") == "unix:/run/app.sock"
    assert describe_address(b"\0app") == "unix:@app"


# ----------------------------------------------------------------- prefork: the supervisor only


@contextlib.contextmanager
def notify_server(receiver_path: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    env = {**os.environ, "NOTIFY_SOCKET": receiver_path, "WATCHDOG_USEC": "200000"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, script_path("notify_server.py"), *args], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port, pid = map(int, proc.stdout.readline().split())
        assert pid == proc.pid
        yield proc, port
    finally:
        terminate(proc, grace=15, reap=10)
        if proc.stdout is not None:
            proc.stdout.close()


def ask_pid(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"pid\n")
        return int(client.makefile().readline())


@requires_fork
def test_under_prefork_only_the_supervisor_notifies(receiver):
    path = os.environ["NOTIFY_SOCKET"]
    with notify_server(path, "prefork", "2") as (proc, port):
        pid, ready = receiver.wait_for("READY=1")
        assert pid == proc.pid
        assert f"STATUS=serving on 127.0.0.1:{port}" in ready.splitlines()
        workers = {ask_pid(port) for _ in range(8)}
        assert proc.pid not in workers, "the workers answer"
        start = len(receiver.messages)
        receiver.collect(0.5)
        pings = sum(m == "WATCHDOG=1" for _, m in receiver.messages[start:])
        assert pings >= 3, f"got {pings} pings in 0.5 s"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0
    receiver.wait_for("STOPPING=1")
    receiver.collect(0.2)
    assert receiver.count("READY=1") == 1, receiver.messages
    assert receiver.count("STOPPING=1") == 1
    senders = {pid for pid, _ in receiver.messages}
    assert senders == {proc.pid}, f"only the supervisor notifies; senders {senders}, workers {workers}"
