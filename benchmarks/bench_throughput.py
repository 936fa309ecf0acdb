"""Throughput benchmark: sockserve's ``threadpool`` and ``prefork`` strategies side by side
with the standard ``socketserver`` (and asyncio streams and uvloop as references), in one run.

    python benchmarks/bench_throughput.py [--rounds 7] [--duration 1.0] [--wrk-duration 1]
                                          [--scenarios tcp-conn,udp,...] [--strategies ...]
                                          [--concurrency 8] [--wrk-connections 8]
                                          [--slice 0.1] [--pin none|split|same]
                                          [--json PATH] [--plot PATH] [--profile]

Needs: a C compiler (``cc``) for the load generator, ``wrk`` for the HTTP scenarios
(``apt-get install wrk``; without it they are skipped), and, in the environment that runs
this script, ``uvloop`` (missing: its two contenders are skipped, with a printed reason, and
the goals against it read "not measured") and,
for ``--plot``, ``matplotlib``.

Scenarios (the same handler code for every socketserver-style server, its base class
taken from the module under test; asyncio/uvloop use streams, or a DatagramProtocol):

- ``tcp-conn``        connection per request: connect, send 64 bytes, read the echo, read
                      the server's end of file, close. ``--concurrency`` connections in flight.
- ``udp``             one 64-byte datagram, its echo back; ``--concurrency`` outstanding.
- ``tcp-keepalive``   ``--concurrency`` open connections, each sending 64 bytes and waiting
                      for the echo before sending the next.
- ``http-close``      an ``http.server.BaseHTTPRequestHandler`` answering GET / with a small
                      page, driven by ``wrk`` with ``Connection: close``.
- ``http-keepalive``  the same page, wrk over ``--wrk-connections`` keep-alive connections.

Strategies: the standard ``ThreadingTCPServer`` / ``ThreadingUDPServer`` /
``ForkingTCPServer``; sockserve's ``threadpool`` (defaults: cpu_count + 4 threads) and
``prefork`` (defaults: cpu_count workers, ``inner="sync"``); asyncio streams and uvloop in
one process, and ``uvloop-reuseport``: uvloop in cpu_count processes, each with its own
listening socket on the same port (``SO_REUSEPORT``), the multi-process reference with as
many processes as prefork. Each goal compares a sockserve strategy with one contender, and
the run prints which (``goal for``), with how many processes on each side.
A pool thread is held by a keep-alive connection for as long as it stays open, so in the
keep-alive scenarios the pools get one thread per connection (threadpool ``threads=C``;
prefork ``inner="threadpool", threads=C`` in each worker, as one worker may accept all).
Every listening socket gets a backlog of 128 (``request_queue_size``; asyncio's
``backlog``): the standard classes' 5 drops SYNs under 8 concurrent connects, and a dropped
SYN costs a one-second retransmission. The HTTP handler sets ``disable_nagle_algorithm``:
it writes headers and body separately, and with Nagle the body waits for a delayed ACK.

Method. Each server runs in a subprocess of its own that imports only its own module
(checked for the echo scenarios; ``http.server`` itself imports ``socketserver``). The
load comes from a small C program (``loadgen.c``, compiled at run time into a temporary
directory) or from ``wrk``, far cheaper per request than a Python client. Each round
starts fresh servers for every strategy of a scenario; the order (which goes first, and
starts first) rotates from round to round.

- Echo scenarios: one load generator loads all the strategies of the scenario in turn,
  switching every ``--slice`` seconds, until each has had ``--duration`` seconds, so a
  slow patch of the machine hits them all alike and each round gives paired ratios.
- HTTP scenarios: wrk cannot switch servers, so each strategy gets one ``--wrk-duration``
  run of wrk per round, back to back.

Stalls. The machine this was written on (a 2-vCPU VM) is not run by its host for much of
the time: a spinning process pinned to each vCPU sees both stop together, for a few ms to
700 ms at a time, 55-70% of the wall-clock time, with or without load. So a probe
(``loadgen probe``: one real-time thread per CPU waking every millisecond) records the
intervals in which every CPU woke up more than 2 ms late, and rates are
computed over the time the machine ran: requests started in a strategy's slices and
completed, per second of those slices minus the stalls (for wrk: requests per second of
its run minus the stalls). The per-wall-clock rate is printed too. A stalled VM charges
the stall to the process that was running, so server CPU times are scaled by the share
of the load during which the machine ran (an approximation).

Measured per strategy and round: rate; server CPU per request, from ``/proc/<pid>/stat``
of the server and all its descendants (user + system, reaped children included); server
context switches per request (``getrusage`` in the server: all its threads, and its
reaped children); the load generator's own CPU while it loaded that server, as a share of
one CPU (near 100% would mean the load generator was the limit); median and 99th
percentile latency; client-side errors; tracebacks the server printed via handle_error.
Per scenario and round also the machine's stalled share and CPU shares from /proc/stat.

Reported: the median over rounds of each figure; for each goal, ratio = the two
strategies' medians, with the min-max and interquartile range (IQR) of the per-round
ratios; a goal is met when the ratio of the medians reaches it. The last line starts with
``SUMMARY``. ``--json`` writes every round; ``--plot`` a PNG of rate per strategy.

``--profile`` instead runs each strategy of the echo scenarios alone (``--duration``
seconds, no warm-up) with every server thread under cProfile, and prints Python calls and
context switches per request and the top functions (forked processes are not profiled).

Bounds: servers bind 127.0.0.1 port 0 only; every child has a watchdog (the load generator
an alarm); the parent reads children's output with timeouts and, whatever happens, kills
every process it started, and any server descendant still running, by pid.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import re
import resource
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import _harness as h
from _harness import CHILD_GRACE, HOST, LINE_TIMEOUT, Child

SIZE = len(h.PAYLOAD)  # bytes per echo request (the load generator sends 64)
#: Listen backlog of every server (see the module docstring).
BACKLOG = h.BACKLOG
#: Seconds after which an unanswered request counts as failed (load generator, wrk).
REQUEST_TIMEOUT = 2.0
#: Processes of the ``uvloop-reuseport`` contender: one per CPU, as many as prefork's
#: default workers (``os.cpu_count()``), so that the two multi-process servers compare
#: like with like.
REUSEPORT_PROCESSES = os.cpu_count() or 1
#: A slice of load in which the machine ran less than this share of the time is left out
#: of the slice median (in the JSON output only).
MIN_RUNNING = 0.3
#: A strategy whose load ran less than this many seconds in a round has no rate for it.
MIN_RAN = 0.05
#: The small page of the HTTP scenarios.
PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>sockserve</title></head>\n"
    b"<body><h1>Hello</h1><p>A small page served by http.server.</p></body></html>\n"
)

# --------------------------------------------------------------------------- what runs


@dataclass(frozen=True)
class Contender:
    """One server: ``family`` is stdlib, sockserve, asyncio or uvloop."""

    family: str
    what: str = ""  # stdlib: class name; sockserve: strategy name
    options: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        if self.family == "stdlib":
            return f"socketserver.{self.what}"
        if self.family == "sockserve":
            opts = ", ".join(f"{k}={v!r}" for k, v in self.options)
            return f"sockserve {self.what}" + (f" ({opts})" if opts else " (defaults)")
        api = "DatagramProtocol" if self.what == "udp" else "streams"
        processes = self.processes
        if processes and self.what == "udp":
            # SO_REUSEPORT picks a socket per flow (address and port pair), and the load
            # generator sends every datagram from one socket: one process gets them all.
            return (
                f"{self.family} {api}, {processes} processes, one socket each on SO_REUSEPORT "
                "(the load generator's one flow reaches one of them)"
            )
        if processes:
            return f"{self.family} {api}, {processes} processes, one listening socket each on SO_REUSEPORT"
        return f"{self.family} {api}, 1 process"

    @property
    def processes(self) -> int:
        """Processes of an asyncio/uvloop contender that runs several (0: one, no fork)."""
        return int(dict(self.options).get("processes", 0))


@dataclass(frozen=True)
class Scenario:
    kind: str  # conn, keep, udp, http-close, http-keep
    unit: str
    contenders: dict[str, Contender] = field(default_factory=dict)

    @property
    def transport(self) -> str:
        return "udp" if self.kind == "udp" else "tcp"

    @property
    def uses_wrk(self) -> bool:
        return self.kind.startswith("http")


def scenarios(concurrency: int, wrk_connections: int) -> dict[str, Scenario]:
    # threadpool's thread count is ``threads`` (0.1 called it ``workers``, now prefork's
    # name for processes).
    keep_pool = (("threads", concurrency),)
    keep_prefork = (("inner", "threadpool"), ("threads", concurrency))
    http_pool = (("threads", wrk_connections),)
    http_prefork = (("inner", "threadpool"), ("threads", wrk_connections))
    reuseport = (("processes", REUSEPORT_PROCESSES),)
    return {
        "tcp-conn": Scenario("conn", "conn/s", {
            "ThreadingTCPServer": Contender("stdlib", "ThreadingTCPServer"),
            "ForkingTCPServer": Contender("stdlib", "ForkingTCPServer"),
            "threadpool": Contender("sockserve", "threadpool"),
            "prefork": Contender("sockserve", "prefork"),
            "asyncio": Contender("asyncio"),
            "uvloop": Contender("uvloop"),
            "uvloop-reuseport": Contender("uvloop", "", reuseport),
        }),
        "udp": Scenario("udp", "datagrams/s", {
            "ThreadingUDPServer": Contender("stdlib", "ThreadingUDPServer"),
            "threadpool": Contender("sockserve", "threadpool"),
            "prefork": Contender("sockserve", "prefork"),
            "asyncio": Contender("asyncio", "udp"),
            "uvloop": Contender("uvloop", "udp"),
            "uvloop-reuseport": Contender("uvloop", "udp", reuseport),
        }),
        "tcp-keepalive": Scenario("keep", "req/s", {
            "ThreadingTCPServer": Contender("stdlib", "ThreadingTCPServer"),
            "threadpool": Contender("sockserve", "threadpool", keep_pool),
            "prefork": Contender("sockserve", "prefork", keep_prefork),
            "asyncio": Contender("asyncio"),
            "uvloop": Contender("uvloop"),
            "uvloop-reuseport": Contender("uvloop", "", reuseport),
        }),
        "http-close": Scenario("http-close", "req/s", {
            "ThreadingTCPServer": Contender("stdlib", "ThreadingTCPServer"),
            "threadpool": Contender("sockserve", "threadpool"),
            "prefork": Contender("sockserve", "prefork"),
        }),
        "http-keepalive": Scenario("http-keep", "req/s", {
            "ThreadingTCPServer": Contender("stdlib", "ThreadingTCPServer"),
            "threadpool": Contender("sockserve", "threadpool", http_pool),
            "prefork": Contender("sockserve", "prefork", http_prefork),
        }),
    }


SCENARIO_NAMES = ("tcp-conn", "udp", "tcp-keepalive", "http-close", "http-keepalive")


@dataclass(frozen=True)
class Goal:
    """A sockserve strategy (``num``) against one contender (``den``) in one scenario.

    ``target`` None: a reference comparison, printed with the goals but not one of them.
    """

    label: str
    scenario: str
    metric: str  # rate or cpu
    num: str
    den: str
    target: float | None

    @property
    def higher(self) -> bool:
        return self.metric == "rate"

    def met(self, ratio: float) -> bool | None:
        if self.target is None:
            return None
        return ratio >= self.target if self.higher else ratio <= self.target

    @property
    def compares(self) -> str:
        """How many processes serve on each side: what the ratio compares."""
        text = f"{processes(self.num)} vs {processes(self.den)}"
        if self.den == "uvloop-reuseport" and self.scenario == "udp":
            text += " (one flow: 1 of them serves)"
        return text


def processes(name: str) -> str:
    """The processes that serve for contender *name* (with the defaults of this script)."""
    if name == "prefork" or name == "uvloop-reuseport":
        return f"{REUSEPORT_PROCESSES} proc"
    if name == "ForkingTCPServer":
        return "proc/conn"
    return "1 proc"


GOALS = (
    Goal("threadpool/ThreadingTCPServer conn/s", "tcp-conn", "rate", "threadpool", "ThreadingTCPServer", 2.5),
    Goal("threadpool/ThreadingTCPServer CPU/conn", "tcp-conn", "cpu", "threadpool", "ThreadingTCPServer", 0.35),
    Goal("threadpool/ThreadingUDPServer datagrams/s", "udp", "rate", "threadpool", "ThreadingUDPServer", 5.0),
    Goal("prefork/ThreadingTCPServer conn/s", "tcp-conn", "rate", "prefork", "ThreadingTCPServer", 3.5),
    Goal("prefork/ForkingTCPServer conn/s", "tcp-conn", "rate", "prefork", "ForkingTCPServer", 15.0),
    Goal("prefork/uvloop conn/s", "tcp-conn", "rate", "prefork", "uvloop", 1.2),
    Goal("prefork/uvloop keep-alive req/s", "tcp-keepalive", "rate", "prefork", "uvloop", 1.0),
    Goal(
        "threadpool/ThreadingTCPServer http close req/s", "http-close", "rate", "threadpool", "ThreadingTCPServer", 1.5
    ),
    Goal("prefork/ThreadingTCPServer http close req/s", "http-close", "rate", "prefork", "ThreadingTCPServer", 2.5),
)
#: prefork against uvloop with as many processes (issue 8, item 12): the goals above
#: compare prefork's cpu_count processes with one uvloop process. No target is set for
#: these yet; they are printed with the goals, marked "ref", and not counted in "goals met".
REFERENCES = (
    Goal("prefork/uvloop-reuseport conn/s", "tcp-conn", "rate", "prefork", "uvloop-reuseport", None),
    Goal("prefork/uvloop-reuseport CPU/conn", "tcp-conn", "cpu", "prefork", "uvloop-reuseport", None),
    Goal("prefork/uvloop-reuseport datagrams/s", "udp", "rate", "prefork", "uvloop-reuseport", None),
    Goal("prefork/uvloop-reuseport keep-alive req/s", "tcp-keepalive", "rate", "prefork", "uvloop-reuseport", None),
)


def goal_labels(scenario: str, names: list[str]) -> dict[str, str]:
    """For each contender of *scenario* that a goal measures against: which strategies."""
    out: dict[str, str] = {}
    for name in names:
        goal_of = sorted({g.num for g in GOALS if g.scenario == scenario and g.den == name})
        ref_of = sorted({g.num for g in REFERENCES if g.scenario == scenario and g.den == name})
        parts = [f"goal for {', '.join(goal_of)}"] if goal_of else []
        parts += [f"reference for {', '.join(ref_of)} (no goal)"] if ref_of else []
        if parts:
            out[name] = " [" + "; ".join(parts) + "]"
    return out


# --------------------------------------------------------------------------- servers (children)


def _echo_loop(self: Any) -> None:
    """Echo 64-byte requests until the client closes."""
    sock = self.request
    while True:
        data = b""
        while len(data) < SIZE:
            chunk = sock.recv(SIZE - len(data))
            if not chunk:
                return
            data += chunk
        sock.sendall(data)


def _page_handler() -> type:
    import http.server

    class PageHandler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; with Nagle's algorithm the body waits
        # for the client's delayed ACK of the headers (40 ms on Linux) on keep-alive
        # connections, which would measure that timer, not the server.
        disable_nagle_algorithm = True

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(PAGE)))
            self.end_headers()
            self.wfile.write(PAGE)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    return PageHandler


def make_server(scenario: Scenario, contender: Contender) -> Any:
    if scenario.uses_wrk:
        handler: type = _page_handler()
    else:
        base_module = importlib.import_module("socketserver" if contender.family == "stdlib" else "sockserve")
        handle = {"conn": h.echo_stream, "keep": _echo_loop, "udp": h.echo_dgram}[scenario.kind]
        handler = h.handler_class(base_module, handle)
    if contender.family == "stdlib":
        import socketserver

        base = getattr(socketserver, contender.what)
    else:
        import sockserve

        base = sockserve.compose(scenario.transport, contender.what, options=dict(contender.options) or None)
    cls = type(base.__name__, (base,), {"request_queue_size": BACKLOG})
    return cls((HOST, 0), handler)


class _Accounting:
    """What a server child reports at the end: context switches and, with --profile, calls.

    Profiling covers every thread started after ``start()`` (each enables its own
    cProfile) and the calling thread; forked processes (forking, prefork workers) are
    not profiled, but their context switches are counted once they have been reaped.
    """

    def __init__(self, profile: bool) -> None:
        self.profiles = h.ThreadProfiles() if profile else None
        self.stats: Any = None
        self.self0: Any = None
        self.children0: Any = None
        self.live0 = (0, 0)

    def start(self) -> None:
        self.mark()
        if self.profiles is not None:
            self.profiles.install(this_thread=True)

    def mark(self) -> None:
        """Start counting context switches here (the end of the warm-up)."""
        self.self0 = resource.getrusage(resource.RUSAGE_SELF)
        self.children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        # Children still running now are counted when reaped, with their past: subtract it.
        self.live0 = _children_switches()

    def stop_self(self) -> None:
        """Before shutting down: this process's own counts (all its threads)."""
        if self.profiles is not None:
            self.stats = self.profiles.stop()
        self.self1 = resource.getrusage(resource.RUSAGE_SELF)

    def report(self, top: int) -> dict[str, Any]:
        """After server_close: reaped children are counted too."""
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out: dict[str, Any] = {
            "nvcsw": self.self1.ru_nvcsw - self.self0.ru_nvcsw,
            "nivcsw": self.self1.ru_nivcsw - self.self0.ru_nivcsw,
            "children_nvcsw": children1.ru_nvcsw - self.children0.ru_nvcsw - self.live0[0],
            "children_nivcsw": children1.ru_nivcsw - self.children0.ru_nivcsw - self.live0[1],
        }
        if self.stats is not None:
            import io

            stats = self.stats
            text = io.StringIO()
            stats.stream = text  # type: ignore[attr-defined]
            stats.sort_stats("tottime").print_stats(top)
            out["calls"] = stats.total_calls  # type: ignore[attr-defined]
            out["top"] = text.getvalue()
        return out


def _children_switches() -> tuple[int, int]:
    """(voluntary, involuntary) context switches so far of this process's live children."""
    voluntary = involuntary = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0, 0
    pids = []
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children") as fh:
                pids += fh.read().split()
        except OSError:
            pass
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/status") as fh:
                    for line in fh:
                        if line.startswith("voluntary_ctxt_switches"):
                            voluntary += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches"):
                            involuntary += int(line.split()[1])
        except OSError:
            pass  # exited meanwhile: then it is counted when reaped, in full
    return voluntary, involuntary


def serve_main(
    scenario_name: str, contender_name: str, life: float, concurrency: int, wrk_conns: int, profile_top: int = 0
) -> None:
    """Child: serve until 'stop' (or end of file) on stdin; print PORT first, a JSON line last.

    With *profile_top*, profile the server (see ``_Accounting``) and put the top functions
    in the JSON line.
    """
    h.watchdog(life)
    scenario = scenarios(concurrency, wrk_conns)[scenario_name]
    contender = scenario.contenders[contender_name]
    accounting = _Accounting(profile_top > 0)
    if contender.family in ("asyncio", "uvloop"):
        if contender.processes:
            _serve_reuseport(scenario, contender, accounting, profile_top, life)
        else:
            _serve_asyncio(scenario, contender, accounting, profile_top)
        return
    server = make_server(scenario, contender)
    accounting.start()  # before the serving thread starts, so that it is profiled
    serving = h.ServingThread(server)
    h.announce_port(server.server_address[1])
    h.serve_commands(accounting.mark)
    h.watchdog(CHILD_GRACE)  # stopping is bounded too
    accounting.stop_self()
    serving.stop(poke_loop=True)  # the standard module's loop only looks every poll_interval
    leaked = contender.family == "sockserve" and "socketserver" in sys.modules and not scenario.uses_wrk
    plugins = h.loaded_plugins(sys.modules["sockserve"]) if contender.family == "sockserve" else []
    h.report({"imported_stdlib": leaked, "plugins": plugins, **accounting.report(profile_top)})


def _new_loop(contender: Contender) -> Any:
    import asyncio

    if contender.family == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


async def _open_endpoint(loop: Any, scenario: Scenario, port: int, reuse_port: bool) -> tuple[int, Any]:
    """Listen on (HOST, *port*) with the scenario's echo; return the port and a closer."""
    import asyncio

    async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await reader.readexactly(SIZE))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def echo_loop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                writer.write(await reader.readexactly(SIZE))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    class EchoDatagram(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.transport.sendto(data, addr)

    if scenario.kind == "udp":
        transport, _ = await loop.create_datagram_endpoint(
            EchoDatagram, local_addr=(HOST, port), reuse_port=reuse_port or None
        )
        return transport.get_extra_info("sockname")[1], transport.close
    handler = echo_once if scenario.kind == "conn" else echo_loop
    server = await asyncio.start_server(handler, HOST, port, backlog=BACKLOG, reuse_port=reuse_port or None)
    return server.sockets[0].getsockname()[1], server.close


def _serve_asyncio(scenario: Scenario, contender: Contender, accounting: _Accounting, profile_top: int) -> None:
    loop = _new_loop(contender)

    async def main() -> None:
        stopped = loop.create_future()

        def watch_stdin() -> None:
            # getrusage covers every thread: any thread may mark
            h.serve_commands(accounting.mark)
            loop.call_soon_threadsafe(lambda: stopped.done() or stopped.set_result(None))

        port, closer = await _open_endpoint(loop, scenario, 0, reuse_port=False)
        h.announce_port(port)
        threading.Thread(target=watch_stdin, daemon=True).start()
        accounting.start()
        await stopped
        accounting.stop_self()
        h.watchdog(CHILD_GRACE)
        closer()

    loop.run_until_complete(main())
    loop.close()
    h.report({"imported_stdlib": False, **accounting.report(profile_top)})


def _serve_reuseport(
    scenario: Scenario, contender: Contender, accounting: _Accounting, profile_top: int, life: float
) -> None:
    """``contender.processes`` event-loop processes, each listening on the same port.

    This process reserves a port (a socket with SO_REUSEPORT bound to port 0, never
    listening), forks the workers, waits until each has bound its own SO_REUSEPORT socket
    to that port, then closes the reservation, so the kernel spreads connections (or
    datagrams) over the workers' sockets only. It then only relays the parent's commands;
    its counters take in the workers once they are reaped, as for prefork. A worker stops
    when the pipe from this process reaches end of file: at 'stop', or if this process dies.
    """
    sock_type = socket.SOCK_DGRAM if scenario.kind == "udp" else socket.SOCK_STREAM
    reservation = socket.socket(socket.AF_INET, sock_type)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reservation.bind((HOST, 0))
    port = reservation.getsockname()[1]
    ready_r, ready_w = os.pipe()
    life_r, life_w = os.pipe()
    pids = []
    for _ in range(contender.processes):
        pid = os.fork()
        if pid == 0:  # a worker
            status = 1
            try:
                reservation.close()
                os.close(ready_r)
                os.close(life_w)
                h.watchdog(life)  # timers do not survive fork
                _reuseport_worker(scenario, contender, port, ready_w, life_r)
                status = 0
            finally:
                os._exit(status)
        pids.append(pid)
    os.close(ready_w)
    os.close(life_r)
    ready = b""
    deadline = time.monotonic() + LINE_TIMEOUT
    while len(ready) < len(pids) and time.monotonic() < deadline:
        chunk = os.read(ready_r, 64)  # every worker writes one byte, or exits (end of file)
        if not chunk:
            break
        ready += chunk
    os.close(ready_r)
    reservation.close()
    if len(ready) < len(pids):
        raise RuntimeError(f"only {len(ready)} of {len(pids)} SO_REUSEPORT workers started")
    h.announce_port(port)
    accounting.start()
    h.serve_commands(accounting.mark)
    accounting.stop_self()
    h.watchdog(CHILD_GRACE)
    os.close(life_w)  # the workers' stop signal
    for pid in pids:
        os.waitpid(pid, 0)  # reaped: their context switches count in RUSAGE_CHILDREN
    h.report({"imported_stdlib": False, **accounting.report(profile_top)})


def _reuseport_worker(scenario: Scenario, contender: Contender, port: int, ready_fd: int, life_fd: int) -> None:
    loop = _new_loop(contender)

    async def main() -> None:
        stopped = loop.create_future()
        _, closer = await _open_endpoint(loop, scenario, port, reuse_port=True)
        os.write(ready_fd, b".")
        os.close(ready_fd)
        loop.add_reader(life_fd, lambda: stopped.done() or stopped.set_result(None))
        await stopped
        loop.remove_reader(life_fd)
        closer()

    loop.run_until_complete(main())
    loop.close()


# --------------------------------------------------------------------------- parent side


CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_table() -> dict[int, tuple[int, float, int]]:
    """pid -> (parent pid, CPU seconds incl. reaped children, start time) for every process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = h._stat_fields(int(name))
        if fields is None:
            continue
        # After the command: state ppid ... utime(14) stime(15) cutime(16) cstime(17) ... starttime(22)
        ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        table[int(name)] = (int(fields[1]), ticks / CLK_TCK, int(fields[19]))
    return table


def tree_cpu(table: dict[int, tuple[int, float, int]], child: Child) -> float:
    """CPU seconds of *child* and all its descendants; remembers the descendants."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total = 0.0
    todo = [child.pid]
    while todo:
        pid = todo.pop()
        if pid not in table:
            continue
        total += table[pid][1]
        if pid != child.pid:
            child.descendants[pid] = table[pid][2]
        todo.extend(children.get(pid, ()))
    return total


def machine_stat() -> dict[str, float]:
    """CPU seconds since boot of the whole machine, from /proc/stat, by kind."""
    with open("/proc/stat") as fh:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fh.readline().split()[1:9])
    return {
        "tasks": (user + nice + system) / CLK_TCK,
        "irq": (irq + softirq) / CLK_TCK,  # loopback TCP/UDP processing largely lands here
        "steal": steal / CLK_TCK,
    }


def machine_shares(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Each kind's share of all CPUs over *wall* seconds."""
    capacity = wall * (os.cpu_count() or 1)
    return {f"{k}_share": (after[k] - before[k]) / capacity if capacity else float("nan") for k in before}


def _pinning(mode: str) -> tuple[set[int] | None, set[int] | None]:
    """(servers, load generator) CPU sets: under ``split`` the load generator gets the first."""
    return h.pinning(mode, servers_on_first=False)


def start_servers(
    scenario_name: str, order: list[str], args: argparse.Namespace, children: list[Child]
) -> dict[str, Child]:
    life = 4 * args.duration * len(order) + args.wrk_duration * 6 * len(order) + CHILD_GRACE + 3 * LINE_TIMEOUT
    server_cpus, _ = _pinning(args.pin)
    servers = {}
    for name in order:
        servers[name] = Child(
            h.script_argv(
                __file__, "_serve", scenario_name, name, str(life),
                str(args.concurrency), str(args.wrk_connections), str(getattr(args, "profile_top", 0)),
            ),
            children,
            server_cpus,
            stderr_path=os.path.join(args.tmp, f"{scenario_name}-{name}-{len(children)}.stderr"),
        )
    return servers


#: The lifecycle plugins a sockserve server reported last (printed once, when they change).
PLUGINS_NOTED: list[str] = []


def stop_servers(servers: dict[str, Child], check_imports: bool) -> dict[str, dict[str, Any]]:
    """Stop the servers; return what each reported (context switches, profile)."""
    for server in servers.values():
        server.send("stop")
    reports = {}
    try:
        for name, server in servers.items():
            reports[name] = report = json.loads(server.readline())
            if check_imports and report["imported_stdlib"]:
                raise RuntimeError(f"the {name} server imported the standard socketserver")
            if report.get("plugins") and report["plugins"] != PLUGINS_NOTED:
                PLUGINS_NOTED[:] = report["plugins"]
                print(h.plugins_note("sockserve", PLUGINS_NOTED), flush=True)
    finally:
        for server in servers.values():
            server.end()
    return reports


class Probe:
    """The load generator in probe mode: records when the whole machine was not running.

    It runs unpinned, one sleeping thread per CPU; an interval in which every CPU's
    thread woke up late is a stall of the machine (on this VM, the host not running it).
    """

    def __init__(self, loadgen: str, seconds: float, children: list[Child]) -> None:
        self.child = Child([loadgen, "probe", str(seconds + LINE_TIMEOUT)], children)
        if self.child.readline() != "READY":
            raise RuntimeError("the stall probe did not start")

    #: False when a probe could not get real-time priority (then CPU contention can pass
    #: for a stall); reported once.
    realtime = True

    def stop(self) -> list[tuple[float, float]]:
        self.child.send("stop")
        try:
            report = json.loads(self.child.readline())
            self.child.wait_rusage(10)
        finally:
            self.child.kill()
        if not report["realtime"] and Probe.realtime:
            Probe.realtime = False
            print("# NOTE the stall probe could not get real-time priority: busy CPUs may pass for stalls")
        return [(a, b) for a, b in report["stalls"]]


def _switches(report: dict[str, Any]) -> int:
    """Context switches a server reported: its threads and its (reaped) children."""
    return sum(report[k] for k in ("nvcsw", "nivcsw", "children_nvcsw", "children_nivcsw"))


def stalled(stalls: list[tuple[float, float]], begin: float, end: float) -> float:
    """Seconds of [begin, end] covered by the stall intervals."""
    return sum(max(0.0, min(end, b) - max(begin, a)) for a, b in stalls)


def round_loadgen(
    scenario_name: str, scenario: Scenario, order: list[str], args: argparse.Namespace, loadgen: str,
    children: list[Child],
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """One round of an echo scenario: every strategy loaded in turn by one load generator."""
    servers: dict[str, Child] = {}
    client: Child | None = None
    probe: Probe | None = None
    _, client_cpus = _pinning(args.pin)
    total = args.duration * len(order)
    try:
        servers = start_servers(scenario_name, order, args, children)
        ports = h.read_ports(servers)
        client = Child(
            [
                loadgen, scenario.kind, str(args.concurrency), str(args.duration), str(args.slice),
                str(args.warmup), "0", str(REQUEST_TIMEOUT), *(str(ports[n]) for n in order),
            ],
            children,
            client_cpus,
        )
        if client.readline() != "READY":
            raise RuntimeError("the load generator did not get ready")
        h.mark_all(servers)
        probe = Probe(loadgen, total + REQUEST_TIMEOUT, children)
        table = process_table()
        cpu0 = {n: tree_cpu(table, s) for n, s in servers.items()}
        stat0 = machine_stat()
        client.send("GO")
        report = json.loads(client.readline(total + LINE_TIMEOUT))
        table = process_table()
        cpu1 = {n: tree_cpu(table, s) for n, s in servers.items()}
        stat1 = machine_stat()
        stalls = probe.stop()
        client.wait_rusage(10)
        reports = stop_servers(servers, check_imports=True)
    finally:
        for child in (client, probe.child if probe else None, *servers.values()):
            if child is not None:
                child.kill()
    t0, wall = report["t0"], report["wall"]
    # A stalled machine charges the stall to whatever process was running (measured here:
    # a spinning process was charged most of the time it did not run), so CPU times are
    # scaled by the share of the load during which the machine ran.
    running_share = max(1e-9, 1 - stalled(stalls, t0, t0 + wall) / wall)
    results = {}
    for name, tally in zip(order, report["targets"]):
        rates, counted, running = [], 0, 0.0
        for k, count in tally["slices"]:
            begin = t0 + k * args.slice
            length = min(args.slice, total - k * args.slice)
            ran = length - stalled(stalls, begin, begin + length)
            counted += count
            running += ran
            if ran >= MIN_RUNNING * length:
                rates.append(count / ran)
        done = tally["done"]
        cpu = (cpu1[name] - cpu0[name]) * running_share
        results[name] = {
            # Requests started in this server's slices and completed, per second of those
            # slices during which the machine ran.
            "rate": counted / running if running >= MIN_RAN else float("nan"),
            # The median over slices that ran at least MIN_RUNNING of their length (noisier:
            # few slices survive on a machine that stalls most of the time).
            "rate_slice_median": h.median(rates),
            "rate_wall": done / args.duration,
            "running": running,
            "cpu_us": cpu / done * 1e6 if done else float("nan"),
            "loadgen_share": tally["cpu"] / args.duration,
            "p50_us": tally["p50_us"],
            "p99_us": tally["p99_us"],
            "errors": tally["errors"] + tally["lost"],
            "server_errors": servers[name].handler_errors(),
            "switches": _switches(reports[name]) / done if done else float("nan"),
            "done": done,
        }
        if "calls" in reports[name]:
            results[name]["calls"] = reports[name]["calls"] / done if done else float("nan")
            results[name]["top"] = reports[name]["top"]
    ncpu = os.cpu_count() or 1
    servers_cpu = sum(cpu1[n] - cpu0[n] for n in order)
    machine = {
        "wall": wall,
        "stalled_share": 1 - running_share,
        **machine_shares(stat0, stat1, wall),
        "loadgen_share": report["cpu"] / wall / ncpu,
        "servers_share": servers_cpu / wall / ncpu,
    }
    machine["other_share"] = machine["tasks_share"] - machine["loadgen_share"] - machine["servers_share"]
    return results, machine


_WRK_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 6e7}


def parse_wrk(text: str, close: bool) -> dict[str, float]:
    """Requests, seconds, errors and latency percentiles from wrk's report.

    With ``Connection: close`` wrk counts a read error for every response after which
    the server closes the connection, as it should; only read errors beyond one per
    response are counted then.
    """
    match = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise RuntimeError(f"cannot read wrk's output:\n{text}")
    requests = int(match.group(1))
    seconds = float(match.group(2)) * _WRK_UNITS[match.group(3)] / 1e6
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        connect, read, write, timeout = (int(g) for g in sock.groups())
        if close:
            read = max(0, read - requests)
        errors += connect + read + write + timeout
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if bad:
        errors += int(bad.group(1))
    latency = {}
    for pct in ("50", "99"):
        found = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        latency[pct] = float(found.group(1)) * _WRK_UNITS[found.group(2)] if found else float("nan")
    return {
        "requests": requests, "seconds": seconds, "errors": errors, "p50_us": latency["50"], "p99_us": latency["99"]
    }


def _http_warmup(port: int) -> None:
    """A few requests, so that pools and workers exist before wrk measures."""
    request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    for _ in range(20):
        with socket.create_connection((HOST, port), timeout=REQUEST_TIMEOUT) as sock:
            sock.sendall(request)
            while sock.recv(65536):
                pass


def round_wrk(
    scenario_name: str, scenario: Scenario, order: list[str], args: argparse.Namespace, loadgen: str,
    children: list[Child],
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """One round of an HTTP scenario: one wrk run per strategy, back to back."""
    servers: dict[str, Child] = {}
    _, client_cpus = _pinning(args.pin)
    results: dict[str, dict[str, float]] = {}
    machine = {"wall": 0.0, "stalled": 0.0, "tasks": 0.0, "irq": 0.0, "steal": 0.0, "loadgen": 0.0, "servers": 0.0}
    try:
        servers = start_servers(scenario_name, order, args, children)
        ports = h.read_ports(servers)
        for name in order:
            _http_warmup(ports[name])
            h.mark_all({name: servers[name]})
            argv = [
                "wrk", "-t1", f"-c{args.wrk_connections}", f"-d{args.wrk_duration}s",
                f"--timeout={int(REQUEST_TIMEOUT)}s", "--latency",
            ]
            if scenario.kind == "http-close":
                argv += ["-H", "Connection: close"]
            argv.append(f"http://{HOST}:{ports[name]}/")
            probe = Probe(loadgen, args.wrk_duration + REQUEST_TIMEOUT, children)
            try:
                table = process_table()
                cpu0 = tree_cpu(table, servers[name])
                stat0 = machine_stat()
                started = time.monotonic()
                wrk = Child(argv, children, client_cpus, stdin=False)
                try:
                    text = wrk.read_all(args.wrk_duration + LINE_TIMEOUT)
                    wrk.wait_rusage(10)
                finally:
                    wrk.kill()
                ended = time.monotonic()
                table = process_table()
                cpu1 = tree_cpu(table, servers[name])
                stat1 = machine_stat()
                stalls = probe.stop()
            finally:
                probe.child.kill()
            wall = ended - started
            lost = stalled(stalls, started, ended)
            parsed = parse_wrk(text, scenario.kind == "http-close")
            done = parsed["requests"]
            ran = parsed["seconds"] - lost
            running_share = max(1e-9, 1 - lost / wall)
            wrk_cpu = wrk.rusage.ru_utime + wrk.rusage.ru_stime if wrk.rusage else float("nan")
            results[name] = {
                "rate": done / ran if ran >= MIN_RAN else float("nan"),
                "rate_wall": done / parsed["seconds"],
                "running": max(0.0, ran),
                "cpu_us": (cpu1 - cpu0) * running_share / done * 1e6 if done else float("nan"),
                "loadgen_share": wrk_cpu / wall,
                "p50_us": parsed["p50_us"],
                "p99_us": parsed["p99_us"],
                "errors": parsed["errors"],
                "done": done,
            }
            machine["wall"] += wall
            machine["stalled"] += lost
            for kind in ("tasks", "irq", "steal"):
                machine[kind] += stat1[kind] - stat0[kind]
            machine["loadgen"] += wrk_cpu
            machine["servers"] += cpu1 - cpu0
        reports = stop_servers(servers, check_imports=False)
    finally:
        for server in servers.values():
            server.kill()
    for name in order:
        results[name]["server_errors"] = servers[name].handler_errors()
        done = results[name]["done"]
        results[name]["switches"] = _switches(reports[name]) / done if done else float("nan")
    ncpu = os.cpu_count() or 1
    out = {
        "wall": machine["wall"],
        "stalled_share": machine["stalled"] / machine["wall"] if machine["wall"] else float("nan"),
        **{f"{k}_share": machine[k] / machine["wall"] / ncpu for k in ("tasks", "irq", "steal")},
        "loadgen_share": machine["loadgen"] / machine["wall"] / ncpu,
        "servers_share": machine["servers"] / machine["wall"] / ncpu,
    }
    out["other_share"] = out["tasks_share"] - out["loadgen_share"] - out["servers_share"]
    return results, out


# --------------------------------------------------------------------------- statistics and output


def summarize(runs: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, Any]:
    table: dict[str, dict[str, dict[str, float]]] = {}
    for scenario, by_name in runs.items():
        table[scenario] = {}
        for name, rounds in by_name.items():
            rates = [r["rate"] for r in rounds if r["rate"] == r["rate"]] or [float("nan")]
            table[scenario][name] = {
                "rate": h.median(rates),
                "rate_min": min(rates),
                "rate_max": max(rates),
                "rate_wall": h.median([r["rate_wall"] for r in rounds]),
                "running": sum(r["running"] for r in rounds),
                "cpu_us": h.median([r["cpu_us"] for r in rounds]),
                "loadgen_share": h.median([r["loadgen_share"] for r in rounds]),
                "p50_us": h.median([r["p50_us"] for r in rounds]),
                "p99_us": h.median([r["p99_us"] for r in rounds]),
                "errors": sum(r["errors"] for r in rounds),
                "server_errors": sum(r.get("server_errors", 0) for r in rounds),
                "switches": h.median([r["switches"] for r in rounds]),
                "done": sum(r["done"] for r in rounds),
            }
    goals = []
    for goal in (*GOALS, *REFERENCES):
        by_name = runs.get(goal.scenario, {})
        described = {**goal.__dict__, "compares": goal.compares, "reference": goal.target is None}
        if goal.num not in by_name or goal.den not in by_name:
            goals.append({"goal": described, "measured": False})
            continue
        key = "rate" if goal.metric == "rate" else "cpu_us"
        # Both sides' figures per round come from the same interleaved load.
        figure = h.paired([r[key] for r in by_name[goal.den]], [r[key] for r in by_name[goal.num]])
        if figure["ratio"] != figure["ratio"]:  # a side never ran long enough for a rate (the machine stalled)
            goals.append({"goal": described, "measured": False})
            continue
        goals.append({
            "goal": described,
            "measured": True,
            "ratio": figure["ratio"],
            "min": figure["min"],
            "max": figure["max"],
            "iqr": figure["iqr"],
            "rounds": figure["rounds"],
            "met": goal.met(figure["ratio"]),
        })
    return {"table": table, "goals": goals}


def print_results(
    summary: dict[str, Any], machine: dict[str, list[dict[str, float]]], scen: dict[str, Scenario]
) -> None:
    print()
    print("Medians over rounds. rate: requests (connections, datagrams) per second of the time the")
    print("machine ran (min-max over rounds); wall: per wall-clock second, stalls included; ran s:")
    print("seconds of load that ran, all rounds; srv CPU: server CPU per request, all its processes")
    print("and threads; ctx sw: the server's context switches per request (all its threads and")
    print("processes); loadgen: the load generator's (wrk's) CPU while loading that server, share of")
    print("one CPU; p50/p99: latency; errors: failed or lost requests; srv err: tracebacks the server")
    print("printed through handle_error.")
    header = (
        f"{'scenario':<15}{'strategy':<19}{'rate/s':>8}{'min-max':>14}{'wall':>7}{'ran s':>7}"
        f"{'srv CPU us':>11}{'ctx sw':>7}{'loadgen':>8}{'p50 us':>8}{'p99 us':>9}{'errors':>7}{'srv err':>8}"
    )
    print(header)
    print("-" * len(header))
    for scenario, by_name in summary["table"].items():
        for name, row in by_name.items():
            print(
                f"{scenario:<15}{name:<19}{row['rate']:>8.0f}{row['rate_min']:>7.0f}-{row['rate_max']:<6.0f}"
                f"{row['rate_wall']:>7.0f}{row['running']:>7.1f}{row['cpu_us']:>11.1f}{row['switches']:>7.2f}"
                f"{row['loadgen_share']:>7.0%} "
                f"{row['p50_us']:>8.0f}{row['p99_us']:>9.0f}{row['errors']:>7d}{row['server_errors']:>8d}"
            )
    print()
    print("Machine during the measured load (median over rounds): share of the time it was stalled")
    print("(not run by its host); shares of all CPUs over the wall-clock time: processes (/proc/stat")
    print("user+system), irq+softirq (much of the loopback network work), steal; the benchmark's")
    print("processes (as charged to them); other processes = processes - benchmark:")
    for scenario, rows in machine.items():
        print(
            f"  {scenario:<15} stalled {h.median([r['stalled_share'] for r in rows]):.0%}  "
            f"processes {h.median([r['tasks_share'] for r in rows]):.0%}  "
            f"irq {h.median([r['irq_share'] for r in rows]):.0%}  "
            f"steal {h.median([r['steal_share'] for r in rows]):.0%}  "
            f"load generator {h.median([r['loadgen_share'] for r in rows]):.0%}  "
            f"servers {h.median([r['servers_share'] for r in rows]):.0%}  "
            f"other processes {h.median([r['other_share'] for r in rows]):.0%}"
        )
    print()
    print("Goals: ratio of the medians; min-max and IQR of the per-round ratios; compares: the")
    print("processes serving on each side (strategy vs contender); ref: a reference, no goal set.")
    header = f"{'goal':<48}{'ratio':>8}{'min-max':>13}{'IQR':>13}{'goal':>9}  met  compares"
    print(header)
    print("-" * len(header))
    for g in summary["goals"]:
        goal = g["goal"]
        op = ">=" if goal["metric"] == "rate" else "<="
        target = f"{op:>4}{goal['target']:<5}" if goal["target"] is not None else f"{'ref':>9}"
        if not g["measured"]:
            print(f"{goal['label']:<48}{'not measured / no data':>34}{target}  n/a  {goal['compares']}")
            continue
        met = "-  " if g["met"] is None else "yes" if g["met"] else "NO "
        print(
            f"{goal['label']:<48}{g['ratio']:>7.2f}x{g['min']:>7.2f}-{g['max']:<5.2f}"
            f"{g['iqr'][0]:>7.2f}-{g['iqr'][1]:<5.2f}{target}  {met}  {goal['compares']}"
        )


def summary_line(summary: dict[str, Any], load: float) -> str:
    parts = []
    met = measured = 0
    for g in summary["goals"]:
        goal = g["goal"]
        if goal["reference"]:
            continue  # in the goals table, not in the summary line
        op = ">=" if goal["metric"] == "rate" else "<="
        if not g["measured"]:
            parts.append(f"{goal['label']} n/a")
            continue
        measured += 1
        met += g["met"]
        parts.append(
            f"{goal['label']} {g['ratio']:.2f}x ({g['min']:.2f}-{g['max']:.2f}) {op}{goal['target']:g} "
            f"{'met' if g['met'] else 'MISSED'}"
        )
    return h.summary_line(f"goals met {met}/{measured}", "; ".join(parts), f"load {load:.2f}")


def plot(summary: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary["table"]
    names = list(table)
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.0 + 1.0 * sum(len(table[n]) for n in names) / 2.2))
    if len(names) == 1:
        axes = [axes]
    colours = {"sockserve": "#2b6cb0", "stdlib": "#a0a0a0", "ref": "#d69e2e"}
    for ax, scenario in zip(axes, names):
        rows = table[scenario]
        labels = list(rows)
        values = [rows[n]["rate"] for n in labels]
        low = [rows[n]["rate"] - rows[n]["rate_min"] for n in labels]
        high = [rows[n]["rate_max"] - rows[n]["rate"] for n in labels]
        kinds = [
            "sockserve" if n in ("threadpool", "prefork")
            else "ref" if n.startswith(("asyncio", "uvloop"))
            else "stdlib"
            for n in labels
        ]
        y = range(len(labels))
        ax.barh(y, values, xerr=[low, high], color=[colours[k] for k in kinds], capsize=3)
        ax.set_yticks(list(y))
        ax.set_yticklabels(labels)
        ax.invert_yaxis()
        ax.set_title(scenario, fontsize=10, loc="left")
        ax.set_xlabel(summary["units"][scenario] + " (median over rounds, whiskers min-max)", fontsize=8)
        for yi, v, hi in zip(y, values, high):
            if v == v:
                ax.text(v + (hi if hi == hi else 0), yi, f"  {v:,.0f}", va="center", fontsize=8)
        ax.margins(x=0.15)
    from matplotlib.patches import Patch

    fig.legend(
        handles=[Patch(color=colours[k], label=t) for k, t in (
            ("sockserve", "sockserve"), ("stdlib", "standard socketserver"), ("ref", "asyncio / uvloop"))],
        loc="upper right", fontsize=8,
    )
    fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile_all(
    chosen: dict[str, list[str]], scen: dict[str, Scenario], args: argparse.Namespace, loadgen: str,
    children: list[Child],
) -> None:
    """Each strategy alone under the load generator, its threads under cProfile."""
    args.warmup = 0.0  # the profile covers the whole life of the server: no unmeasured load
    for name, names in chosen.items():
        if scen[name].uses_wrk:
            print(f"# --profile: {name} skipped (echo scenarios only)")
            continue
        for strategy in names:
            results, mach = round_loadgen(name, scen[name], [strategy], args, loadgen, children)
            r = results[strategy]
            forks = strategy in ("prefork", "ForkingTCPServer", "uvloop-reuseport")
            calls = "n/a (requests run in forked processes, not profiled)" if forks else (
                f"{r.get('calls', float('nan')):.1f}"
            )
            print(
                f"=== {name} / {strategy}: {r['done']} requests, {r['rate']:.0f}/s under cProfile "
                f"(machine stalled {mach['stalled_share']:.0%}); per request: Python calls {calls}, "
                f"context switches {r['switches']:.2f} (all threads and processes)"
            )
            print(r.get("top", ""))


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput of sockserve's threadpool and prefork against the standard socketserver."
    )
    parser.add_argument("--rounds", type=int, default=7, help="rounds (default 7)")
    parser.add_argument(
        "--duration", type=float, default=1.0,
        help="measured seconds per strategy per round, echo scenarios (default 1.0)",
    )
    parser.add_argument(
        "--wrk-duration", type=int, default=1, help="seconds of each wrk run, HTTP scenarios (default 1)"
    )
    parser.add_argument("--slice", type=float, default=0.1, help="seconds on one server before the next (default 0.1)")
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="unmeasured seconds per round, echo scenarios (default 0.5)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=8,
        help="connections in flight / open connections / outstanding datagrams (default 8)",
    )
    parser.add_argument("--wrk-connections", type=int, default=8, help="wrk connections (default 8)")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIO_NAMES), help=f"comma-separated subset of {', '.join(SCENARIO_NAMES)}"
    )
    parser.add_argument(
        "--strategies", default="",
        help="comma-separated subset of strategies (default: all of each scenario)",
    )
    parser.add_argument(
        "--pin", choices=("none", "split", "same"), default="none",
        help="none (default): the scheduler places everything (the multi-process strategies need "
        "both CPUs); split: servers on the last CPUs, load generator on the first; same: all on one CPU",
    )
    parser.add_argument(
        "--profile", action="store_true",
        help="instead of the benchmark: each strategy of the echo scenarios alone for --duration "
        "seconds under cProfile; prints Python calls and context switches per request and the "
        "top functions",
    )
    parser.add_argument("--profile-top", type=int, default=15, help="rows of --profile output (default 15)")
    parser.add_argument("--json", metavar="PATH", help="write every round and the summary as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of throughput per strategy (needs matplotlib)")
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIO_NAMES]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIO_NAMES)}")
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if args.rounds < 1 or args.duration <= 0 or args.wrk_duration < 1 or args.warmup < 0:
        parser.error("--rounds, --wrk-duration >= 1, --duration > 0, --warmup >= 0")
    if not 0 < args.slice <= args.duration:
        parser.error("--slice must be > 0 and at most --duration")
    if not 1 <= args.concurrency <= 1024 or not 1 <= args.wrk_connections <= 1024:
        parser.error("--concurrency and --wrk-connections must be 1..1024")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    scen = scenarios(args.concurrency, args.wrk_connections)
    chosen: dict[str, list[str]] = {}
    notes = []
    if importlib.util.find_spec("sockserve") is None:
        print(
            f"sockserve is not importable by {sys.executable}: run this with the Python of an "
            "environment where it is installed (pip install -e .)",
            file=sys.stderr,
        )
        return 2
    skipped: set[str] = set()
    if importlib.util.find_spec("uvloop") is None:
        skipped |= {"uvloop", "uvloop-reuseport"}
        notes.append(
            "uvloop is not installed: contenders uvloop and uvloop-reuseport skipped "
            "(pip install uvloop); the goals against them read 'not measured'"
        )
    elif not hasattr(socket, "SO_REUSEPORT"):
        skipped.add("uvloop-reuseport")
        notes.append("socket.SO_REUSEPORT is not available here: contender uvloop-reuseport skipped")
    have_wrk = shutil.which("wrk") is not None
    for name in args.scenarios:
        if scen[name].uses_wrk and not have_wrk:
            notes.append(f"wrk not found: scenario {name} skipped (apt-get install wrk)")
            continue
        names = [n for n in scen[name].contenders if not args.strategies or n in args.strategies]
        names = [n for n in names if n not in skipped]
        if names:
            chosen[name] = names
    if not chosen:
        print("nothing to run", file=sys.stderr)
        return 2
    load = os.getloadavg()[0]
    started_at = datetime.datetime.now(datetime.timezone.utc)
    print(f"{h.machine_line(started_at)}  pin={args.pin}")
    print(
        f"# rounds={args.rounds} duration={args.duration}s/strategy slice={args.slice}s "
        f"warmup={args.warmup}s concurrency={args.concurrency} wrk: {args.wrk_duration}s/strategy, "
        f"{args.wrk_connections} connections"
    )
    for name, names in chosen.items():
        labels = goal_labels(name, names)
        print(
            f"# {name}: "
            + "; ".join(f"{n} = {scen[name].contenders[n].describe()}{labels.get(n, '')}" for n in names)
        )
    for note in notes:
        print(f"# NOTE {note}")
    children: list[Child] = []
    runs: dict[str, dict[str, list[dict[str, float]]]] = {s: {n: [] for n in names} for s, names in chosen.items()}
    machine: dict[str, list[dict[str, float]]] = {s: [] for s in chosen}
    loads = [load]
    begun = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_throughput-") as tmp:
        args.tmp = tmp
        loadgen = h.compile_loadgen(tmp)  # also the stall probe
        if args.profile:
            try:
                profile_all(chosen, scen, args, loadgen, children)
            finally:
                h.kill_all(children)
            return 0
        args.profile_top = 0
        try:
            for rnd in range(args.rounds):
                for index, (name, names) in enumerate(chosen.items()):
                    order = h.rotation(names, rnd + index)
                    if scen[name].uses_wrk:
                        results, mach = round_wrk(name, scen[name], order, args, loadgen, children)
                    else:
                        results, mach = round_loadgen(name, scen[name], order, args, loadgen, children)
                    for n, r in results.items():
                        runs[name][n].append(r)
                    machine[name].append(mach)
                loads.append(os.getloadavg()[0])
                line = "  ".join(
                    f"{s}: " + " ".join(f"{n} {runs[s][n][-1]['rate']:.0f}" for n in names)
                    for s, names in chosen.items()
                )
                print(f"# round {rnd + 1}/{args.rounds} ({time.monotonic() - begun:.0f}s) {line}", flush=True)
        finally:
            h.kill_all(children)
    summary = summarize(runs)
    summary["units"] = {s: scen[s].unit for s in chosen}
    print_results(summary, machine, scen)
    elapsed = time.monotonic() - begun
    print(f"# wall time {elapsed:.0f}s; load average at the start and after each round: "
          + " ".join(f"{x:.2f}" for x in loads))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "started": started_at.isoformat(timespec="seconds"),
                    "args": vars(args),
                    "loads": loads,
                    "runs": runs,
                    "machine": machine,
                    "summary": summary,
                },
                fh,
                indent=1,
            )
    if args.plot:
        title = (
            f"sockserve throughput, {started_at:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} vCPUs, "
            f"load {h.median(loads):.1f}, {args.rounds} rounds"
        )
        plot(summary, args.plot, title)
        print(f"# plot written to {args.plot}")
    print(summary_line(summary, h.median(loads)))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        serve_main(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]))
    else:
        sys.exit(main(sys.argv[1:]))
