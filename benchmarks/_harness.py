"""What the benchmark scripts share: one copy of each piece (issue 8, item 8).

Belongs here, used by ``bench_stdlib.py``, ``bench_throughput.py``, ``bench_processpool.py``
and ``hardening_figures.py``:

- running a server: in a thread of this process (``ServingThread``: ``serve_forever`` on
  127.0.0.1 port 0, a prompt ``shutdown()`` even for the standard module's 0.5 s poll, then
  ``server_close()``), or in a child process speaking a line protocol (``PORT <n>`` first,
  then ``mark`` / ``OK`` and ``stop`` on stdin: ``announce_port``, ``serve_commands`` on the
  child's side, ``Child``, ``read_ports``, ``mark_all`` on the parent's), with watchdogs and
  kill-by-pid;
- the echo handler and client request they all use, with the 64-byte payload;
- building the C load generator (``loadgen.c``, compiled with ``cc`` at run time);
- A/B interleaving: the rotation of who goes first, and the loop that switches servers
  every slice on the shared monotonic clock;
- statistics: NaN-safe medians and ratios, the paired summary of per-round ratios (median
  ratio, min-max, interquartile range), and the one ``SUMMARY`` line.

Not here: what a script measures (its scenarios, goals, tables), and anything that imports
``socketserver`` or ``sockserve``: a benchmark's server process must import only the module
under test, so this module imports neither.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

HOST = "127.0.0.1"
#: The echo request of every scenario: 64 bytes, small enough that the server's per-request
#: work, not the copying, is what is measured.
PAYLOAD = b"0123456789abcdef" * 4
#: serve_forever's poll interval in the servers: the documented default, as users run it.
#: A shorter one would wake an idle server many times a second, and in a VM each timed-out
#: wait can cost milliseconds of CPU; ``ServingThread.stop(poke=True)`` makes the standard
#: module's shutdown() prompt instead.
POLL_INTERVAL = 0.5
#: Seconds a child may live past its planned work before its watchdog ends it, and the
#: bound on every wait for a thread or process to stop.
CHILD_GRACE = 30.0
#: Seconds the parent waits for one line of a child's protocol before giving up.
LINE_TIMEOUT = 30.0
#: Timeout of every Python client's socket operations: generous for loopback, short enough
#: that a dead server shows up as errors instead of a stall.
CLIENT_TIMEOUT = 2.0
#: listen() backlog of the servers under load: the standard default of 5 drops SYNs under
#: 8 concurrent connects, and a dropped SYN costs a one-second retransmission, which would
#: be measured instead of the servers.
BACKLOG = 128
#: The load generator's source, next to this file.
LOADGEN_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loadgen.c")

# --------------------------------------------------------------------------- in any process


def watchdog(seconds: float) -> None:
    """End this process (status 3) after *seconds*, whatever it is doing."""
    timer = threading.Timer(seconds, os._exit, args=(3,))
    timer.daemon = True
    timer.start()


def cpu_seconds(children: bool = False) -> float:
    """User + system CPU of this process (all threads), and of its reaped children if asked."""
    whos = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) if children else (resource.RUSAGE_SELF,)
    total = 0.0
    for who in whos:
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def echo_stream(self: Any) -> None:
    """Handler body: read one payload from the connection and send it back."""
    sock = self.request
    data = b""
    while len(data) < len(PAYLOAD):
        chunk = sock.recv(len(PAYLOAD) - len(data))
        if not chunk:
            return
        data += chunk
    sock.sendall(data)


def echo_dgram(self: Any) -> None:
    """Handler body: send the datagram back to where it came from."""
    data, sock = self.request
    sock.sendto(data, self.client_address)


def handler_class(module: Any, handle: Callable[[Any], None]) -> type:
    """The same *handle* on *module*'s BaseRequestHandler (the module under test)."""
    return type("EchoHandler", (module.BaseRequestHandler,), {"handle": handle})


def stream_request(address: tuple[str, int], timeout: float) -> bool:
    """One connection: send the payload, read the echo, close; True if it came back whole."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(PAYLOAD)
        data = b""
        while len(data) < len(PAYLOAD):
            chunk = sock.recv(len(PAYLOAD) - len(data))
            if not chunk:
                break
            data += chunk
        return data == PAYLOAD
    finally:
        sock.close()


def poke(address: tuple[str, int], sock_type: int, timeout: float = 1.0) -> None:
    """Send an empty request, so that a server waiting in poll() takes a turn of its loop."""
    with socket.socket(socket.AF_INET, sock_type) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            sock.send(b"")
        except OSError:
            pass


class ServingThread:
    """``server.serve_forever(poll_interval)`` in a thread, started at once.

    ``raised`` holds the exception that ended ``serve_forever``, if one did (a raising
    ``verify_request`` override ends the standard module's loop, and sockserve's).
    """

    def __init__(self, server: Any, poll_interval: float = POLL_INTERVAL, daemon: bool = False) -> None:
        self.server = server
        self.raised: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(poll_interval,), name="serve_forever", daemon=daemon
        )
        self.thread.start()

    def _run(self, poll_interval: float) -> None:
        try:
            self.server.serve_forever(poll_interval)
        except BaseException as exc:  # noqa: BLE001 - kept for the caller to report
            self.raised = exc

    @property
    def address(self) -> Any:
        return self.server.server_address

    def stop(self, poke_loop: bool = False, close: bool = True, timeout: float = CHILD_GRACE) -> None:
        """Call ``shutdown()`` (unless the loop already ended), join, then ``server_close()``.

        With *poke_loop*, send empty requests every 50 ms while ``shutdown()`` waits: the
        standard module looks at its shutdown flag only once per ``poll_interval``. (Off
        where a poke would be measured: each one forks a child in ForkingTCPServer.)
        """
        if self.thread.is_alive():
            stopper = threading.Thread(target=self.server.shutdown, name="shutdown", daemon=True)
            stopper.start()
            deadline = time.monotonic() + timeout
            address = (HOST, self.server.server_address[1])
            while poke_loop and stopper.is_alive() and time.monotonic() < deadline:
                poke(address, self.server.socket_type)
                stopper.join(0.05)
            stopper.join(max(0.0, deadline - time.monotonic()))
        self.thread.join(timeout)
        if close:
            self.server.server_close()

    def __enter__(self) -> ServingThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ThreadProfiles:
    """One cProfile.Profile per thread started after ``install()``; merged by ``stop()``.

    cProfile only sees the thread that enabled it, so every new thread (the serving thread,
    each request thread of a threading server, each pool thread) enables its own.
    """

    def __init__(self) -> None:
        self.profiles: list[Any] = []

    def _start(self, *args: Any) -> None:
        import cProfile

        profile = cProfile.Profile()
        self.profiles.append(profile)  # list.append is atomic
        profile.enable()  # replaces this hook for the rest of the thread

    def install(self, this_thread: bool = False) -> None:
        threading.setprofile(self._start)
        if this_thread:
            self._start()

    def stop(self) -> Any:
        """Stop every profile; return their merged ``pstats.Stats``, or None if none ran."""
        import pstats

        threading.setprofile(None)
        stats = None
        for profile in list(self.profiles):
            profile.disable()
            if stats is None:
                stats = pstats.Stats(profile)
            else:
                stats.add(profile)
        return stats


# --------------------------------------------------------------------------- a server child


def loaded_plugins(module: Any) -> list[str]:
    """Names of the lifecycle plugins *module* (sockserve) has loaded; [] for the standard module.

    An installed distribution's auto-loaded plugin runs its hooks on every request and is
    measured with the library (the example distribution's request counter took udp-sync
    from 0.99-1.04x to 0.67-0.77x in runs of 2026-12-03), so the scripts say when there is one.
    """
    manager = getattr(module, "get_plugin_manager", None)
    if manager is None:
        return []
    return sorted(name for name, _ in manager().list_name_plugin() if name)


def plugins_note(who: str, names: list[str]) -> str:
    """The NOTE a parent prints when a sockserve server ran with lifecycle plugins loaded."""
    return (
        f"# NOTE the {who} server(s) ran with lifecycle plugins loaded: {', '.join(names)}; their hooks "
        "are measured too (SOCKSERVE_DISABLE_PLUGIN_AUTOLOAD=1 measures the library alone)"
    )


def announce_port(port: int) -> None:
    """The child's first line: the port it serves on (it bound port 0)."""
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()


def serve_commands(on_mark: Callable[[], None] | None = None) -> None:
    """Read the parent's commands until ``stop`` or end of file (the parent went away).

    ``mark`` (the end of the warm-up) calls *on_mark* and answers ``OK``.
    """
    for line in sys.stdin:
        command = line.strip()
        if command == "mark":
            if on_mark is not None:
                on_mark()
            sys.stdout.write("OK\n")
            sys.stdout.flush()
        elif command == "stop":
            break


def report(figures: Any) -> None:
    """The child's last line: what it measured, as JSON."""
    sys.stdout.write(json.dumps(figures) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- the parent


def script_argv(script: str, *args: str) -> list[str]:
    """The command line that runs *script* (a benchmark file) with this Python."""
    return [sys.executable, os.path.abspath(script), *args]


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after it.
    return raw[raw.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """When *pid* started (clock ticks since boot): tells a process from a reused pid."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


class Child:
    """A child process with a line protocol over its stdin/stdout, read with timeouts.

    Every child is put in *registry*; whatever happens, the caller kills the registry's
    children by pid at the end (``kill_all``). ``descendants`` (pid -> start time) are
    processes the child started that the caller saw (prefork workers): killed with it.
    """

    def __init__(
        self, argv: list[str], registry: list[Child], cpus: set[int] | None = None, stdin: bool = True,
        stderr_path: str = "",
    ) -> None:
        self.argv = argv
        self.stderr_path = stderr_path
        stderr = open(stderr_path, "wb") if stderr_path else None
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                bufsize=0,
            )
        finally:
            if stderr is not None:
                stderr.close()
        registry.append(self)
        self.pid = self.proc.pid
        self._buffer = b""
        self.rusage: Any = None
        self.descendants: dict[int, int] = {}
        if cpus:
            try:
                os.sched_setaffinity(self.pid, cpus)
            except OSError:
                pass

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
        except BrokenPipeError:
            pass

    def readline(self, timeout: float = LINE_TIMEOUT) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError(f"child {self.pid} ({self.argv[1:4]}) said nothing for {timeout}s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(
                    f"child {self.pid} ({self.argv[1:4]}) exited (status {self.proc.poll()})"
                    + self._stderr_tail()
                )
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def read_all(self, timeout: float) -> str:
        """Everything the child writes until it closes its output (for wrk)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError(f"child {self.pid} did not finish within {timeout}s")
            chunk = os.read(fd, 65536)
            if not chunk:
                return self._buffer.decode(errors="replace")
            self._buffer += chunk

    def wait_rusage(self, timeout: float) -> int | None:
        """Reap the child with wait4 (keeping its resource usage); kill it on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status, rusage = os.wait4(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.proc.returncode
            if pid:
                self.rusage = rusage
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                return self.proc.returncode
            if time.monotonic() > deadline:
                self.kill()
                return None
            time.sleep(0.01)

    def _stderr_tail(self, lines: int = 12) -> str:
        if not self.stderr_path:
            return ""
        try:
            with open(self.stderr_path, "rb") as fh:
                tail = fh.read().decode(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return ("; its stderr ends:\n" + "\n".join(tail)) if tail else ""

    def handler_errors(self) -> int:
        """Tracebacks the server printed through handle_error (its stderr goes to a file)."""
        if not self.stderr_path:
            return 0
        try:
            with open(self.stderr_path, "rb") as fh:
                return fh.read().count(b"Exception occurred during processing of request")
        except OSError:
            return 0

    def kill(self) -> None:
        """Kill this child (by pid) if it runs, reap it, then any descendant left behind."""
        if self.proc.returncode is None and self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for pid, started in self.descendants.items():
            if start_time(pid) == started:  # still the process we saw, not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def end(self, timeout: float = 10.0) -> None:
        """Wait for the child to exit (and its descendants, briefly), then kill what is left."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(
            start_time(pid) == started for pid, started in self.descendants.items()
        ):
            time.sleep(0.02)
        self.kill()


def kill_all(children: Sequence[Child]) -> None:
    """Kill every child started (each by its own pid), whatever state the run is in."""
    for child in children:
        child.kill()


def read_ports(servers: dict[str, Child]) -> dict[str, int]:
    """Each server child's ``PORT <n>`` line."""
    ports = {}
    for name, server in servers.items():
        words = server.readline().split()
        if len(words) != 2 or words[0] != "PORT":
            raise RuntimeError(f"server {name} said {words!r} instead of its port")
        ports[name] = int(words[1])
    return ports


def mark_all(servers: dict[str, Child]) -> None:
    """Tell every server the measured load starts now; wait for each one's ``OK``."""
    for server in servers.values():
        server.send("mark")
    for name, server in servers.items():
        if server.readline() != "OK":
            raise RuntimeError(f"server {name} did not mark its counters")


def pinning(mode: str, servers_on_first: bool) -> tuple[set[int] | None, set[int] | None]:
    """CPU sets (servers, clients) for ``--pin`` *mode*: ``none``, ``same`` or ``split``.

    ``split`` gives the servers the first allowed CPU and the clients the rest when
    *servers_on_first*, else the clients the first and the servers the rest.
    """
    if mode == "none" or not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "same" or len(cpus) < 2:
        return {cpus[-1]}, {cpus[-1]}
    first, rest = {cpus[0]}, set(cpus[1:])
    return (first, rest) if servers_on_first else (rest, first)


def compile_loadgen(tmp: str) -> str:
    """Compile ``loadgen.c`` into *tmp* with ``cc`` (or ``gcc``); return the binary's path."""
    binary = os.path.join(tmp, "loadgen")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("no C compiler (cc) found: the load generator is compiled at run time")
    subprocess.run([compiler, "-O2", "-pthread", "-o", binary, LOADGEN_SOURCE, "-lm"], check=True, timeout=120)
    return binary


def machine_line(when: datetime.datetime) -> str:
    """The first line of a run: when, which Python, which machine, how loaded."""
    return (
        f"# {when.isoformat(timespec='seconds')}  Python {platform.python_version()}  "
        f"{platform.machine()}  cpus={os.cpu_count()}  load={os.getloadavg()[0]:.2f}"
    )


# --------------------------------------------------------------------------- A/B interleaving


def rotation(names: Sequence[str], shift: int) -> list[str]:
    """*names* rotated left by *shift*: round r of scenario i starts with name (r + i) % n,
    so that no contender always goes, and starts, first."""
    k = shift % len(names)
    return [*names[k:], *names[:k]]


def alternate(
    requesters: Sequence[Callable[[], bool]], start: float, stop: float, slice_: float, first: int
) -> tuple[list[list[float]], list[int]]:
    """Make requests from *start* to *stop* (monotonic), switching target every *slice_*.

    Every client process and thread switches on the same clock, so all load one server at a
    time, in the order *first*, *first* + 1, ...; a slow patch of the machine hits every
    server alike. Returns, per target, the seconds each completed request took, and the
    number that failed (False or OSError).
    """
    latencies: list[list[float]] = [[] for _ in requesters]
    errors = [0 for _ in requesters]
    clock = time.perf_counter
    now = time.monotonic()
    if now < start:
        time.sleep(start - now)
    # perf_counter is this process's clock; the slices follow the shared monotonic one.
    offset = time.monotonic() - clock()
    n = len(requesters)
    while True:
        began = clock()
        if began + offset >= stop:
            break
        target = (int((began + offset - start) / slice_) + first) % n
        try:
            ok = requesters[target]()
        except OSError:
            ok = False
        if ok:
            latencies[target].append(clock() - began)
        else:
            errors[target] += 1
    return latencies, errors


# --------------------------------------------------------------------------- statistics and output


def ratio(a: float, b: float) -> float:
    """a / b, or NaN when either is NaN or there is nothing to divide by."""
    return a / b if b and b == b and a == a else float("nan")


def median(values: Sequence[float]) -> float:
    """The median of the values that are numbers (NaN: a round without a figure)."""
    finite = [v for v in values if v == v]
    return statistics.median(finite) if finite else float("nan")


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartile (inclusive method) of the values that are numbers."""
    finite = [v for v in values if v == v]
    if not finite:
        return float("nan"), float("nan")
    if len(finite) < 2:
        return finite[0], finite[0]
    q = statistics.quantiles(finite, n=4, method="inclusive")
    return q[0], q[2]


def paired(baseline: Sequence[float], candidate: Sequence[float]) -> dict[str, Any]:
    """Two contenders' figures of the same rounds, compared.

    ``baseline`` / ``candidate``: the medians over rounds; ``ratio``: candidate / baseline
    of the medians; ``rounds``: the per-round ratios (both figures from the same interleaved
    load), with their ``min``, ``max`` and ``iqr``.
    """
    per_round = [ratio(c, b) for b, c in zip(baseline, candidate)]
    finite = [r for r in per_round if r == r]
    b, c = median(baseline), median(candidate)
    return {
        "baseline": b,
        "candidate": c,
        "ratio": ratio(c, b),
        "min": min(finite) if finite else float("nan"),
        "max": max(finite) if finite else float("nan"),
        "iqr": quartiles(per_round),
        "rounds": per_round,
    }


def ratio_text(figure: dict[str, Any]) -> str:
    """``1.08x (1.01-1.11)``: a ``paired`` ratio with the min-max of the per-round ratios."""
    return f"{figure['ratio']:.2f}x ({figure['min']:.2f}-{figure['max']:.2f})"


def summary_line(*sections: str) -> str:
    """The last line of every run: ``SUMMARY`` and the sections, separated by `` | ``."""
    return "SUMMARY " + " | ".join(sections)
