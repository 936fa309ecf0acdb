"""Side-by-side benchmark: the example ``processpool`` strategy against ``ForkingTCPServer``.

    python benchmarks/bench_processpool.py [--rounds 5] [--duration 2] [--slice 0.25]
                                           [--warmup 0.5] [--clients 2] [--threads 2]
                                           [--workers 2] [--json PATH]

Needs the example distribution installed in the environment that runs it (this script
installs nothing)::

    pip install ./examples/sockserve-processpool

for instance in a virtual environment of its own::

    python3 -m venv /tmp/v3 && /tmp/v3/bin/pip install -e . \\
        && cp -r examples/sockserve-processpool /tmp/pp && /tmp/v3/bin/pip install /tmp/pp
    /tmp/v3/bin/python benchmarks/bench_processpool.py

(copy the example first: setuptools builds in the source tree.)

Scenario: connection-per-request echo. A client connects, sends 64 bytes, reads them back
and closes. The same handler code runs on both servers, its base class taken from the
module under test:

- ``stdlib``: the standard ``socketserver.ForkingTCPServer``, a new child process per
  connection;
- ``processpool``: ``sockserve.compose("tcp", "processpool", options={"workers": 2})``,
  long-lived workers that receive each accepted socket over a Unix socket pair.

Method. Each server runs in a subprocess of its own (each imports only its module), and
the load comes from ``--clients`` separate client processes of ``--threads`` threads each,
so no GIL is shared between a client and a server or between the two servers. A round
starts a fresh server of each kind; all client threads switch between the two servers
together every ``--slice`` seconds, on the shared monotonic clock, until each server has
had ``--duration`` seconds; which one goes first alternates from round to round. A slow
patch of a busy machine therefore hits both alike, and each round gives a paired ratio.

Measured per server and round: requests/s (requests completed in its slices / its time),
the median request time, errors, and CPU per request (the server process and all its
children, user + system, over every request it served in that round, warm-up included;
every child has been reaped when it reports).

Reported: the median over rounds of each figure, ratio = processpool / stdlib of the
medians (throughput: >1 means processpool is faster; CPU and latency: <1 means cheaper),
the min-max of the per-round ratios, and one line starting with ``SUMMARY``.

Bounds: servers bind 127.0.0.1 port 0 only; every child has a watchdog ending it after a
fixed lifetime; client sockets have timeouts; the parent reads children's output with
timeouts and, whatever happens, kills every child it started, by pid, at the end.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import statistics
import sys
import threading
import time
from typing import Any

import _harness as h

BASELINE = "stdlib"
CANDIDATE = "processpool"
KINDS = (BASELINE, CANDIDATE)
PAYLOAD = h.PAYLOAD
HOST = h.HOST
CLIENT_TIMEOUT = h.CLIENT_TIMEOUT
#: Seconds a child may live past its planned work before its watchdog ends it.
CHILD_GRACE = h.CHILD_GRACE
#: Seconds the parent waits for one line of a child's output before giving up.
LINE_TIMEOUT = h.LINE_TIMEOUT
BACKLOG = h.BACKLOG  # both servers (the documented 5 drops connections under this load)
#: The lifecycle plugins a server reported last (printed once, when they change).
PLUGINS_NOTED: list[str] = []


# --------------------------------------------------------------------------- servers


def serve_main(kind: str, workers: int, max_life: float) -> None:
    """Child: serve with *kind*; print PORT, then on 'stop' (or EOF) close and print JSON."""
    h.watchdog(max_life)
    # Each server process imports only the module under test.
    module: Any = importlib.import_module("socketserver" if kind == BASELINE else "sockserve")
    if kind == BASELINE:
        cls = type("Server", (module.ForkingTCPServer,), {"request_queue_size": BACKLOG})
    else:
        cls = module.compose(
            "tcp", "processpool", options={"workers": workers, "request_queue_size": BACKLOG}
        )
    server = cls((HOST, 0), h.handler_class(module, h.echo_stream))
    serving = h.ServingThread(server)
    h.announce_port(server.server_address[1])
    h.serve_commands()
    # No pokes: each would fork a child of ForkingTCPServer and be counted in its CPU.
    # server_close() reaps every child/worker, so their CPU time is counted.
    serving.stop(poke_loop=False)
    if kind == BASELINE:
        # server_close() waited for the children (block_on_close); reap anything left
        # anyway, so that every child's CPU time is in RUSAGE_CHILDREN.
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
    h.report({"cpu": h.cpu_seconds(children=True), "pid": os.getpid(), "plugins": h.loaded_plugins(module)})


# --------------------------------------------------------------------------- clients


def _load(ports: list[int], start: float, stop: float, slice_: float, first: int,
          out: list[dict[str, Any]]) -> None:
    """One client thread: from *start* to *stop* (monotonic), the server of the current slice."""
    requesters = [lambda port=port: h.stream_request((HOST, port), CLIENT_TIMEOUT) for port in ports]
    latencies, errors = h.alternate(requesters, start, stop, slice_, first)
    out.append({"latencies": latencies, "errors": errors})


def client_main(ports: list[int], first: int, start: float, warmup: float, duration: float,
                slice_: float, threads: int) -> None:
    """Child: warm both servers up, then load them in alternating slices; print JSON."""
    h.watchdog(start - time.monotonic() + warmup + 2 * duration + CHILD_GRACE)
    warm = 0
    deadline = time.monotonic() + warmup
    while time.monotonic() < deadline:
        for port in ports:
            try:
                warm += h.stream_request((HOST, port), CLIENT_TIMEOUT)
            except OSError:
                pass
    begin = max(start, time.monotonic())
    results: list[dict[str, Any]] = []
    workers = [
        threading.Thread(target=_load, args=(ports, begin, begin + 2 * duration, slice_, first, results))
        for _ in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(2 * duration + CHILD_GRACE)
    merged = []
    for target in range(2):
        times = [t for r in results for t in r["latencies"][target]]
        merged.append({
            "done": len(times),
            "errors": sum(r["errors"][target] for r in results),
            "median": statistics.median(times) if times else float("nan"),
        })
    h.report({"warm": warm, "servers": merged})


# --------------------------------------------------------------------------- the parent


def run_round(first: int, args: argparse.Namespace, children: list[h.Child]) -> dict[str, dict[str, float]]:
    """Start a fresh server of each kind, load them in alternation; return figures per kind."""
    life = args.warmup + 2 * args.duration + CHILD_GRACE + 10
    servers = {
        kind: h.Child(h.script_argv(__file__, "_serve", kind, str(args.workers), str(life)), children)
        for kind in KINDS
    }
    ports = h.read_ports(servers)
    start = time.monotonic() + 0.5 + args.warmup
    clients = [
        h.Child(
            h.script_argv(
                __file__, "_client", str(ports[BASELINE]), str(ports[CANDIDATE]), str(first), repr(start),
                str(args.warmup), str(args.duration), str(args.slice), str(args.threads),
            ),
            children,
            stdin=False,
        )
        for _ in range(args.clients)
    ]
    reports = []
    for client in clients:
        planned = start - time.monotonic() + 2 * args.duration
        reports.append(json.loads(client.readline(planned + LINE_TIMEOUT)))
        client.end(LINE_TIMEOUT)
    cpu = {}
    for kind, server in servers.items():
        server.send("stop")
        said = json.loads(server.readline())
        cpu[kind] = said["cpu"]
        server.end(LINE_TIMEOUT)
        if said["plugins"] and said["plugins"] != PLUGINS_NOTED:
            PLUGINS_NOTED[:] = said["plugins"]
            print(h.plugins_note(kind, PLUGINS_NOTED), flush=True)
    warm = sum(r["warm"] for r in reports)
    result = {}
    for index, kind in enumerate(KINDS):
        done = sum(r["servers"][index]["done"] for r in reports)
        served = done + warm / 2  # warm-up requests went to both alike
        result[kind] = {
            "rps": done / args.duration,
            "median_ms": statistics.median(r["servers"][index]["median"] for r in reports) * 1000,
            "errors": sum(r["servers"][index]["errors"] for r in reports),
            "cpu_per_req_us": cpu[kind] / served * 1e6 if served else float("nan"),
        }
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per server per round")
    parser.add_argument("--slice", type=float, default=0.25, help="seconds before switching server")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--threads", type=int, default=2, help="threads per client process")
    parser.add_argument("--workers", type=int, default=2, help="processpool workers")
    parser.add_argument("--json", help="write every round's figures here")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("sockserve_processpool") is None:
        print(
            "bench_processpool: the example distribution is not installed in this environment;\n"
            "  pip install ./examples/sockserve-processpool   (see this script's docstring)",
            file=sys.stderr,
        )
        return 2
    children: list[h.Child] = []
    try:
        print(h.machine_line(datetime.datetime.now()))
        print(
            f"# connection-per-request echo, {len(PAYLOAD)} bytes; rounds={args.rounds} "
            f"duration={args.duration}s/server slice={args.slice}s warmup={args.warmup}s "
            f"clients={args.clients}x{args.threads} threads; processpool workers={args.workers}"
        )
        rounds: list[dict[str, dict[str, float]]] = []
        for rnd in range(args.rounds):
            first = KINDS.index(h.rotation(KINDS, rnd)[0])
            result = run_round(first, args, children)
            rounds.append(result)
            print(
                f"# round {rnd + 1}/{args.rounds} (first {KINDS[first]}): "
                + "  ".join(
                    f"{k} {result[k]['rps']:.0f} req/s p50 {result[k]['median_ms']:.2f}ms "
                    f"cpu {result[k]['cpu_per_req_us']:.0f}us errors {result[k]['errors']}"
                    for k in KINDS
                )
                + f"  ratio {h.ratio(result[CANDIDATE]['rps'], result[BASELINE]['rps']):.2f}",
                flush=True,
            )
        summary = {}
        for figure in ("rps", "median_ms", "cpu_per_req_us"):
            paired = h.paired([r[BASELINE][figure] for r in rounds], [r[CANDIDATE][figure] for r in rounds])
            summary[figure] = {
                BASELINE: paired["baseline"],
                CANDIDATE: paired["candidate"],
                "ratio": paired["ratio"],
                "min": paired["min"],
                "max": paired["max"],
            }
        errors = {k: sum(r[k]["errors"] for r in rounds) for k in KINDS}
        print()
        print(f"{'figure':<16}{BASELINE:>14}{CANDIDATE:>14}{'ratio':>9}  per-round ratios")
        for figure, label in (("rps", "requests/s"), ("median_ms", "p50 ms"), ("cpu_per_req_us", "cpu/req us")):
            s = summary[figure]
            print(f"{label:<16}{s[BASELINE]:>14.2f}{s[CANDIDATE]:>14.2f}{s['ratio']:>9.2f}  "
                  f"{s['min']:.2f}-{s['max']:.2f}")
        print(f"errors: {errors}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"args": vars(args), "rounds": rounds, "summary": summary}, fh, indent=1)
        s = summary["rps"]
        print(
            h.summary_line(
                f"processpool(workers={args.workers}) vs ForkingTCPServer, connection-per-request "
                f"echo: throughput {h.ratio_text(s)} [{s[CANDIDATE]:.0f} vs {s[BASELINE]:.0f} req/s]",
                f"p50 latency {summary['median_ms']['ratio']:.2f}x",
                f"cpu/req {summary['cpu_per_req_us']['ratio']:.2f}x",
                f"errors {errors[CANDIDATE]} vs {errors[BASELINE]}",
            )
        )
        return 0
    finally:
        h.kill_all(children)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        serve_main(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_client":
        client_main(
            [int(sys.argv[2]), int(sys.argv[3])], int(sys.argv[4]), float(sys.argv[5]),
            float(sys.argv[6]), float(sys.argv[7]), float(sys.argv[8]), int(sys.argv[9]),
        )
    else:
        sys.exit(main(sys.argv[1:]))
