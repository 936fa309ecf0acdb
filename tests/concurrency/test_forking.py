"""ForkingMixIn: a child process per request, reaped while serving and on close."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import pytest

import sockserve
from support import child_pids, connect, no_leaks, read_to_eof, requires_fork, serving, wait_until

pytestmark = [requires_fork, pytest.mark.requires_fork]

LOOPBACK = ("127.0.0.1", 0)


def is_zombie(pid: int) -> bool:
    """True once *pid* has exited and waits to be reaped."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2:].split()[0] == b"Z"


class ReplyPid(sockserve.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"%d %d" % (os.getpid(), os.getppid()))


class Recording(sockserve.ForkingTCPServer):
    """Records, in the parent, the pid of each child it forks.

    A child that ever came back out of ``ForkingMixIn.process_request`` would leave a
    marker file in ``marker_dir`` and exit with status 3.
    """

    marker_dir = None

    def __init__(self, *args):
        self.parent_pid = os.getpid()
        self.forked: list[int] = []
        super().__init__(*args)

    def process_request(self, request, client_address):
        before = set(self.active_children or ())
        super().process_request(request, client_address)
        if os.getpid() != self.parent_pid:
            # Only a child that returned into the parent's loop gets here.
            (self.marker_dir / f"returned-{os.getpid()}").write_text("came back")
            os._exit(3)
        self.forked.extend(set(self.active_children) - before)


@pytest.fixture
def exit_codes(monkeypatch):
    """pid -> exit code of every child the server reaps, as its own os.waitpid saw it."""
    codes: dict[int, int] = {}
    real_waitpid = os.waitpid

    def recording_waitpid(pid, options):
        reaped, status = real_waitpid(pid, options)
        if reaped:
            codes[reaped] = os.waitstatus_to_exitcode(status)
        return reaped, status

    monkeypatch.setattr(os, "waitpid", recording_waitpid)
    return codes


def test_each_request_is_handled_in_a_new_child_process(tmp_path):
    with no_leaks():
        with serving(Recording(LOOPBACK, ReplyPid)) as server:
            server.marker_dir = tmp_path
            replies = []
            for _ in range(4):
                with connect(server) as client:
                    replies.append(tuple(map(int, read_to_eof(client).split())))
    pids = [pid for pid, _ in replies]
    assert len(set(pids)) == 4
    assert os.getpid() not in pids
    assert {ppid for _, ppid in replies} == {os.getpid()}
    assert sorted(server.forked) == sorted(pids)
    assert list(tmp_path.iterdir()) == []


def test_service_actions_reap_exited_children_while_serving():
    seen: list[int] = []

    class Tracking(sockserve.ForkingTCPServer):
        def process_request(self, request, client_address):
            super().process_request(request, client_address)
            seen.append(len(self.active_children))

    with no_leaks():
        with serving(Tracking(LOOPBACK, ReplyPid)) as server:
            pids = []
            for _ in range(3):
                with connect(server) as client:
                    pids.append(int(read_to_eof(client).split()[0]))
            assert len(seen) == 3, "process_request did not run once per request"
            assert all(seen), "forked children were not tracked in active_children"
            # Still serving: service_actions must empty it without any new request.
            assert wait_until(lambda: not server.active_children)
            assert not set(pids) & child_pids(), "children exited but were left as zombies"
    assert server.active_children == set()


def test_handle_timeout_reaps_exited_children():
    timeouts: list[float] = []

    class Timing(sockserve.ForkingTCPServer):
        timeout = 0.1

        def handle_timeout(self):
            timeouts.append(time.monotonic())
            super().handle_timeout()

    with no_leaks():
        with Timing(LOOPBACK, ReplyPid) as server:
            with connect(server) as client:
                server.handle_request()
                child = int(read_to_eof(client).split()[0])
            assert server.active_children == {child}
            assert wait_until(lambda: is_zombie(child))
            server.handle_request()  # nobody connects: times out
            assert len(timeouts) == 1
            assert server.active_children == set()
            assert child not in child_pids()


def test_max_children_bounds_the_children_running_at_once():
    """Four waiting clients, at most two children: handler run times overlap two deep."""
    running: list[int] = []

    class Timed(sockserve.BaseRequestHandler):
        def handle(self):
            start = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes
            time.sleep(0.5)
            self.request.sendall(b"%r %r" % (start, time.monotonic()))

    class Limited(sockserve.ForkingTCPServer):
        max_children = 2

        def process_request(self, request, client_address):
            super().process_request(request, client_address)
            running.append(len(self.active_children))

    with no_leaks():
        with serving(Limited(LOOPBACK, Timed)) as server:
            clients = [connect(server) for _ in range(4)]
            try:
                spans = [tuple(map(float, read_to_eof(c).split())) for c in clients]
            finally:
                for client in clients:
                    client.close()
    depth = max(sum(s <= start < e for s, e in spans) for start, _ in spans)
    assert depth == 2
    assert len(running) == 4
    assert max(running) <= 2


def test_server_close_returns_at_once_without_block_on_close(tmp_path):
    class Slow(sockserve.BaseRequestHandler):
        def handle(self):
            # Written whole, then renamed: the test must never read a file half written.
            (tmp_path / "started.tmp").write_text(str(os.getpid()))
            os.replace(tmp_path / "started.tmp", tmp_path / "started")
            time.sleep(0.5)

    class NonBlocking(sockserve.ForkingTCPServer):
        block_on_close = False

    with no_leaks():
        with serving(NonBlocking(LOOPBACK, Slow)) as server:
            with connect(server):
                assert wait_until((tmp_path / "started").exists)
                child = int((tmp_path / "started").read_text())
                server.shutdown()
                begin = time.monotonic()
                server.server_close()
                elapsed = time.monotonic() - begin
                assert child in child_pids() and not is_zombie(child)
                # Ours to reap now.
                assert wait_until(lambda: os.waitpid(child, os.WNOHANG)[0] == child)
    assert elapsed < 0.5


class Crash(Exception):
    pass


@pytest.mark.parametrize("exc_type", [Crash, SystemExit, KeyboardInterrupt])
def test_a_child_that_raises_exits_1_and_never_returns_into_the_loop(
    exc_type, tmp_path, capfd, exit_codes
):
    """The child reports an Exception via handle_error; the parent serves on."""

    class MaybeRaise(sockserve.BaseRequestHandler):
        def handle(self):
            if self.request.recv(16) == b"raise":
                raise exc_type("raised in the child")
            ReplyPid.handle(self)

    class Reporting(Recording):
        def handle_error(self, request, client_address):
            print(f"handle_error in pid {os.getpid()}", file=sys.stderr)
            super().handle_error(request, client_address)

    with no_leaks():
        with serving(Reporting(LOOPBACK, MaybeRaise)) as server:
            server.marker_dir = tmp_path
            with connect(server) as client:
                client.sendall(b"raise")
                assert read_to_eof(client) == b""
                raiser_address = client.getsockname()
            replies = []
            for _ in range(3):
                with connect(server) as client:
                    client.sendall(b"hello")
                    replies.append(tuple(map(int, read_to_eof(client).split())))
            raiser = server.forked[0]
            assert wait_until(lambda: raiser in exit_codes)  # reaped while serving
    assert exit_codes[raiser] == 1
    # Every later request was forked by the test process itself, not by a stray child.
    assert [ppid for _, ppid in replies] == [os.getpid()] * 3
    assert raiser not in [pid for pid, _ in replies]
    assert list(tmp_path.iterdir()) == []
    err = capfd.readouterr().err
    if exc_type is Crash:
        assert err.count(f"handle_error in pid {raiser}\n") == 1
        assert (
            f"Exception occurred during processing of request from {raiser_address!r}" in err
        )
        assert err.count("Crash: raised in the child") == 1
    else:
        assert "handle_error" not in err
        assert "Exception occurred" not in err


def test_drain_timeout_terminates_then_kills_stuck_children(tmp_path, caplog, exit_codes):
    """At the deadline SIGTERM cuts a child's connection off: its handler returns and it
    exits 0; one that blocks SIGTERM is killed after the grace."""

    class Stuck(sockserve.BaseRequestHandler):
        def handle(self):
            self.request.settimeout(30)  # a bound for the test, far beyond the drain
            kind = self.request.recv(1)
            if kind == b"T":
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            (tmp_path / f"ready-{kind.decode()}-{os.getpid()}").touch()
            self.request.recv(1024)  # the client never sends more

    class Draining(sockserve.ForkingTCPServer):
        drain_timeout = 0.3

    with no_leaks():
        with serving(Draining(LOOPBACK, Stuck)) as server:
            with connect(server) as plain, connect(server) as stubborn:
                plain.sendall(b"N")
                stubborn.sendall(b"T")
                assert wait_until(lambda: len(list(tmp_path.glob("ready-*"))) == 2)
                ready = [p.name.split("-") for p in tmp_path.glob("ready-*")]
                pids = {kind: int(pid) for _, kind, pid in ready}
                server.shutdown()
                with caplog.at_level(logging.WARNING, logger="sockserve"):
                    begin = time.monotonic()
                    server.server_close()
                    elapsed = time.monotonic() - begin
    assert server.requests_cut_off == 2
    assert exit_codes == {pids["N"]: 0, pids["T"]: -signal.SIGKILL}
    assert server.active_children == set()
    # The drain, then the SIGTERM grace (one child ignores SIGTERM), then SIGKILL.
    assert 0.3 + 1.0 <= elapsed < 0.3 + 1.0 + 1.5
    warnings = [r for r in caplog.records if r.name == "sockserve" and r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "Draining: drain deadline of 0.3s passed; terminating 2 child process(es)"
    ]


def test_shutdown_called_in_a_child_stops_neither_the_child_nor_the_parent():
    """A handler calling server.shutdown() in its child returns at once, and the parent's
    loop goes on serving (the child has its own serving state, not the parent's wake-up
    socket). The standard module's child would wait forever on the parent's event."""

    class ShutsDown(sockserve.BaseRequestHandler):
        def handle(self):
            self.server.shutdown()
            self.request.sendall(b"%d" % os.getpid())

    with no_leaks():
        with serving(sockserve.ForkingTCPServer(LOOPBACK, ShutsDown)) as server:
            pids = []
            for _ in range(3):
                with connect(server) as client:
                    pids.append(int(read_to_eof(client)))
            assert os.getpid() not in pids and len(set(pids)) == 3
            # The parent still reaps children while it serves: its loop really turns.
            assert wait_until(lambda: not server.active_children)
            started = time.monotonic()
            server.shutdown()
            assert time.monotonic() - started < 1.0
