"""PreforkMixIn: supervised pre-forked worker processes accepting on the server's socket."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import sockserve
from support import (
    PreforkScript,
    no_stray_children,
    child_pids,
    connect,
    is_running,
    no_leaks,
    proc_stat,
    read_line,
    read_to_eof,
    requires_fork,
    serving,
    skip_unless_supported,
    wait_until,
)

pytestmark = [requires_fork, pytest.mark.requires_fork]

LOOPBACK = ("127.0.0.1", 0)


@pytest.fixture(autouse=True)
def no_stray_workers():
    """Fail, and kill by pid, any worker process a test leaves running."""
    with no_stray_children():
        yield


class PidHandler(sockserve.BaseRequestHandler):
    """Replies ``b"<pid> <LINE>\\n"``; a stream connection is then held until the client's EOF.

    A held connection keeps a ``sync`` worker busy, so the next connection must go to
    another worker: that makes "served by several workers" deterministic.
    """

    def handle(self):
        if isinstance(self.request, tuple):
            data, sock = self.request
            sock.sendto(b"%d %s" % (os.getpid(), data.upper()), self.client_address)
            return
        self.request.settimeout(10)
        line = read_line(self.request).strip()
        if line == b"slow":  # started, then the rest after a while
            self.request.sendall(b"%d start\n" % os.getpid())
            time.sleep(0.5)
            self.request.sendall(b"x" * 200_000 + b"end")
            return
        if line == b"stuck":  # started, then never done
            self.request.sendall(b"%d start\n" % os.getpid())
            time.sleep(30)
            return
        self.request.sendall(b"%d %s\n" % (os.getpid(), line.upper()))
        read_to_eof(self.request)


def hold(server, payload: bytes = b"hi") -> tuple[int, socket.socket]:
    """Open a connection that keeps a worker busy; return the worker's pid and the socket."""
    client = connect(server)
    client.sendall(payload + b"\n")
    pid, text = read_line(client).split()
    assert text == payload.upper()
    return int(pid), client


def release(client: socket.socket) -> None:
    """End a held connection: EOF to the worker, then close.

    Not close() alone: a worker forked while the client socket was open holds a copy
    of it, and the connection would stay open until that worker exits.
    """
    with client:
        client.shutdown(socket.SHUT_WR)
        assert read_to_eof(client) == b""


def ask(server, payload: bytes = b"hi") -> int:
    """One complete request; the pid of the worker that served it."""
    pid, client = hold(server, payload)
    release(client)
    return pid


def worker_pids() -> set[int]:
    """This process's children: the workers of a prefork server serving here."""
    return child_pids()


def wait_for_workers(count: int) -> set[int]:
    """The pids of *count* workers, once all are forked (before clients open sockets)."""
    assert wait_until(lambda: len(worker_pids()) == count), f"workers: {worker_pids()}"
    return worker_pids()


class HookLog:
    """Appends the prefork hooks to a file, from whichever process fires them."""

    def __init__(self, path) -> None:
        self.path = path

    def _write(self, *fields: object) -> None:
        with open(self.path, "a") as f:  # one short O_APPEND write per line
            f.write(" ".join(map(str, fields)) + "\n")

    @sockserve.hookimpl
    def sockserve_pre_fork(self, server, worker_id):
        self._write("pre_fork", os.getpid(), worker_id, server.worker_id)

    @sockserve.hookimpl
    def sockserve_post_fork(self, server, worker_id):
        self._write("post_fork", os.getpid(), worker_id, server.worker_id)

    @sockserve.hookimpl
    def sockserve_worker_exit(self, server, worker_id, status):
        self._write("worker_exit", os.getpid(), worker_id, status)

    def events(self, name: str) -> list[tuple[int, int, str]]:
        """(pid, worker_id, last field) of every *name* line so far."""
        if not self.path.exists():
            return []
        found = []
        for line in self.path.read_text().splitlines():
            event, pid, worker_id, last = line.split()
            if event == name:
                found.append((int(pid), int(worker_id), last))
        return found


@pytest.mark.parametrize("transport", ["tcp", "udp", "unix", "unix-dgram"])
def test_many_concurrent_clients_are_answered_by_workers_not_the_parent(transport, tmp_path):
    skip_unless_supported(transport, "prefork")
    options = {"workers": 2, "request_queue_size": 64}
    cls = sockserve.compose(transport, "prefork", options=options)
    address = LOOPBACK if transport in ("tcp", "udp") else str(tmp_path / "s.sock")

    def client(i: int) -> tuple[int, bytes]:
        with socket.socket(server.address_family, server.socket_type) as sock:
            sock.settimeout(10)
            if transport == "unix-dgram":
                sock.bind(str(tmp_path / f"c{i}.sock"))  # to receive the reply
            sock.connect(server.server_address)
            sock.sendall(b"client %d\n" % i)
            if server.socket_type == socket.SOCK_STREAM:
                sock.shutdown(socket.SHUT_WR)
                reply = read_to_eof(sock)
            else:
                reply = sock.recv(65536)
        pid, text = reply.split(None, 1)
        return int(pid), text

    with no_leaks():
        with serving(cls(address, PidHandler)) as server:
            workers = wait_for_workers(2)
            with ThreadPoolExecutor(max_workers=8) as clients:
                replies = list(clients.map(client, range(30)))
    assert [text for _, text in replies] == [b"CLIENT %d\n" % i for i in range(30)]
    pids = {pid for pid, _ in replies}
    assert os.getpid() not in pids
    assert pids <= workers


def test_a_busy_worker_leaves_the_next_connection_to_another_worker():
    cls = sockserve.compose("tcp", "prefork", options={"workers": 2})
    with no_leaks():
        with serving(cls(LOOPBACK, PidHandler)) as server:
            workers = wait_for_workers(2)
            first, a = hold(server)
            second, b = hold(server)  # the first worker is busy: only the other can take it
            release(a)
            release(b)
            assert first != second
            assert {first, second} == workers
            assert os.getpid() not in workers


def test_inner_threadpool_serves_concurrent_requests_in_one_worker():
    cls = sockserve.compose(
        "tcp", "prefork", options={"workers": 1, "inner": "threadpool", "threads": 4, "backlog": 2}
    )
    with no_leaks():
        with serving(cls(LOOPBACK, PidHandler)) as server:
            workers = wait_for_workers(1)
            held = [hold(server, b"c%d" % i) for i in range(4)]  # four at once in one process
            for _, client in held:
                release(client)
            assert {pid for pid, _ in held} == workers
            assert ask(server) in workers


def test_killed_worker_is_replaced_and_its_exit_reported(tmp_path):
    log = HookLog(tmp_path / "hooks.log")
    cls = sockserve.compose("tcp", "prefork", plugins=[log], options={"workers": 2})
    with no_leaks():
        with serving(cls(LOOPBACK, PidHandler)) as server:
            assert wait_until(lambda: len(log.events("post_fork")) == 2)
            slots = {pid: slot for pid, slot, _ in log.events("post_fork")}
            victim, survivor = sorted(slots)
            os.kill(victim, signal.SIGKILL)
            assert wait_until(lambda: log.events("worker_exit"))
            assert log.events("worker_exit") == [(os.getpid(), slots[victim], "-9")]
            assert ask(server) == survivor  # meanwhile
            # A worker that dies young is replaced after RESPAWN_DELAY (1 s).
            assert wait_until(lambda: len(worker_pids()) == 2 and victim not in worker_pids())
            (replacement,) = worker_pids() - {survivor}
            assert wait_until(lambda: len(log.events("post_fork")) == 3)
            assert log.events("post_fork")[-1][:2] == (replacement, slots[victim])
            first, a = hold(server)
            second, b = hold(server)
            release(a)
            release(b)
            assert {first, second} == {survivor, replacement}


@pytest.mark.parametrize("inner", ["sync", "threadpool"])
def test_max_requests_recycles_workers(inner, tmp_path):
    log = HookLog(tmp_path / "hooks.log")
    options = {"workers": 1, "max_requests": 3, "inner": inner}
    if inner == "threadpool":
        options["threads"] = 2
    cls = sockserve.compose("tcp", "prefork", plugins=[log], options=options)
    with no_leaks():
        with serving(cls(LOOPBACK, PidHandler)) as server:
            wait_for_workers(1)
            pids = [ask(server, b"r%d" % i) for i in range(7)]
            assert wait_until(lambda: len(log.events("post_fork")) == 3)
    first, second, third = pids[0], pids[3], pids[6]
    assert pids == [first] * 3 + [second] * 3 + [third]
    assert len({first, second, third}) == 3
    # The recycled workers exited cleanly (0); the third was stopped with the server.
    assert [status for _, _, status in log.events("worker_exit")] == ["0", "0", "0"]


def test_fork_hooks_fire_with_worker_ids_in_parent_and_child(tmp_path):
    log = HookLog(tmp_path / "hooks.log")
    cls = sockserve.compose("tcp", "prefork", plugins=[log], options={"workers": 3})
    with no_leaks():
        with serving(cls(LOOPBACK, PidHandler)) as server:
            assert wait_until(lambda: len(log.events("post_fork")) == 3)
            workers = worker_pids()
            assert ask(server) in workers
    parent = os.getpid()
    assert log.events("pre_fork") == [(parent, 0, "None"), (parent, 1, "None"), (parent, 2, "None")]
    post = log.events("post_fork")
    assert sorted(slot for _, slot, _ in post) == [0, 1, 2]
    assert {pid for pid, _, _ in post} == workers  # in the children, one each
    assert all(server_worker_id == str(slot) for _, slot, server_worker_id in post)
    assert sorted(slot for _, slot, _ in log.events("worker_exit")) == [0, 1, 2]


def test_shutdown_completes_in_flight_requests_and_reaps_every_worker(tmp_path):
    log = HookLog(tmp_path / "hooks.log")
    cls = sockserve.compose("tcp", "prefork", plugins=[log], options={"workers": 2})
    with no_leaks():
        server = cls(LOOPBACK, PidHandler)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        try:
            wait_for_workers(2)
            client = connect(server)
            with client:
                client.sendall(b"slow\n")
                assert read_line(client).endswith(b" start\n")  # the request is in flight
                stopper.start()
                rest = read_to_eof(client)
            stopper.join(10)
            assert not stopper.is_alive()
            assert worker_pids() == set()  # shutdown() returned after reaping them all
        finally:
            if stopper.ident is None:
                server.shutdown()
            thread.join(10)
            server.server_close()
    assert rest == b"x" * 200_000 + b"end"
    assert sorted(log.events("worker_exit")) == [(os.getpid(), 0, "0"), (os.getpid(), 1, "0")]
    assert server.requests_cut_off == 0


def test_stuck_worker_is_killed_at_the_drain_deadline(tmp_path, caplog):
    log = HookLog(tmp_path / "hooks.log")
    caplog.set_level(logging.WARNING, logger="sockserve")
    options = {"workers": 2, "drain_timeout": 0.5}
    cls = sockserve.compose("tcp", "prefork", plugins=[log], options=options)
    with no_leaks():
        with serving(cls(LOOPBACK, PidHandler)) as server:
            # Both workers ready (post_fork fires once their signal handlers are set).
            assert wait_until(lambda: len(log.events("post_fork")) == 2)
            client = connect(server)
            with client:
                client.sendall(b"stuck\n")
                stuck = int(read_line(client).split()[0])
                started = time.monotonic()
                server.shutdown()
                stopped_in = time.monotonic() - started
                try:
                    rest = read_to_eof(client)
                except ConnectionResetError:
                    rest = b""
    assert 0.45 <= stopped_in < 3.0
    assert rest == b""
    assert not is_running(stuck)
    statuses = {status for _, _, status in log.events("worker_exit")}
    assert statuses == {"-9", "0"}  # the stuck one killed, the idle one stopped cleanly
    assert server.requests_cut_off == 1
    assert "drain deadline of 0.5s passed; killing 1 process(es)" in caplog.text


#: Seconds every child forked in this process sleeps first, while a test sets it: widens
#: the moment between a worker's fork and the set-up of its signal handlers.
_child_start_delay = 0.0
_delay_registered = False


def _delay_child_start() -> None:
    if _child_start_delay:
        time.sleep(_child_start_delay)


@pytest.fixture
def slow_child_start():
    global _child_start_delay, _delay_registered
    if not _delay_registered:  # at-fork handlers cannot be removed: a no-op when 0
        os.register_at_fork(after_in_child=_delay_child_start)
        _delay_registered = True
    _child_start_delay = 0.3
    yield
    _child_start_delay = 0.0


def test_worker_stopped_before_it_is_ready_still_exits_cleanly(tmp_path, slow_child_start):
    """A stop that reaches a worker before it has set up its SIGTERM handler is still graceful."""
    log = HookLog(tmp_path / "hooks.log")
    cls = sockserve.compose("tcp", "prefork", plugins=[log], options={"workers": 2})
    with no_leaks():
        with serving(cls(LOOPBACK, PidHandler)):
            wait_for_workers(2)  # forked, still starting up
        assert worker_pids() == set()
    assert sorted(log.events("worker_exit")) == [(os.getpid(), 0, "0"), (os.getpid(), 1, "0")]


class SocketReport(sockserve.BaseRequestHandler):
    """Replies ``b"<pid> <inode> <SO_REUSEPORT> <LINE>"``: the worker, the inode of the
    socket it received the request on (the listening or datagram socket) and that
    socket's SO_REUSEPORT option."""

    def handle(self):
        if isinstance(self.request, tuple):
            data, sock = self.request
        else:
            self.request.settimeout(10)
            data, sock = read_line(self.request), self.server.socket
        inode = os.fstat(sock.fileno()).st_ino
        reuse = sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        reply = b"%d %d %d %s" % (os.getpid(), inode, reuse, data.strip().upper())
        if isinstance(self.request, tuple):
            sock.sendto(reply, self.client_address)
        else:
            self.request.sendall(reply)


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_reuse_port_gives_every_worker_its_own_socket(transport, tmp_path):
    options = {"workers": 2, "reuse_port": True}
    cls = sockserve.compose(transport, "prefork", options=options)
    inodes: dict[int, set[int]] = {}
    options_seen = set()
    with no_leaks():
        with serving(cls(LOOPBACK, SocketReport)) as server:
            workers = wait_for_workers(2)
            # The kernel spreads connections (and datagram flows) over the workers'
            # sockets by a hash of the client's address: 40 clients reach both, once
            # both have made their socket (a worker that runs may not have yet: up to
            # 200 clients, until both answered).
            for i in range(200):
                if i >= 40 and len(inodes) == 2:
                    break
                with connect(server) as client:
                    client.sendall(b"c%d\n" % i)
                    if transport == "tcp":
                        client.shutdown(socket.SHUT_WR)
                        reply = read_to_eof(client)
                    else:
                        reply = client.recv(65536)
                pid, inode, reuse, text = reply.split()
                assert text == b"C%d" % i
                inodes.setdefault(int(pid), set()).add(int(inode))
                options_seen.add(int(reuse))
            assert worker_pids() == workers  # no worker failed and was replaced
            parent_socket = server.socket.fileno()
            parent_inode = os.fstat(parent_socket).st_ino if parent_socket != -1 else None
    assert set(inodes) == workers
    # One socket per worker, each its own (not the parent's, shared by a fork) ...
    assert sorted(len(own) for own in inodes.values()) == [1, 1]
    worker_inodes = set().union(*inodes.values())
    assert len(worker_inodes) == 2
    assert parent_inode not in worker_inodes
    # ... and each with SO_REUSEPORT set (a non-zero option value).
    assert 0 not in options_seen and options_seen


def test_reuse_port_is_refused_for_unix_sockets(tmp_path):
    cls = sockserve.compose("unix", "prefork", options={"reuse_port": True})
    path = tmp_path / "s.sock"
    with no_leaks():
        with pytest.raises(sockserve.OptionError) as info:
            cls(str(path), PidHandler)
    assert str(info.value) == (
        "bad value True for option 'reuse_port': SO_REUSEPORT needs an inet transport"
    )
    assert (info.value.key, info.value.value) == ("reuse_port", True)
    assert not path.exists()


# ----------------------------------------------------------------- a server in its own process


def _parent_of(pid: int) -> int:
    fields = proc_stat(pid)
    return 0 if fields is None else int(fields[1])


@pytest.fixture
def server_process():
    """Start ``PreforkScript`` servers (ready: port and workers known); close them at the
    end and fail if any worker outlived its server."""
    started: list[PreforkScript] = []

    def start() -> PreforkScript:
        process = PreforkScript()
        started.append(process)
        process.wait_ready()
        return process

    yield start
    survivors = [pid for process in started for pid in process.close()]
    assert not survivors, f"worker processes outlived their server: {survivors}"


def test_workers_exit_when_their_parent_is_killed(server_process):
    server = server_process()
    assert all(_parent_of(pid) == server.proc.pid for pid in server.workers)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(b"hi")
        assert read_to_eof(client).startswith(b"start\ndone ")
    os.kill(server.proc.pid, signal.SIGKILL)
    assert server.proc.wait(10) == -signal.SIGKILL
    # Each worker notices within its poll interval (0.5 s) that its parent is gone.
    assert wait_until(lambda: not any(map(is_running, server.workers)), timeout=3.0), (
        f"orphaned workers still running: {[p for p in server.workers if is_running(p)]}"
    )


def test_sigterm_stops_a_server_serving_in_its_main_thread_gracefully(server_process):
    server = server_process()
    assert server.signal_during_a_request(signal.SIGTERM) in server.workers
    assert server.proc.wait(10) == 0
    assert server.readline() == "stopped"
    assert not any(map(is_running, server.workers))
