"""Where the standard ``socketserver`` fails and sockserve does not (issue 3).

Each behaviour is shown over real loopback sockets. Where the standard module's failure
can be shown without hanging the suite, the same scenario runs against it side by side
(``socketserver`` is imported here only as the reference to compare against):

- shutdown() wakes the loop at once, is safe twice, before serving and from a handler;
- in-flight requests drain on close, bounded by ``drain_timeout``;
- accept() running out of descriptors backs off instead of spinning;
- an oversized UDP datagram is reported instead of being cut silently;
- the listen backlog of the standard names, of threadpool and prefork and of ``sockserve serve``;
- a lifecycle plugin that raises never stops the serve loop.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import sockserve
from sockserve.core import _cli
from support import (
    EchoUpper,
    address_for,
    bounded,
    connect,
    exchange,
    no_leaks,
    read_to_eof,
    requires_fork,
    requires_ss,
    script_path,
    serving,
    skip_unless_supported,
    start_serving,
    wait_until,
)

LOOPBACK = ("127.0.0.1", 0)


# =========================================================================== 1. shutdown

#: How fast "at once" is: what shutdown() must beat (best of a few tries, since other
#: processes on a loaded machine can delay any single wake-up by tens of milliseconds).
AT_ONCE = 0.2
#: A bound for "did not wait for the poll interval" in single measurements, far below the
#: poll intervals used here (2 s and 10 s) and far above scheduling noise.
WELL_UNDER_POLL = 1.0


def shutdown_timing(server_class: type, poll_interval: float) -> tuple[float, float]:
    """Time shutdown() while serve_forever waits in select() for *poll_interval*.

    Returns how long shutdown() took, and how long the loop had been waiting since its
    last turn when shutdown() returned: the standard module's loop notices the request
    only when that wait ends, however long the machine took to get to the call.
    """
    turns: list[float] = []

    class Server(server_class):  # type: ignore[valid-type, misc]
        def service_actions(self) -> None:
            turns.append(time.monotonic())
            super().service_actions()

    server = Server(LOOPBACK, EchoUpper)
    thread = start_serving(server, poll_interval)
    try:
        assert exchange(server, b"ping") == b"PING"  # the loop is running
        assert wait_until(lambda: turns)  # has finished its turn for that request
        time.sleep(0.05)  # and is back to waiting in select()
        last_turn = turns[-1]
        took = bounded(server.shutdown, timeout=poll_interval + 5)
        return took, time.monotonic() - last_turn
    finally:
        server.shutdown()
        thread.join(poll_interval + 5)
        server.server_close()
        assert not thread.is_alive()


def best_shutdown_latency(server_class: type, poll_interval: float, tries: int = 3) -> float:
    latencies = [shutdown_timing(server_class, poll_interval)[0] for _ in range(tries)]
    assert max(latencies) < WELL_UNDER_POLL, latencies
    return min(latencies)


def test_shutdown_returns_at_once_where_the_standard_module_waits_for_the_poll_interval():
    """Side by side with poll_interval=2: the standard loop notices only at the next poll."""
    standard, standard_waited = shutdown_timing(socketserver.TCPServer, poll_interval=2)
    ours = best_shutdown_latency(sockserve.TCPServer, poll_interval=2)
    print(f"MEASURED shutdown latency, poll_interval=2: socketserver {standard:.3f}s "
          f"(loop idle {standard_waited:.3f}s), sockserve {ours:.4f}s")
    assert standard_waited >= 2 * 0.95  # it slept out the whole poll interval
    assert standard >= 1.0
    assert ours < AT_ONCE


def test_shutdown_returns_at_once_with_a_ten_second_poll_interval():
    ours = best_shutdown_latency(sockserve.TCPServer, poll_interval=10)
    print(f"MEASURED shutdown latency, poll_interval=10: sockserve {ours:.4f}s")
    assert ours < AT_ONCE


def test_shutdown_twice_is_safe_and_the_second_call_returns_at_once():
    with no_leaks():
        server = sockserve.TCPServer(LOOPBACK, EchoUpper)
        thread = start_serving(server, 10)
        assert exchange(server, b"x") == b"X"
        assert bounded(server.shutdown) < WELL_UNDER_POLL
        assert bounded(server.shutdown) < WELL_UNDER_POLL
        thread.join(5)
        assert not thread.is_alive()
        server.server_close()


def test_shutdown_before_serve_forever_returns_and_the_next_serve_forever_returns_at_once():
    """The standard module's shutdown() would block forever here; it is not run."""
    with no_leaks():
        server = sockserve.TCPServer(LOOPBACK, EchoUpper)
        try:
            assert bounded(server.shutdown, timeout=5) < WELL_UNDER_POLL
            # The pending shutdown request ends the next loop before it accepts anything.
            assert bounded(lambda: server.serve_forever(10), timeout=5) < WELL_UNDER_POLL
            # It is used up: serving afterwards works as usual.
            with serving(server):
                assert exchange(server, b"after") == b"AFTER"
        finally:
            server.server_close()


class ShutsDownItsServer(sockserve.BaseRequestHandler):
    """Calls server.shutdown() from the handler, then waits to be released and replies."""

    calls: list[float] = []
    release = threading.Event()

    def handle(self) -> None:
        start = time.monotonic()
        self.server.shutdown()
        type(self).calls.append(time.monotonic() - start)
        assert type(self).release.wait(10)
        self.request.sendall(b"bye")


def test_shutdown_from_a_sync_handler_returns_and_the_loop_stops_after_that_request():
    """The standard module deadlocks here (the handler waits for its own loop); not run.

    A second client that connects while the handler runs is never handled: shutdown was
    already asked for when the loop would have accepted it.
    """
    handler = type("Handler", (ShutsDownItsServer,), {"calls": [], "release": threading.Event()})
    with no_leaks():
        server = sockserve.TCPServer(LOOPBACK, handler)
        thread = start_serving(server, 10)
        try:
            with connect(server) as first:
                assert wait_until(lambda: handler.calls)
                assert handler.calls[0] < WELL_UNDER_POLL  # shutdown() returned in the handler
                with connect(server) as second:  # queued in the backlog
                    second.sendall(b"late")
                    handler.release.set()
                    assert first.recv(16) == b"bye"
                    thread.join(5)
                    assert not thread.is_alive(), "the loop did not stop after the request"
                    assert len(handler.calls) == 1  # the second client was never handled
                    server.server_close()
                    # Closing the listener resets the connection that was never accepted.
                    try:
                        assert second.recv(16) == b""
                    except ConnectionResetError:
                        pass
        finally:
            handler.release.set()
            server.shutdown()
            thread.join(5)
            server.server_close()


@pytest.mark.parametrize("concurrency", ["sync", "threading"])
def test_no_request_is_accepted_once_shutdown_returned(concurrency):
    handled = []

    class Recorder(sockserve.BaseRequestHandler):
        def handle(self) -> None:
            handled.append(self.client_address)

    server = sockserve.compose("tcp", concurrency)(LOOPBACK, Recorder)
    thread = start_serving(server, 0.05)
    try:
        bounded(server.shutdown)
        with socket.create_connection(server.server_address, timeout=5) as client:
            client.sendall(b"anyone?")
            time.sleep(0.3)
            assert handled == []
    finally:
        thread.join(5)
        server.server_close()
    assert not thread.is_alive()


# =========================================================================== 2. drain


class SlowReply(sockserve.BaseRequestHandler):
    """Says it started, works for half a second, then replies."""

    def handle(self) -> None:
        self.request.sendall(b"started;")
        time.sleep(0.5)
        self.request.sendall(b"done")


@pytest.mark.parametrize("drain_timeout", [None, 5.0])
@pytest.mark.parametrize(
    "concurrency", ["threading", pytest.param("forking", marks=requires_fork)]
)
def test_in_flight_requests_finish_when_the_server_closes(concurrency, drain_timeout):
    cls = type("Server", (sockserve.compose("tcp", concurrency),), {"drain_timeout": drain_timeout})
    with no_leaks():
        server = cls(LOOPBACK, SlowReply)
        thread = start_serving(server, 0.05)
        with connect(server) as client:
            assert client.recv(8) == b"started;"
            bounded(server.shutdown)
            thread.join(5)
            bounded(server.server_close)
            # The handler had finished when server_close() returned: its reply and the end
            # of the connection are already here, nothing left to wait for.
            client.setblocking(False)
            assert client.recv(16) == b"done"
            assert client.recv(16) == b""
        assert server.requests_cut_off == 0
        if concurrency == "forking":
            assert not server.active_children


class BlocksOnRecv(sockserve.BaseRequestHandler):
    """Says it started, then waits for data that never comes (up to 30 s)."""

    seen: list[bytes] = []

    def handle(self) -> None:
        self.request.settimeout(30)
        self.request.sendall(b"started")
        type(self).seen.append(self.request.recv(1024))


def test_drain_timeout_bounds_shutdown_while_a_sync_handler_blocks(caplog):
    handler = type("Handler", (BlocksOnRecv,), {"seen": []})
    cls = type("DrainingServer", (sockserve.TCPServer,), {"drain_timeout": 0.5})
    caplog.set_level(logging.WARNING, logger="sockserve")
    with no_leaks():
        server = cls(LOOPBACK, handler)
        thread = start_serving(server, 0.05)
        with connect(server) as client:
            assert client.recv(16) == b"started"
            took = bounded(server.shutdown)
            print(f"MEASURED sync shutdown with a blocked handler, drain_timeout=0.5: {took:.3f}s")
            assert 0.45 <= took < 0.5 + 1.0
            assert client.recv(16) == b""  # the connection was shut down
        thread.join(5)
        assert not thread.is_alive()
        server.server_close()
    assert server.requests_cut_off == 1
    assert handler.seen == [b""]  # the handler's recv returned at the cut-off
    assert (
        "DrainingServer: drain deadline of 0.5s passed; cut off 1 in-flight request(s)"
        in caplog.messages
    )


@pytest.mark.parametrize(
    "concurrency", ["threading", pytest.param("forking", marks=requires_fork)]
)
def test_drain_timeout_bounds_server_close_while_handlers_block(concurrency, caplog):
    cls = type(
        "DrainingServer", (sockserve.compose("tcp", concurrency),), {"drain_timeout": 0.5}
    )
    caplog.set_level(logging.WARNING, logger="sockserve")
    with no_leaks():
        server = cls(LOOPBACK, BlocksOnRecv)
        thread = start_serving(server, 0.05)
        with connect(server) as client:
            assert client.recv(16) == b"started"
            bounded(server.shutdown)
            thread.join(5)
            took = bounded(server.server_close)
            print(f"MEASURED {concurrency} server_close with a blocked handler, drain_timeout=0.5: {took:.3f}s")
            assert 0.45 <= took < 0.5 + 1.0 + 0.5
            assert client.recv(16) == b""  # cut off: EOF (or the child's socket closed)
    assert server.requests_cut_off == 1
    if concurrency == "forking":
        assert not server.active_children
        expected = "DrainingServer: drain deadline of 0.5s passed; terminating 1 child process(es)"
    else:
        expected = "DrainingServer: drain deadline of 0.5s passed; cut off 1 in-flight request(s)"
    assert expected in caplog.messages


#: How long the handler of the side-by-side drain test waits for data that never comes.
HANDLER_WAIT = 1.5


def close_with_blocked_handler(module: Any) -> dict[str, Any]:
    """ThreadingTCPServer.server_close() with drain_timeout=0.2 while a handler waits on recv.

    Returns how long server_close() took, how the handler's wait ended ("timeout" when it
    waited its full HANDLER_WAIT, "cut off" when its connection was shut down under it),
    and whether server_close() returned only after the handler had ended.
    """
    outcome: dict[str, Any] = {}

    class Waits(module.BaseRequestHandler):
        def handle(self) -> None:
            self.request.settimeout(HANDLER_WAIT)
            self.request.sendall(b"started")
            try:
                data = self.request.recv(16)
                outcome["handler"] = "cut off" if data == b"" else repr(data)
            except TimeoutError:
                outcome["handler"] = "timeout"
            outcome["handler_ended"] = time.monotonic()

    cls = type("Server", (module.ThreadingTCPServer,), {"drain_timeout": 0.2})
    server = cls(LOOPBACK, Waits)
    thread = start_serving(server, 0.05)
    with socket.create_connection(server.server_address, timeout=10) as client:
        assert client.recv(16) == b"started"
        server.shutdown()
        thread.join(5)
        outcome["close_took"] = bounded(server.server_close)
        outcome["close_returned"] = time.monotonic()
    outcome["cut_off_count"] = getattr(server, "requests_cut_off", None)
    return outcome


def test_drain_timeout_bounds_close_where_the_standard_module_waits_for_the_handler():
    """Side by side: the standard ThreadingTCPServer ignores drain_timeout and waits."""
    standard = close_with_blocked_handler(socketserver)
    ours = close_with_blocked_handler(sockserve)
    print(f"MEASURED ThreadingTCPServer close, handler blocked {HANDLER_WAIT}s, drain_timeout=0.2: "
          f"socketserver {standard['close_took']:.3f}s ({standard['handler']}), "
          f"sockserve {ours['close_took']:.3f}s ({ours['handler']})")
    assert standard["handler"] == "timeout"  # waited for the handler's full wait
    assert standard["close_returned"] >= standard["handler_ended"]
    assert ours["handler"] == "cut off"
    assert ours["cut_off_count"] == 1
    assert ours["close_took"] < HANDLER_WAIT


# =========================================================================== 3. overload

requires_proc = pytest.mark.skipif(
    not os.path.exists("/proc/self/task"), reason="needs Linux /proc (descriptor and thread accounting)"
)


@pytest.fixture(scope="module")
def overload() -> dict[str, dict[str, Any]]:
    """Run the descriptor-exhaustion scenario (tests/scripts/accept_out_of_descriptors.py)
    against both modules at the same time.

    The standard module's spinning thread takes one of the two cores; what is asserted
    (loop turns, CPU demand) does not depend on the share of a core each run gets.
    """
    env = dict(os.environ, SOCKSERVE_DISABLE_PLUGIN_AUTOLOAD="1")
    procs = {
        module: subprocess.Popen(
            [sys.executable, script_path("accept_out_of_descriptors.py"), module],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for module in ("socketserver", "sockserve")
    }
    runs = {}
    try:
        for module, proc in procs.items():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            runs[module] = dict(json.loads(out), stderr=err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return runs


@requires_proc
def test_accept_out_of_descriptors_backs_off_where_the_standard_module_spins(overload):
    """Side by side, the serving thread while accept() fails with EMFILE for a second.

    Loop turns per second and CPU demand (on a CPU or waiting for one, per wall second)
    do not depend on what else the machine runs; the CPU share actually obtained (CPU
    seconds per wall second) does, so the standard module's is only reported.
    """
    standard, ours = overload["socketserver"], overload["sockserve"]

    def figures(run: dict[str, Any]) -> str:
        return (
            f"{run['turns_per_second']:.1f} loop turns/s, CPU {run['cpu_total']:.0%} "
            f"(median {run['cpu_median']:.0%}), CPU demand {run['demand_total']:.0%} "
            f"(median {run['demand_median']:.0%})"
        )

    print(f"MEASURED serving thread while accept() fails with EMFILE: "
          f"socketserver {figures(standard)}; sockserve {figures(ours)}")
    assert standard["turns_per_second"] > 1000
    # The reference wants most of a core (0.80-1.00 measured here; the rest goes to the
    # waiting process beside it on a loaded 2-vCPU runner); ours wants almost none.
    assert standard["demand_median"] >= 0.5
    assert ours["turns_per_second"] < 20
    assert ours["demand_median"] < 0.2
    assert ours["cpu_median"] < 0.2


@requires_proc
def test_accept_out_of_descriptors_logs_once_per_burst(overload):
    ours = overload["sockserve"]
    failed = re.findall(
        r"sockserve ERROR Server: accept\(\) failed: \[Errno 24\] Too many open files; "
        r"backing off until resources free up",
        ours["stderr"],
    )
    resumed = [int(n) for n in re.findall(
        r"sockserve WARNING Server: accepting again after (\d+) failed accept\(\) call\(s\)",
        ours["stderr"],
    )]
    assert len(failed) == 2, ours["stderr"]  # two bursts, one line each
    assert resumed == [ours["emfile_burst1"], ours["emfile_total"] - ours["emfile_burst1"]]
    assert ours["emfile_burst1"] >= 3  # several failures behind that single line
    assert "accept() failed" not in overload["socketserver"]["stderr"]


@requires_proc
@pytest.mark.parametrize("module", ["socketserver", "sockserve"])
def test_server_serves_again_once_descriptors_free_up(overload, module):
    run = overload[module]
    assert run["first_reply"] == "FIRST"  # the connection that waited during burst 1
    assert run["stopped"]
    assert run["second_reply"] == "SECOND"
    assert run["third_reply"] == "THIRD"


@requires_proc
def test_shutdown_interrupts_the_accept_back_off(overload):
    """shutdown() is called right after a failed accept(), as a 0.5 s pause begins."""
    tries = overload["sockserve"]["shutdown_while_stuck"]
    print(f"MEASURED shutdown() at the start of a 0.5 s back-off pause: sockserve "
          f"{', '.join(f'{t:.4f}s' for t in tries)}")
    assert len(tries) == 3
    assert min(tries) < 0.25  # half the pause: it did not sleep it out


def test_connection_reset_before_accept_does_not_stop_serving(caplog):
    errors: list[BaseException | None] = []

    class Server(sockserve.TCPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            errors.append(sys.exc_info()[1])

    caplog.set_level(logging.INFO, logger="sockserve")
    with no_leaks():
        server = Server(LOOPBACK, EchoUpper)
        # Reset while the connection still waits in the backlog: the loop is not running yet.
        client = socket.create_connection(server.server_address, timeout=5)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        with serving(server):
            start = time.monotonic()
            assert exchange(server, b"still here") == b"STILL HERE"
            assert time.monotonic() - start < 1.0  # no back-off
    # Linux hands the reset connection to accept(); the handler's recv then sees the reset.
    assert errors, "the reset connection never reached the handler"
    assert all(isinstance(e, ConnectionResetError) for e in errors), errors
    assert not [r for r in caplog.records if "accept()" in r.getMessage()]


def test_connection_aborted_during_accept_is_ignored(caplog):
    """An ECONNABORTED from accept() (BSDs report resets this way) is skipped silently."""
    errors: list[BaseException | None] = []

    class Server(sockserve.TCPServer):
        aborts = 1

        def get_request(self) -> Any:
            if self.aborts:
                self.aborts -= 1
                raise ConnectionAbortedError(errno.ECONNABORTED, "Software caused connection abort")
            return super().get_request()

        def handle_error(self, request: Any, client_address: Any) -> None:
            errors.append(sys.exc_info()[1])

    caplog.set_level(logging.INFO, logger="sockserve")
    with no_leaks():
        with serving(Server(LOOPBACK, EchoUpper)) as server:
            start = time.monotonic()
            assert exchange(server, b"after abort") == b"AFTER ABORT"
            assert time.monotonic() - start < 1.0
            assert server.aborts == 0
    assert errors == []
    assert caplog.records == []


# =========================================================================== 4. UDP


class ReportsLength(sockserve.BaseRequestHandler):
    """Replies with the number of bytes the handler was given."""

    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(str(len(data)).encode(), self.client_address)


BIG = 20_000


def test_standard_udp_server_cuts_an_oversized_datagram_silently():
    """The reference behaviour sockserve fixes: the handler sees the first 8192 bytes."""
    errors = []

    class Server(socketserver.UDPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            errors.append(sys.exc_info()[1])

    server = Server(LOOPBACK, ReportsLength)
    with serving(server):
        with connect(server) as client:
            client.sendall(b"x" * BIG)
            assert client.recv(64) == b"8192"
    assert errors == []


@pytest.mark.parametrize("concurrency", ["sync", "threading", "forking", "threadpool"])
@pytest.mark.parametrize("transport", ["udp", "udp6"])
def test_oversized_datagram_is_dropped_and_reported_instead_of_cut(transport, concurrency):
    skip_unless_supported(transport, concurrency)
    reported: list[tuple[Any, Any, BaseException | None]] = []

    class Server(sockserve.compose(transport, concurrency)):
        def handle_error(self, request: Any, client_address: Any) -> None:
            reported.append((request, client_address, sys.exc_info()[1]))

    with no_leaks():
        with serving(Server(address_for(transport, None), ReportsLength)) as server:
            with connect(server) as client:
                client.sendall(b"x" * BIG)
                client.sendall(b"small")
                # The first reply is for the small datagram: the big one reached no handler.
                assert client.recv(64) == b"5"
                me = client.getsockname()
            assert server.datagrams_truncated == 1
    assert len(reported) == 1
    request, client_address, exc = reported[0]
    assert request is None
    assert client_address == me
    assert isinstance(exc, sockserve.DatagramTruncatedError)
    assert isinstance(exc, OSError)
    assert exc.max_packet_size == 8192
    assert exc.client_address == me
    assert str(exc) == (
        f"datagram from {me!r} is larger than max_packet_size=8192; "
        "dropped instead of delivering it truncated"
    )


@pytest.mark.parametrize("transport", ["udp", "unix-dgram"])
def test_oversized_datagram_is_dropped_and_reported_in_a_prefork_worker(transport, tmp_path):
    """prefork workers receive the datagrams: detection and report happen there."""
    skip_unless_supported(transport, "prefork")

    class Server(sockserve.compose(transport, "prefork", options={"workers": 1})):
        def handle_error(self, request: Any, client_address: Any) -> None:
            exc = sys.exc_info()[1]
            if isinstance(exc, sockserve.DatagramTruncatedError):  # tell the client
                note = b"dropped %d, max %d" % (self.datagrams_truncated, exc.max_packet_size)
                self.socket.sendto(note, exc.client_address)

    with no_leaks():
        with serving(Server(address_for(transport, tmp_path), ReportsLength)) as server:
            with connect(server, tmp_path) as client:
                client.sendall(b"x" * BIG)
                client.sendall(b"small")
                assert client.recv(64) == b"dropped 1, max 8192"
                assert client.recv(64) == b"5"


def test_datagram_of_exactly_max_packet_size_is_delivered_whole():
    with serving(sockserve.UDPServer(LOOPBACK, ReportsLength)) as server:
        with connect(server) as client:
            client.sendall(b"x" * 8192)
            assert client.recv(64) == b"8192"
        assert server.datagrams_truncated == 0


# =========================================================================== 5. backlog

STREAM_NAMES = [
    "TCPServer", "UnixStreamServer", "ThreadingTCPServer", "ForkingTCPServer",
    "ThreadingUnixStreamServer", "ForkingUnixStreamServer",
]


@pytest.mark.parametrize("name", STREAM_NAMES)
def test_standard_stream_classes_keep_the_standard_backlog_of_five(name):
    assert getattr(sockserve, name).request_queue_size == 5
    # ForkingUnixStreamServer joined the standard module in Python 3.12.
    if hasattr(socketserver, name):
        assert getattr(socketserver, name).request_queue_size == 5


def listen_backlog(port: int) -> int:
    """The listen backlog of the TCP socket listening on 127.0.0.1:*port*, from ``ss``."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.split()
    # State Recv-Q Send-Q Local Peer; for a listening socket Send-Q is the backlog.
    assert out and out[0] == "LISTEN", out
    return int(out[2])




@requires_ss
def test_standard_tcp_server_listens_with_a_backlog_of_five():
    with sockserve.TCPServer(LOOPBACK, EchoUpper) as server:
        assert listen_backlog(server.server_address[1]) == 5


def kernel_capped(backlog: int) -> int:
    """The backlog listen(*backlog*) gets: the kernel caps it at net.core.somaxconn."""
    with open("/proc/sys/net/core/somaxconn") as f:
        return min(backlog, int(f.read()))


@requires_ss
@pytest.mark.parametrize("concurrency", ["threadpool", "prefork"])
def test_sockserve_strategies_listen_with_a_large_backlog_unless_told_otherwise(concurrency):
    cls = sockserve.compose("tcp", concurrency)
    assert cls.request_queue_size >= 128
    with cls(LOOPBACK, EchoUpper) as server:
        assert listen_backlog(server.server_address[1]) == kernel_capped(cls.request_queue_size)
    smaller = sockserve.compose("tcp", concurrency, options={"request_queue_size": 7})
    with smaller(LOOPBACK, EchoUpper) as server:
        assert listen_backlog(server.server_address[1]) == 7


@requires_ss
def test_cli_serve_listens_with_the_large_serve_backlog():
    assert _cli.SERVE_BACKLOG >= 128
    expected = kernel_capped(_cli.SERVE_BACKLOG)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sockserve", "serve", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = run_reading_line(proc)
        match = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        port = int(match.group(1))
        assert listen_backlog(port) == expected
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(b"hello\n")
            client.shutdown(socket.SHUT_WR)
            assert b"HELLO" in read_to_eof(client)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rest = proc.communicate(timeout=15)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    assert proc.returncode == 0, rest
    assert "sockserve: stopped" in rest


def run_reading_line(proc: subprocess.Popen) -> str:
    """The first stderr line of *proc*, read with a timeout."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stderr.readline()), daemon=True)
    reader.start()
    reader.join(15)
    assert lines, "the CLI printed nothing within 15 s"
    return lines[0]


# =========================================================================== 6. plugins


class Plugin:
    """A plugin object (hashable, as pluggy requires) holding hook implementations."""

    def __init__(self, **impls: Callable[..., Any]) -> None:
        for name, impl in impls.items():
            setattr(self, name, impl)


def exploding_plugin(hook: str) -> Plugin:
    """A plugin whose implementation of *hook* raises ValueError."""

    def boom(**kwargs: Any) -> None:
        raise ValueError(f"boom in {hook}")

    # pluggy reads the argument names: give each implementation its spec's signature.
    signatures = {
        "sockserve_server_activate": lambda server: boom(),
        "sockserve_serve_start": lambda server: boom(),
        "sockserve_serve_stop": lambda server: boom(),
        "sockserve_service_actions": lambda server: boom(),
        "sockserve_verify_request": lambda server, request, client_address: boom(),
        "sockserve_request_start": lambda server, request, client_address: boom(),
        "sockserve_request_finish": lambda server, request, client_address, exc: boom(),
        "sockserve_server_close": lambda server: boom(),
        "sockserve_handle_error": lambda server, request, client_address, exc: boom(),
        "sockserve_pre_fork": lambda server, worker_id: boom(),
        "sockserve_post_fork": lambda server, worker_id: boom(),
        "sockserve_worker_exit": lambda server, worker_id, status, reason: boom(),
    }
    return Plugin(**{hook: sockserve.hookimpl(signatures[hook])})


class ErrorRecorder:
    """A handle_error that keeps the exception being handled instead of printing it."""

    errors: list[BaseException | None]

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(sys.exc_info()[1])


def assert_hook_errors(errors: list[Any], hook: str, plugin_name: str) -> None:
    assert errors, f"handle_error never saw the error raised in {hook}"
    for exc in errors:
        assert isinstance(exc, sockserve.HookError), exc
        assert exc.hook == hook
        assert exc.plugin_name == plugin_name
        assert str(exc) == f"plugin {plugin_name!r} raised in hook {hook}"
        assert isinstance(exc.__cause__, ValueError)
        assert str(exc.__cause__) == f"boom in {hook}"


SERVING_HOOKS = [
    "sockserve_serve_start",
    "sockserve_verify_request",
    "sockserve_request_start",
    "sockserve_request_finish",
    "sockserve_service_actions",
]


@pytest.mark.parametrize("concurrency", ["sync", "threading"])
@pytest.mark.parametrize("hook", SERVING_HOOKS)
def test_a_raising_hook_goes_to_handle_error_and_the_server_keeps_serving(hook, concurrency):
    name = f"exploding-{hook}"
    manager = sockserve.get_plugin_manager()
    manager.register(exploding_plugin(hook), name=name)
    try:
        cls = type("Server", (ErrorRecorder, sockserve.compose("tcp", concurrency)), {})
        with no_leaks():
            server = cls(LOOPBACK, EchoUpper)
            server.errors = []
            with serving(server):
                for i in range(3):
                    assert exchange(server, b"req %d" % i) == b"REQ %d" % i
                assert wait_until(lambda: server.errors)
    finally:
        manager.unregister(name=name)
    assert_hook_errors(list(server.errors), hook, name)


@pytest.mark.parametrize("concurrency", ["sync", "threading"])
def test_a_raising_handle_error_hook_is_reported_and_the_error_still_handled(concurrency):
    """The handler's error still reaches handle_error after the hook meant for it raised."""
    name = "exploding-sockserve_handle_error"
    manager = sockserve.get_plugin_manager()
    manager.register(exploding_plugin("sockserve_handle_error"), name=name)

    class FailsOnce(sockserve.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if line.startswith(b"fail"):
                raise LookupError("from the handler")
            self.wfile.write(line.upper())

    try:
        cls = type("Server", (ErrorRecorder, sockserve.compose("tcp", concurrency)), {})
        with no_leaks():
            server = cls(LOOPBACK, FailsOnce)
            server.errors = []
            with serving(server):
                assert exchange(server, b"fail\n") == b""
                assert exchange(server, b"after\n") == b"AFTER\n"
                assert wait_until(lambda: len(server.errors) >= 2)
    finally:
        manager.unregister(name=name)
    hook_errors = [e for e in server.errors if isinstance(e, sockserve.HookError)]
    assert_hook_errors(hook_errors, "sockserve_handle_error", name)
    assert [type(e) for e in server.errors if not isinstance(e, sockserve.HookError)] == [LookupError]


@requires_fork
@pytest.mark.parametrize(
    "hook", ["sockserve_pre_fork", "sockserve_post_fork", "sockserve_worker_exit"]
)
def test_a_raising_prefork_hook_neither_stops_the_workers_nor_the_parent(hook, tmp_path):
    """pre_fork and worker_exit raise in the parent (reported there), post_fork in the
    worker (reported in the worker); the workers serve and stop as usual."""
    name = f"exploding-{hook}"
    report = tmp_path / "worker-errors.jsonl"

    class WorkerReport(ErrorRecorder):
        """In a worker, also write what handle_error saw to *report*: the parent cannot
        see the worker's ``errors``."""

        def handle_error(self, request: Any, client_address: Any) -> None:
            super().handle_error(request, client_address)
            if self.worker_id is None:
                return
            exc = sys.exc_info()[1]
            cause = getattr(exc, "__cause__", None)
            fields = [type(exc).__name__, getattr(exc, "hook", None),
                      getattr(exc, "plugin_name", None), str(exc),
                      type(cause).__name__, str(cause)]
            with open(report, "a") as f:  # one short O_APPEND write per error
                f.write(json.dumps(fields) + "\n")

    manager = sockserve.get_plugin_manager()
    manager.register(exploding_plugin(hook), name=name)
    try:
        cls = type("Server", (WorkerReport, sockserve.compose("tcp", "prefork")), {})
        with no_leaks():
            server = cls(LOOPBACK, EchoUpper)
            server.errors = []
            server.workers = 1
            with serving(server):
                for i in range(3):
                    assert exchange(server, b"req %d" % i) == b"REQ %d" % i
    finally:
        manager.unregister(name=name)
    reported = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    if hook == "sockserve_post_fork":
        assert server.errors == []  # raised and reported in the worker process:
        assert reported == [[  # once, by the one worker, naming the plugin
            "HookError", hook, name, f"plugin {name!r} raised in hook {hook}",
            "ValueError", f"boom in {hook}",
        ]]
    else:
        assert reported == []
        assert_hook_errors(list(server.errors), hook, name)


@pytest.mark.parametrize(
    "hook", ["sockserve_server_activate", "sockserve_serve_stop", "sockserve_server_close"]
)
def test_a_raising_lifecycle_hook_does_not_stop_the_server_starting_or_closing(hook):
    name = f"exploding-{hook}"
    manager = sockserve.get_plugin_manager()
    manager.register(exploding_plugin(hook), name=name)
    try:
        # A class attribute: server_activate fires inside the constructor.
        cls = type("Server", (ErrorRecorder, sockserve.TCPServer), {"errors": []})
        with no_leaks():
            server = cls(LOOPBACK, EchoUpper)
            with serving(server):
                assert exchange(server, b"ok") == b"OK"
    finally:
        manager.unregister(name=name)
    assert server.socket.fileno() == -1  # closed all the same
    assert_hook_errors(cls.errors, hook, name)


def test_a_raising_class_plugin_is_named_in_the_hook_error():
    plugin = exploding_plugin("sockserve_verify_request")
    plugin.__name__ = "class-level-exploder"
    cls = type(
        "Server",
        (ErrorRecorder, sockserve.compose("tcp", "sync", plugins=[plugin])),
        {},
    )
    server = cls(LOOPBACK, EchoUpper)
    server.errors = []
    with serving(server):
        assert exchange(server, b"fine") == b"FINE"
    assert_hook_errors(server.errors, "sockserve_verify_request", "class-level-exploder")
