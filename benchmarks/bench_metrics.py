"""What the ``stats`` plugin costs per request: the same server with it off and on.

    python benchmarks/bench_metrics.py [--rounds 5] [--duration 2] [--slice 0.05]
                                       [--scenarios sync,threadpool,prefork]
                                       [--pin same|split|none] [--json PATH]
    python benchmarks/bench_metrics.py --profile --scenarios sync   # cProfile of "on"

Scenario: connection-per-request echo (connect, 64 bytes out, the echo back, close), the
harness's handler on the module under test's ``BaseRequestHandler``. Contenders, per
scenario:

- ``stdlib``: the standard module's nearest server, the reference column of every bench
  (``TCPServer`` for sync, ``ThreadingTCPServer`` for threadpool; none for prefork);
- ``off``: ``sockserve.compose("tcp", <scenario>)``, no lifecycle plugin;
- ``on``: the same with ``plugins=[Stats()]`` (counting into shared memory; no side
  listener, so what is measured is the per-request work, not scrapes).

prefork runs one worker (``options={"workers": 1}``) so that one process serves, as in
the other two scenarios; its CPU is the supervisor's plus the worker's.

Method (``_harness``): each server in a process of its own importing only its module; one
client process loads them in turn, switching every ``--slice`` seconds on the shared
monotonic clock, until each has had ``--duration`` seconds; who goes (and starts) first
rotates from round to round. By default servers and client share one CPU (``--pin``, see
README.md: cross-CPU wake-ups in this VM cost more than a request).

Measured per contender and round: server CPU per request (``getrusage`` user + system of
the server process, all threads, and for prefork its worker, between the end of the
warm-up and the end of the load, over the requests completed) and wall time per request
(the client's median request time). Reported: medians over rounds, the ratio on / off with
the min-max of the per-round ratios, and the difference on - off in microseconds (the
plugin's added cost, with the min-max of the per-round differences); the stdlib column is
the reference. The last line starts with ``SUMMARY``.

Bounds: servers bind 127.0.0.1 port 0; every child has a watchdog; the parent reads
children's output with timeouts and kills every child it started, by pid, at the end.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from typing import Any

import _harness as h

STDLIB, OFF, ON = "stdlib", "off", "on"
#: scenario -> the standard module's reference server (None: no counterpart).
SCENARIOS: dict[str, str | None] = {
    "sync": "TCPServer",
    "threadpool": "ThreadingTCPServer",
    "prefork": None,
}
HOST = h.HOST
CHILD_GRACE = h.CHILD_GRACE
LINE_TIMEOUT = h.LINE_TIMEOUT
#: The goal of issue 10's metrics follow-up: the plugin adds at most this much server CPU
#: per request (µs).
GOAL_US = 10.0


def contenders(scenario: str) -> tuple[str, ...]:
    return (STDLIB, OFF, ON) if SCENARIOS[scenario] else (OFF, ON)


# --------------------------------------------------------------------------- server child


def _worker_cpu() -> float:
    """CPU seconds (user + system) of this process's live children (prefork workers)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as fh:
                pids = [int(p) for p in fh.read().split()]
        except OSError:
            continue
        for pid in pids:
            fields = h._stat_fields(pid)
            if fields:
                total += (int(fields[11]) + int(fields[12])) / tick
    return total


def serve_main(who: str, scenario: str, max_life: float, profile_path: str) -> None:
    """Child: serve *scenario* as *who*; obey 'mark' and 'stop' on stdin; report CPU."""
    h.watchdog(max_life)
    module: Any = importlib.import_module("socketserver" if who == STDLIB else "sockserve")
    handler = h.handler_class(module, h.echo_stream)
    if who == STDLIB:
        cls = type("Server", (getattr(module, SCENARIOS[scenario] or ""),),
                   {"request_queue_size": h.BACKLOG})
    else:
        options: dict[str, Any] = {"request_queue_size": h.BACKLOG}
        if scenario == "prefork":
            options["workers"] = 1
        plugins = []
        if who == ON:
            from sockserve.plugins.stats import Stats

            plugins.append(Stats())
        cls = module.compose("tcp", scenario, plugins=plugins, options=options)
    server = cls((HOST, 0), handler)
    profiles = None
    if profile_path:
        profiles = h.ThreadProfiles()
        profiles.install()
    serving = h.ServingThread(server)
    h.announce_port(server.server_address[1])
    start = [h.cpu_seconds(), 0.0]

    def mark() -> None:
        start[:] = [h.cpu_seconds(), _worker_cpu()]

    h.serve_commands(mark)
    cpu = h.cpu_seconds() - start[0]
    if scenario == "prefork":
        # The worker's CPU since the mark: read it alive, before the stop reaps it (its
        # drain would be counted otherwise).
        cpu += _worker_cpu() - start[1]
    serving.stop(poke_loop=who == STDLIB)
    if profiles is not None:
        stats = profiles.stop()
        if stats is not None:
            stats.dump_stats(profile_path)
    leaked = "socketserver" in sys.modules and who != STDLIB
    h.report({"cpu": cpu, "imported_stdlib": leaked, "plugins": h.loaded_plugins(module)})


# --------------------------------------------------------------------------- client child


def client_main(ports: list[int], warmup: float, duration: float, slice_: float) -> None:
    """Child: warm up, say READY, wait for 'GO start first', load the servers in turn."""
    h.watchdog(warmup + len(ports) * duration + CHILD_GRACE + LINE_TIMEOUT)
    requesters = [lambda a=(HOST, p): h.stream_request(a, h.CLIENT_TIMEOUT) for p in ports]
    now = time.monotonic()
    h.alternate(requesters, now, now + warmup, min(slice_, warmup / 2 or 1), 0)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    words = sys.stdin.readline().split()
    if len(words) != 3 or words[0] != "GO":
        return
    start, first = float(words[1]), int(words[2])
    latencies, errors = h.alternate(requesters, start, start + len(ports) * duration, slice_, first)
    h.report([{"done": len(t), "errors": e, "median": statistics.median(t) if t else float("nan")}
              for t, e in zip(latencies, errors)])


# --------------------------------------------------------------------------- parent


def run_round(scenario: str, rnd: int, args: argparse.Namespace, children: list[h.Child],
              profile_dir: str = "") -> dict[str, dict[str, float]]:
    """One round: a fresh server of each contender, loaded in alternation."""
    names = contenders(scenario)
    order = h.rotation(names, rnd)
    server_cpus, client_cpus = h.pinning(args.pin, servers_on_first=True)
    life = args.warmup + len(names) * args.duration + CHILD_GRACE + 2 * LINE_TIMEOUT
    servers: dict[str, h.Child] = {}
    clients: list[h.Child] = []
    try:
        for who in order:  # who goes first also starts first
            path = os.path.join(profile_dir, f"{who}.prof") if profile_dir and who == ON else ""
            servers[who] = h.Child(h.script_argv(__file__, "_serve", who, scenario, str(life), path),
                                   children, server_cpus)
        ports = h.read_ports(servers)
        clients.append(h.Child(
            h.script_argv(__file__, "_client", str(args.warmup), str(args.duration), str(args.slice),
                          *(str(ports[n]) for n in names)),
            children, client_cpus))
        if clients[0].readline(args.warmup + LINE_TIMEOUT) != "READY":
            raise RuntimeError("the client did not get ready")
        h.mark_all(servers)
        start = time.monotonic() + 0.05
        clients[0].send(f"GO {start!r} {names.index(order[0])}")
        tallies = json.loads(clients[0].readline(len(names) * args.duration + LINE_TIMEOUT))
        for server in servers.values():
            server.send("stop")
        reports = {n: json.loads(s.readline(LINE_TIMEOUT)) for n, s in servers.items()}
    finally:
        for child in (*clients, *servers.values()):
            child.end(5.0)
    results = {}
    for index, who in enumerate(names):
        tally, said = tallies[index], reports[who]
        if said["imported_stdlib"]:
            raise RuntimeError("a sockserve server imported the standard socketserver")
        if said["plugins"]:
            print(h.plugins_note(who, said["plugins"]), flush=True)
        results[who] = {
            "cpu_us": said["cpu"] / tally["done"] * 1e6 if tally["done"] else float("nan"),
            "wall_us": tally["median"] * 1e6,
            "done": tally["done"],
            "errors": tally["errors"],
        }
    return results


def added(rounds: list[dict[str, dict[str, float]]], figure: str) -> dict[str, float]:
    """on - off of *figure*: the difference of the medians, and min-max over rounds."""
    per_round = [r[ON][figure] - r[OFF][figure] for r in rounds]
    return {"median": h.median([r[ON][figure] for r in rounds]) - h.median([r[OFF][figure] for r in rounds]),
            "min": min(per_round), "max": max(per_round)}


def summarize(scenario: str, rounds: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {"scenario": scenario}
    for figure in ("cpu_us", "wall_us"):
        out[figure] = {who: h.median([r[who][figure] for r in rounds]) for who in rounds[0]}
        out[figure]["ratio"] = h.paired([r[OFF][figure] for r in rounds], [r[ON][figure] for r in rounds])
        out[figure]["added"] = added(rounds, figure)
    out["errors"] = sum(r[w]["errors"] for r in rounds for w in r)
    return out


def section(s: dict[str, Any]) -> str:
    cpu, wall = s["cpu_us"], s["wall_us"]
    ref = f" (stdlib {cpu[STDLIB]:.0f})" if STDLIB in cpu else ""
    a, w = cpu["added"], wall["added"]
    return (f"{s['scenario']} cpu/req off {cpu[OFF]:.0f} on {cpu[ON]:.0f} us{ref} "
            f"on/off {h.ratio_text(cpu['ratio'])} +{a['median']:.1f} us ({a['min']:.1f}..{a['max']:.1f}); "
            f"wall/req on/off {h.ratio_text(wall['ratio'])} +{w['median']:.1f} us")


def profile_one(args: argparse.Namespace, children: list[h.Child]) -> None:
    for scenario in args.scenarios:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_round(scenario, 0, args, children, profile_dir=tmp)
            text = io.StringIO()
            stats = pstats.Stats(os.path.join(tmp, f"{ON}.prof"), stream=text)
            stats.sort_stats("tottime").print_stats(args.profile_top)
            done = result[ON]["done"]
            print(f"=== {scenario} / on: {done} requests measured, "
                  f"{stats.total_calls / max(done, 1):.1f} calls per request (warm-up included)")  # type: ignore[attr-defined]
            print(text.getvalue())


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per contender per round")
    parser.add_argument("--slice", type=float, default=0.05, help="seconds before switching server")
    parser.add_argument("--warmup", type=float, default=0.3, help="unmeasured seconds per round")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"subset of {', '.join(SCENARIOS)}")
    parser.add_argument("--pin", choices=("same", "split", "none"), default="same",
                        help="CPU placement of servers and client (see README.md)")
    parser.add_argument("--json", metavar="PATH", help="also write every round and the summaries")
    parser.add_argument("--profile", action="store_true", help="one round under cProfile, the 'on' server")
    parser.add_argument("--profile-top", type=int, default=30)
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    if args.rounds < 1 or args.duration <= 0 or not 0 < args.slice <= args.duration:
        parser.error("--rounds >= 1, --duration > 0, 0 < --slice <= --duration")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    children: list[h.Child] = []
    try:
        if args.profile:
            profile_one(args, children)
            return 0
        print(h.machine_line(datetime.datetime.now()))
        print(f"# connection-per-request echo; rounds={args.rounds} duration={args.duration}s "
              f"slice={args.slice}s warmup={args.warmup}s pin={args.pin}")
        runs: dict[str, list[dict[str, dict[str, float]]]] = {s: [] for s in args.scenarios}
        for rnd in range(args.rounds):
            for index, scenario in enumerate(args.scenarios):
                result = run_round(scenario, rnd + index, args, children)
                runs[scenario].append(result)
                print(f"# round {rnd + 1} {scenario}: " + "  ".join(
                    f"{w} cpu {r['cpu_us']:.1f} wall {r['wall_us']:.1f} us" for w, r in result.items()),
                    flush=True)
        summaries = [summarize(s, runs[s]) for s in args.scenarios]
        print()
        print(f"{'scenario':<12}{'figure':<10}{'stdlib':>9}{'off':>9}{'on':>9}{'on/off':>9}"
              f"{'added':>9}  per-round on/off, added")
        for s in summaries:
            for figure in ("cpu_us", "wall_us"):
                f = s[figure]
                ref = f"{f[STDLIB]:>9.1f}" if STDLIB in f else f"{'-':>9}"
                print(f"{s['scenario']:<12}{figure:<10}{ref}{f[OFF]:>9.1f}{f[ON]:>9.1f}"
                      f"{f['ratio']['ratio']:>8.2f}x{f['added']['median']:>+9.1f}  "
                      f"{f['ratio']['min']:.2f}-{f['ratio']['max']:.2f}, "
                      f"{f['added']['min']:+.1f}..{f['added']['max']:+.1f}")
        errors = sum(s["errors"] for s in summaries)
        worst = max(s["cpu_us"]["added"]["median"] for s in summaries)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"args": vars(args), "runs": runs, "summaries": summaries}, fh, indent=1)
        print(h.summary_line(
            *(section(s) for s in summaries),
            f"goal added cpu/req <= {GOAL_US:g} us: {'met' if worst <= GOAL_US else 'MISSED'} "
            f"(worst +{worst:.1f} us)",
            f"errors {errors}",
        ))
        return 0
    finally:
        h.kill_all(children)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        serve_main(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5])
    elif len(sys.argv) > 1 and sys.argv[1] == "_client":
        client_main([int(p) for p in sys.argv[5:]], float(sys.argv[2]), float(sys.argv[3]),
                    float(sys.argv[4]))
    else:
        sys.exit(main(sys.argv[1:]))
