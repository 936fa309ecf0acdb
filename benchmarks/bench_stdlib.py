"""Side-by-side benchmark: sockserve against the standard ``socketserver``.

    python benchmarks/bench_stdlib.py [--rounds 7] [--duration 2.5] [--clients 1]
                                      [--slice 0.05] [--pin same|split|none]
                                      [--scenarios tcp-sync,udp-sync] [--json PATH]
                                      [--candidate MODULE] [--profile]

Scenarios (the same handler code for both modules, its base class taken from the module
under test):

- ``tcp-sync``       TCPServer: a client connects, sends 64 bytes, reads the echo, closes.
- ``tcp-threading``  the same on ThreadingTCPServer (a thread per connection).
- ``udp-sync``       UDPServer: one 64-byte datagram out, its echo back.

Method. Each server runs in a subprocess of its own that imports only the module under
test; the load comes from separate client processes (``--clients``), so no GIL is shared
between client and server or between the two servers. A round starts one fresh server of
each module and loads them in alternation, A B A B ..., switching every ``--slice``
seconds (all clients switch together, on a shared monotonic clock), until each module has
had ``--duration`` seconds; which module goes (and starts) first alternates from round to
round and from scenario to scenario. The fine alternation means a slow patch of a busy
machine hits both modules alike, so each round yields a paired ratio. ``--slice`` equal to
``--duration`` gives plain back-to-back A-then-B runs instead. By default the servers and
the clients share one CPU (``--pin``): in a VM a wake-up across CPUs can cost more than
the whole request, and which CPU a process lands on would decide the result.

Measured per module and round:

- requests/s: for each client, 1 / its median request time to that server, summed over
  clients. On a busy machine a request is now and then held up for 100s of ms; a handful
  of those can make up most of the total time and decide a mean-based figure, so the
  median is what is compared. The mean-based figure (completed / time spent) is printed
  too, stalls included.
- server CPU time per request: ``getrusage`` of the server process (all threads, user +
  system) between the start and the end of the load, over the requests it completed.

Reported: the median over rounds for each module, ratio = sockserve / stdlib of the
medians for throughput (>1: sockserve faster) and for CPU per request (<1: sockserve
cheaper), and the spread of the per-round ratios (min-max and interquartile range). A
ratio whose whole IQR lies more than ``TOLERANCE`` beyond 1 is flagged better/WORSE.
``--candidate socketserver`` runs the standard module against itself: the spread of that
A/A run is the noise floor of the machine.

Bounds: servers bind 127.0.0.1 port 0 only; every child has a watchdog ending it after a
fixed lifetime; the parent reads children's output with timeouts and, whatever happens,
kills every child it started, by pid, at the end. Client sockets all have timeouts.

``--profile`` runs one round per scenario with both servers under cProfile (every server
thread profiled, the stats merged) and prints function calls per request and where each
server's time goes.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import io
import itertools
import json
import os
import pstats
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import _harness as h

#: The two sides compared, by label; the first is the baseline of every ratio.
BASELINE = "stdlib"
CANDIDATE = "sockserve"
MODULES = (BASELINE, CANDIDATE)
#: The module each side imports; ``--candidate socketserver`` makes an A/A run that
#: shows the noise floor of the machine.
MODULE_OF = {BASELINE: "socketserver", CANDIDATE: "sockserve"}

#: scenario -> (server class name, handler kind)
SCENARIOS: dict[str, tuple[str, str]] = {
    "tcp-sync": ("TCPServer", "stream"),
    "tcp-threading": ("ThreadingTCPServer", "stream"),
    "udp-sync": ("UDPServer", "dgram"),
}

HOST = h.HOST
PAYLOAD = h.PAYLOAD

#: A ratio within this of 1 counts as a tie: A/A runs (``--candidate socketserver``) of the
#: throughput put the interquartile range of the per-round ratios within about 1% of 1.
TOLERANCE = 0.01
CLIENT_TIMEOUT = h.CLIENT_TIMEOUT
#: UDP requests are not retried: one whose echo has not come back after this long (a busy
#: machine can stall a process for that long now and then) counts as failed.
UDP_TIMEOUT = 0.5
#: Seconds a child may live past its planned work before its watchdog ends it.
CHILD_GRACE = h.CHILD_GRACE
#: Seconds the parent waits for one line of a child's protocol before giving up.
LINE_TIMEOUT = 20.0
#: The lifecycle plugins a server reported last (printed once, when they change).
PLUGINS_NOTED: list[str] = []


# --------------------------------------------------------------------------- handler

HANDLE = {"stream": h.echo_stream, "dgram": h.echo_dgram}


def make_handler(module: Any, kind: str) -> type:
    """The benchmark's handler: the same ``handle`` on *module*'s BaseRequestHandler."""
    return h.handler_class(module, HANDLE[kind])


# --------------------------------------------------------------------------- children

def serve_main(module_name: str, scenario: str, max_life: float, profile_path: str) -> None:
    """Child: serve *scenario* with *module_name*; obey 'mark' and 'stop' on stdin."""
    h.watchdog(max_life)
    module = importlib.import_module(module_name)
    class_name, kind = SCENARIOS[scenario]
    server = getattr(module, class_name)((HOST, 0), make_handler(module, kind))
    profiles = None
    if profile_path:
        profiles = h.ThreadProfiles()
        profiles.install()
    serving = h.ServingThread(server)
    h.announce_port(server.server_address[1])
    start = h.cpu_seconds()

    def mark() -> None:
        nonlocal start
        start = h.cpu_seconds()

    h.serve_commands(mark)
    cpu = h.cpu_seconds() - start
    serving.stop(poke_loop=True)
    if profiles is not None:
        stats = profiles.stop()
        if stats is not None:
            stats.dump_stats(profile_path)
    leaked = "socketserver" in sys.modules and module_name != "socketserver"
    h.report({"cpu": cpu, "imported_stdlib": leaked, "plugins": h.loaded_plugins(module)})


def _requesters(kind: str, ports: list[int]) -> list[Any]:
    """One zero-argument function per server: make one request, return True if echoed."""
    if kind == "stream":
        return [
            lambda address=(HOST, port): h.stream_request(address, CLIENT_TIMEOUT) for port in ports
        ]
    functions = []
    for port in ports:
        numbered = itertools.count()  # one count per server
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.settimeout(UDP_TIMEOUT)
        udp.connect((HOST, port))

        def request(udp: socket.socket = udp, numbers: Iterator[int] = numbered) -> bool:
            # Numbered, so that the late echo of a request that timed out is dropped here
            # instead of passing for the echo of the next one (which would then look
            # instantaneous, and every one after it too).
            payload = next(numbers).to_bytes(8, "big") + PAYLOAD[8:]
            udp.send(payload)
            while udp.recv(2048) != payload:
                pass  # a stale echo; each recv has the socket's timeout
            return True

        functions.append(request)
    return functions


def _alternate(
    requesters: list[Any], start: float, stop: float, slice_: float, first: int
) -> list[dict[str, Any]]:
    """Make requests from *start* to *stop* (monotonic), switching server every *slice_*.

    Returns, per server: requests completed and failed, the time spent in them, and the
    median time of one completed request.
    """
    latencies, errors = h.alternate(requesters, start, stop, slice_, first)
    return [
        {
            "done": len(times),
            "errors": failed,
            "busy": sum(times),
            "median": statistics.median(times) if times else float("nan"),
        }
        for times, failed in zip(latencies, errors)
    ]


def client_main(
    scenario: str, ports: list[int], warmup: float, duration: float, slice_: float
) -> None:
    """Child: warm up, say READY, wait for 'GO start first', load the servers in turn."""
    h.watchdog(warmup + 2 * duration + CHILD_GRACE + LINE_TIMEOUT)
    requesters = _requesters(SCENARIOS[scenario][1], ports)
    now = time.monotonic()
    _alternate(requesters, now, now + warmup, min(slice_, warmup / 2 or 1), 0)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    words = sys.stdin.readline().split()
    if len(words) != 3 or words[0] != "GO":
        return
    start, first = float(words[1]), int(words[2])
    tallies = _alternate(requesters, start, start + len(ports) * duration, slice_, first)
    h.report(tallies)


# --------------------------------------------------------------------------- parent

def _pinning(mode: str) -> tuple[set[int] | None, set[int] | None]:
    """CPU sets for the servers and for the clients under pinning *mode*."""
    return h.pinning(mode, servers_on_first=True)


def run_round(
    scenario: str,
    first: str,
    args: argparse.Namespace,
    children: list[h.Child],
    profile_dir: str = "",
) -> dict[str, dict[str, float]]:
    """One round: both modules' servers, loaded in alternation; results per module."""
    server_cpus, client_cpus = _pinning(args.pin)
    life = args.warmup + 2 * args.duration + CHILD_GRACE + 2 * LINE_TIMEOUT
    servers: dict[str, h.Child] = {}
    clients: list[h.Child] = []
    try:
        # The side that goes first also starts first, so start order cannot favour a side.
        for module in h.rotation(MODULES, MODULES.index(first)):
            profile_path = os.path.join(profile_dir, f"{module}.prof") if profile_dir else ""
            servers[module] = h.Child(
                h.script_argv(__file__, "_serve", MODULE_OF[module], scenario, str(life), profile_path),
                children,
                server_cpus,
            )
        ports = {m: int(s.readline(LINE_TIMEOUT).split()[1]) for m, s in servers.items()}
        for _ in range(args.clients):
            clients.append(
                h.Child(
                    h.script_argv(
                        __file__, "_client", scenario, str(ports[BASELINE]), str(ports[CANDIDATE]),
                        str(args.warmup), str(args.duration), str(args.slice),
                    ),
                    children,
                    client_cpus,
                )
            )
        for client in clients:
            if client.readline(LINE_TIMEOUT) != "READY":
                raise RuntimeError("a client did not get ready")
        for server in servers.values():
            server.send("mark")
        for server in servers.values():
            if server.readline(LINE_TIMEOUT) != "OK":
                raise RuntimeError("a server did not mark its CPU time")
        start = time.monotonic() + 0.05  # every client starts slicing at the same instant
        for client in clients:
            client.send(f"GO {start!r} {MODULES.index(first)}")
        tallies = [json.loads(c.readline(2 * args.duration + LINE_TIMEOUT)) for c in clients]
        for server in servers.values():
            server.send("stop")
        reports = {m: json.loads(s.readline(LINE_TIMEOUT)) for m, s in servers.items()}
    finally:
        for child in (*clients, *servers.values()):
            child.end(5.0)
    results = {}
    for index, module in enumerate(MODULES):
        mine = [t[index] for t in tallies]
        done = sum(t["done"] for t in mine)
        cpu = reports[module]["cpu"]
        if reports[module]["imported_stdlib"]:
            raise RuntimeError(f"{MODULE_OF[module]}'s server imported the standard socketserver")
        if reports[module]["plugins"] and reports[module]["plugins"] != PLUGINS_NOTED:
            PLUGINS_NOTED[:] = reports[module]["plugins"]
            print(h.plugins_note(MODULE_OF[module], PLUGINS_NOTED), flush=True)
        results[module] = {
            # From the median request time: a busy machine now and then holds one request
            # up for 100s of ms, which can make up most of the total; the median shrugs it
            # off. The plain mean (completed / time spent) below keeps every stall in.
            "rps": sum(1 / t["median"] for t in mine if t["done"]),
            "rps_mean": sum(t["done"] / t["busy"] for t in mine if t["busy"]),
            "cpu_per_req": cpu / done if done else float("nan"),
            "server_busy": cpu / args.duration,
            "done": done,
            "errors": sum(t["errors"] for t in mine),
        }
    return results


def summarize(runs: dict[tuple[str, str], list[dict[str, float]]], scenario: str) -> dict[str, Any]:
    """Medians per module, ratio of medians and spread of the per-round ratios."""
    base = runs[(scenario, BASELINE)]
    cand = runs[(scenario, CANDIDATE)]
    out: dict[str, Any] = {"scenario": scenario}
    for metric in ("rps", "rps_mean", "cpu_per_req", "server_busy"):
        figure = h.paired([r[metric] for r in base], [r[metric] for r in cand])
        figure[BASELINE] = figure.pop("baseline")
        figure[CANDIDATE] = figure.pop("candidate")
        out[metric] = figure
    out["errors"] = {m: sum(r["errors"] for r in runs[(scenario, m)]) for m in MODULES}
    return out


def verdict(metric: dict[str, Any], higher_is_better: bool) -> str:
    """'better'/'WORSE' when the whole per-round IQR is beyond ``TOLERANCE`` of 1."""
    lo, hi = metric["iqr"]
    if lo > 1.0 + TOLERANCE:
        return "better" if higher_is_better else "WORSE"
    if hi < 1.0 - TOLERANCE:
        return "WORSE" if higher_is_better else "better"
    return "~same"


def print_table(summaries: list[dict[str, Any]]) -> None:
    header = (
        f"{'scenario':<14}{'stdlib':>8}{'sockserve':>10}{'ratio':>8}{'min-max':>12}{'IQR':>12}"
        f"{'':>8} |{'stdlib':>8}{'sockserve':>10}{'ratio':>8}{'min-max':>12}{'IQR':>12}{'':>8}"
    )
    print(f"{'':<14}{'requests/s (higher is better)':^70} |{'server CPU us/request (lower is better)':^70}")
    print(header)
    print("-" * len(header))
    for s in summaries:
        cells = []
        for metric, scale, fmt, higher in (("rps", 1, ".0f", True), ("cpu_per_req", 1e6, ".1f", False)):
            m = s[metric]
            cells.append(
                f"{m[BASELINE] * scale:>8{fmt}}{m[CANDIDATE] * scale:>10{fmt}}{m['ratio']:>7.3f}x"
                f"{m['min']:>7.2f}-{m['max']:<4.2f}{m['iqr'][0]:>7.2f}-{m['iqr'][1]:<4.2f}"
                f"{verdict(m, higher):>8}"
            )
        print(f"{s['scenario']:<14}{cells[0]} |{cells[1]}")
    for s in summaries:
        mean, errors = s["rps_mean"], s["errors"]
        print(
            f"# {s['scenario']}: mean-based requests/s (stalls included) stdlib "
            f"{mean[BASELINE]:.0f}, sockserve {mean[CANDIDATE]:.0f}, ratio {mean['ratio']:.3f}x "
            f"({mean['min']:.2f}-{mean['max']:.2f}); failed requests stdlib {errors[BASELINE]}, "
            f"sockserve {errors[CANDIDATE]}"
        )


def profile_all(args: argparse.Namespace, children: list[h.Child]) -> None:
    for scenario in args.scenarios:
        with tempfile.TemporaryDirectory() as tmp:
            results = run_round(scenario, BASELINE, args, children, profile_dir=tmp)
            for module in MODULES:
                text = io.StringIO()
                stats = pstats.Stats(os.path.join(tmp, f"{module}.prof"), stream=text)
                # Calls per request are exact; times are wall-clock and, on a busy machine,
                # land on whatever function was running when the process lost its CPU.
                handled = sum(
                    calls
                    for (_, _, name), (_, calls, *_) in stats.stats.items()  # type: ignore[attr-defined]
                    if name == HANDLE[SCENARIOS[scenario][1]].__name__
                )
                stats.sort_stats("tottime").print_stats(args.profile_top)
                print(
                    f"=== {scenario} / {MODULE_OF[module]}: {handled} requests handled "
                    f"({results[module]['rps']:.0f}/s under cProfile), "
                    f"{stats.total_calls / max(handled, 1):.1f} function calls per request"  # type: ignore[attr-defined]
                )
                print(text.getvalue())


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark sockserve against the standard socketserver, side by side."
    )
    parser.add_argument("--rounds", type=int, default=7, help="paired rounds per scenario (default 7)")
    parser.add_argument(
        "--duration", type=float, default=2.5,
        help="measured seconds per module per round (default 2.5)",
    )
    parser.add_argument(
        "--slice", type=float, default=0.05,
        help="seconds of load on one server before switching to the other (default 0.05)",
    )
    parser.add_argument("--warmup", type=float, default=0.3, help="unmeasured seconds per round (default 0.3)")
    parser.add_argument("--clients", type=int, default=1, help="client processes (default 1)")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS),
        help=f"comma-separated subset of: {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--pin", choices=("same", "split", "none"), default="same",
        help="same (default): servers and clients share one CPU, so every hand-over is a "
        "context switch on that CPU; split: servers on one CPU, clients on the others "
        "(in a VM each cross-CPU wake-up can cost more than the request); none: leave "
        "placement to the scheduler",
    )
    parser.add_argument(
        "--candidate", default=MODULE_OF[CANDIDATE], metavar="MODULE",
        help="module on the sockserve side (default sockserve; 'socketserver' gives an A/A "
        "run whose ratios show the machine's noise floor)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every round and the summaries as JSON")
    parser.add_argument("--profile", action="store_true", help="profile both servers (one round per scenario)")
    parser.add_argument("--profile-top", type=int, default=25, help="rows of profile output (default 25)")
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    if args.rounds < 1 or args.clients < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--rounds and --clients must be >= 1, --duration > 0, --warmup >= 0")
    if not 0 < args.slice <= args.duration:
        parser.error("--slice must be > 0 and at most --duration")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    MODULE_OF[CANDIDATE] = args.candidate
    children: list[h.Child] = []
    try:
        if args.profile:
            profile_all(args, children)
            return 0
        server_cpus, client_cpus = _pinning(args.pin)
        print(h.machine_line(datetime.datetime.now()))
        print(
            f"# rounds={args.rounds} duration={args.duration}s/module slice={args.slice}s "
            f"warmup={args.warmup}s clients={args.clients} candidate={args.candidate} "
            f"pin={args.pin}"
            + (f" (servers {sorted(server_cpus)}, clients {sorted(client_cpus or ())})" if server_cpus else "")
        )
        runs: dict[tuple[str, str], list[dict[str, float]]] = {
            (s, m): [] for s in args.scenarios for m in MODULES
        }
        started = time.monotonic()
        for rnd in range(args.rounds):
            for index, scenario in enumerate(args.scenarios):
                first = h.rotation(MODULES, rnd + index)[0]
                for module, result in run_round(scenario, first, args, children).items():
                    runs[(scenario, module)].append(result)
            line = "  ".join(
                f"{s} {h.ratio(runs[(s, CANDIDATE)][-1]['rps'], runs[(s, BASELINE)][-1]['rps']):.3f}"
                for s in args.scenarios
            )
            print(
                f"# round {rnd + 1}/{args.rounds} ({time.monotonic() - started:.0f}s) "
                f"throughput ratio: {line}",
                flush=True,
            )
        summaries = [summarize(runs, s) for s in args.scenarios]
        print()
        print("ratio = sockserve / stdlib of the medians; min-max and IQR of the per-round ratios")
        print_table(summaries)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(
                    {
                        "args": vars(args),
                        "runs": {f"{s}/{m}": r for (s, m), r in runs.items()},
                        "summaries": summaries,
                    },
                    fh,
                    indent=1,
                )
        print(
            h.summary_line(
                " ".join(f"{s['scenario']} {h.ratio_text(s['rps'])}" for s in summaries),
                "cpu/req " + " ".join(f"{s['scenario']} {h.ratio_text(s['cpu_per_req'])}" for s in summaries),
            )
        )
        return 0
    finally:
        h.kill_all(children)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        serve_main(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5])
    elif len(sys.argv) > 1 and sys.argv[1] == "_client":
        client_main(
            sys.argv[2], [int(sys.argv[3]), int(sys.argv[4])],
            float(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7]),
        )
    else:
        sys.exit(main(sys.argv[1:]))
