"""Idle and slow clients: threadpool and prefork hand a stream connection to a worker only
once it is readable (``BaseServer.when_readable``). Until its first byte a connection waits
in the serve loop's poller, holding a descriptor and no thread; a silent one is closed at
``first_byte_timeout`` (issue 9, item 4).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import ExitStack

import pytest

import sockserve
from support import (
    closed_by_server,
    no_leaks,
    read_to_eof,
    requires_fork,
    serving,
    tcp_client,
    wait_until,
)

LOOPBACK = ("127.0.0.1", 0)


class EchoUpper(sockserve.StreamRequestHandler):
    """Answers one line, upper-cased, then closes."""

    def handle(self) -> None:
        self.wfile.write(self.rfile.readline().upper())


class Events:
    """Counts request_finish and request_denied (by reason), from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.finished = 0
        self.denied: dict[str, int] = {}

    @sockserve.hookimpl
    def sockserve_request_finish(self, server, request, client_address, exc):
        with self.lock:
            self.finished += 1

    @sockserve.hookimpl
    def sockserve_request_denied(self, server, request, client_address, reason):
        with self.lock:
            self.denied[reason] = self.denied.get(reason, 0) + 1


def timed_exchange(address, payload: bytes = b"hello\n") -> float:
    """One request/response with a fresh client; seconds it took."""
    start = time.monotonic()
    with socket.create_connection(address, timeout=10) as client:
        client.sendall(payload)
        assert read_to_eof(client) == payload.upper()
    return time.monotonic() - start


def silent_clients(stack: ExitStack, address, n: int) -> list[socket.socket]:
    clients = []
    for _ in range(n):
        client = stack.enter_context(socket.create_connection(address, timeout=10))
        clients.append(client)
    return clients


def test_threadpool_serves_a_real_client_at_once_past_more_silent_ones_than_threads():
    """The issue's first finding: 6 threads, 10 silent clients, then a real client."""
    events = Events()
    cls = sockserve.compose("tcp", "threadpool", plugins=[events],
                            options={"threads": 6, "first_byte_timeout": 1.0})
    with no_leaks(), ExitStack() as stack:
        with serving(cls(LOOPBACK, EchoUpper)) as server:
            silent = silent_clients(stack, server.server_address, 10)
            assert wait_until(lambda: server.waiting == 10)
            assert timed_exchange(server.server_address) < 1.0
            assert server.waiting == 10  # still open, still waiting, no thread each
            start = time.monotonic()
            assert all(closed_by_server(c, 3.0) for c in silent)
            assert time.monotonic() - start < 2.0
            assert wait_until(lambda: server.requests_denied["first-byte"] == 10)
            assert server.waiting == 0
            stack.close()
    assert events.denied == {"first-byte": 10}
    assert events.finished == 1


def test_threadpool_500_silent_connections_do_not_delay_50_real_exchanges():
    """The issue's check: 8 threads, 500 silent connections, 50 exchanges each under 1 s,
    the 500 open until first_byte_timeout closes them, then nothing left behind."""
    cls = sockserve.compose("tcp", "threadpool",
                            options={"threads": 8, "first_byte_timeout": 3.0})
    with no_leaks(), ExitStack() as stack:
        with serving(cls(LOOPBACK, EchoUpper)) as server:
            timed_exchange(server.server_address)  # the pool starts its 8 threads
            threads_before = threading.active_count()
            silent = silent_clients(stack, server.server_address, 500)
            assert wait_until(lambda: server.waiting == 500, timeout=10)
            times = [timed_exchange(server.server_address, b"x%d\n" % i) for i in range(50)]
            assert max(times) < 1.0, sorted(times)[-5:]
            assert server.waiting == 500
            assert threading.active_count() == threads_before  # no thread per connection
            assert wait_until(lambda: server.requests_denied["first-byte"] == 500, timeout=10)
            assert all(closed_by_server(c, 1.0) for c in silent)
            stack.close()


def test_a_client_that_sends_late_but_in_time_is_served():
    cls = sockserve.compose("tcp", "threadpool", options={"threads": 1, "first_byte_timeout": 5.0})
    with serving(cls(LOOPBACK, EchoUpper)) as server:
        with tcp_client(server) as client:
            assert wait_until(lambda: server.waiting == 1)
            time.sleep(0.3)
            client.sendall(b"late\n")
            assert read_to_eof(client) == b"LATE\n"
        assert server.requests_denied["first-byte"] == 0


def test_a_client_that_closes_without_sending_leaves_the_room_at_once():
    events = Events()
    cls = sockserve.compose("tcp", "threadpool", plugins=[events],
                            options={"threads": 1, "first_byte_timeout": 30.0})
    with no_leaks():
        with serving(cls(LOOPBACK, EchoUpper)) as server:
            client = tcp_client(server)
            assert wait_until(lambda: server.waiting == 1)
            client.close()  # readable (EOF): handed to the pool, whose handler sees EOF
            assert wait_until(lambda: server.waiting == 0 and events.finished == 1)
    assert events.denied == {}


def test_first_byte_timeout_none_waits_as_long_as_the_client_takes_without_a_thread():
    cls = sockserve.compose("tcp", "threadpool", options={"threads": 1, "first_byte_timeout": None})
    with serving(cls(LOOPBACK, EchoUpper)) as server:
        with tcp_client(server) as silent:
            assert wait_until(lambda: server.waiting == 1)
            assert timed_exchange(server.server_address) < 1.0
            assert not closed_by_server(silent, 0.5)
            silent.sendall(b"at last\n")
            assert read_to_eof(silent) == b"AT LAST\n"


def test_at_close_a_waiting_client_that_sends_is_served_and_a_silent_one_is_denied():
    """Admitted connections are drained like requests in flight: one that sends before the
    drain deadline is served, one still silent is denied ("closing")."""
    events = Events()
    cls = sockserve.compose("tcp", "threadpool", plugins=[events],
                            options={"threads": 2, "first_byte_timeout": 30.0,
                                     "drain_timeout": 0.5})
    server = cls(LOOPBACK, EchoUpper)
    with no_leaks():
        try:
            thread = threading.Thread(target=server.serve_forever, args=(0.05,))
            thread.start()
            with tcp_client(server) as talker, tcp_client(server) as silent:
                assert wait_until(lambda: server.waiting == 2)
                server.shutdown()
                thread.join(5)
                assert not thread.is_alive()
                sender = threading.Timer(0.1, talker.sendall, args=(b"just in time\n",))
                sender.start()
                start = time.monotonic()
                server.server_close()
                took = time.monotonic() - start
                sender.join()
                assert read_to_eof(talker) == b"JUST IN TIME\n"
                assert closed_by_server(silent, 1.0)
        finally:
            server.server_close()
    assert 0.4 < took < 2.0, took  # the silent one was waited for up to the drain deadline
    assert events.finished == 1
    assert events.denied == {"closing": 1}


def test_documented_classes_do_not_wait_for_readability():
    """ThreadingTCPServer keeps the standard module's behaviour: a thread per connection
    at once, no waiting room, no first-byte deadline."""
    with serving(sockserve.ThreadingTCPServer(LOOPBACK, EchoUpper)) as server:
        assert server.first_byte_timeout is None
        with tcp_client(server):
            time.sleep(0.2)
            assert server.waiting == 0


@requires_fork
def test_prefork_sync_workers_serve_past_more_silent_clients_than_workers():
    """The issue's second finding: prefork, 2 workers, inner sync: 3 silent clients were
    enough to stop it. Now each worker parks them and serves the real client."""
    cls = sockserve.compose("tcp", "prefork", options={"workers": 2, "first_byte_timeout": 1.5})
    with no_leaks(), ExitStack() as stack:
        with serving(cls(LOOPBACK, EchoUpper)) as server:
            assert timed_exchange(server.server_address) < 5.0  # the workers are up
            silent = silent_clients(stack, server.server_address, 6)
            time.sleep(0.2)
            times = [timed_exchange(server.server_address, b"p%d\n" % i) for i in range(10)]
            assert max(times) < 1.0, times
            assert all(closed_by_server(c, 3.0) for c in silent)
            stack.close()


@requires_fork
def test_a_forked_child_closes_its_copies_of_waiting_connections():
    """after_fork: the parent's waiting connections are not kept open by a child."""
    cls = sockserve.compose("tcp", "threadpool", options={"threads": 1, "first_byte_timeout": 30.0})
    with serving(cls(LOOPBACK, EchoUpper)) as server:
        with tcp_client(server) as client:
            assert wait_until(lambda: server.waiting == 1)
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                try:
                    server.after_fork()
                    os.write(write_end, str(len(os.listdir("/proc/self/fd"))).encode())
                finally:
                    os._exit(0)
            os.close(write_end)
            try:
                child_fds = int(os.read(read_end, 100) or b"0")
            finally:
                os.close(read_end)
                os.waitpid(pid, 0)
            assert child_fds > 0
            assert server.waiting == 1  # the parent's stays
            client.sendall(b"still here\n")
            assert read_to_eof(client) == b"STILL HERE\n"


@pytest.mark.parametrize("strategy", ["threadpool", pytest.param("prefork", marks=requires_fork)])
def test_first_byte_timeout_is_an_option_with_a_default_of_10_seconds(strategy):
    cls = sockserve.compose("tcp", strategy)
    assert cls.first_byte_timeout == sockserve.FIRST_BYTE_TIMEOUT == 10.0
    with pytest.raises(sockserve.OptionError):
        sockserve.compose("tcp", strategy, options={"first_byte_timeout": -1})


def test_first_byte_timeout_0_hands_every_connection_over_at_once():
    """0 turns the waiting room off: a silent client takes a pool thread, as before."""
    cls = sockserve.compose("tcp", "threadpool", options={"threads": 1, "first_byte_timeout": 0})
    with serving(cls(LOOPBACK, EchoUpper)) as server:
        with tcp_client(server) as silent:
            time.sleep(0.2)
            assert server.waiting == 0 and server.waited == 0
            with tcp_client(server) as second:  # queued behind the silent one's thread
                second.sendall(b"behind\n")
                second.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    second.recv(10)
                silent.sendall(b"now\n")
                assert read_to_eof(silent) == b"NOW\n"
                second.settimeout(5)
                assert read_to_eof(second) == b"BEHIND\n"


def test_waited_counts_the_connections_that_waited():
    cls = sockserve.compose("tcp", "threadpool", options={"threads": 2})
    with serving(cls(LOOPBACK, EchoUpper)) as server:
        with tcp_client(server) as a, tcp_client(server) as b:
            assert wait_until(lambda: server.waiting == 2)
            for client in (a, b):
                client.sendall(b"x\n")
                assert read_to_eof(client) == b"X\n"
        assert server.waiting == 0 and server.waited == 2
