"""Benchmark: what the ``proxy`` layer costs the server, against plain ``tcp`` (issue 9).

    python benchmarks/bench_proxy.py [--rounds 5] [--duration 2] [--clients 2]
                                     [--slice 0.1] [--warmup 0.3] [--pin same|split|none]
                                     [--scenarios echo,http] [--floor]

Scenario ``echo``: contenders, all ``compose("tcp", "threadpool")`` with 8 threads and the
harness's echo handler (one 64-byte payload echoed per connection, a new connection per
request):

- ``tcp``       no layer; the client sends the payload.
- ``proxy-v1``  ``layers=[ProxyLayer]``; the client sends ``PROXY TCP4 ...\\r\\n`` and the
  payload in one write, as HAProxy does.
- ``proxy-v2``  the same with a version 2 header (TCP4, no TLVs).
- ``floor``     with ``--floor``: a layer that only peeks and reads the v1 line (no
  parsing, no allow-list): what the two system calls that never read past a header cost.

Scenario ``http``: the same three (``http-tcp``, ``http-proxy-v1``, ``http-proxy-v2``) with
``bench_throughput.py``'s ``http-close`` handler instead (an
``http.server.BaseHTTPRequestHandler`` answering ``GET /`` with a small page); the client
sends the PROXY header (if any) and ``GET / HTTP/1.1`` with ``Connection: close`` in one
write and reads the response to the server's end of file. The layer's cost on a real
(if small) request, beside its cost on the bare echo.

Method: each round starts a fresh server process per contender (each imports only
sockserve) and loads them in alternation from ``--clients`` client processes, switching
every ``--slice`` seconds on the shared monotonic clock (``_harness.alternate``), the
contender that goes first rotating from round to round; the scenarios run one after the
other in each round. After ``--warmup`` seconds the servers are told ``mark``; at the end
each reports its CPU time (``getrusage``, all threads), the connections it served since,
how many of them waited in the waiting room (not readable when accepted: one more turn of
the serve loop, ``when_readable``) and the garbage collections. Measured: server CPU per
connection, its median over rounds, and each proxy contender's ratio to its scenario's
``tcp`` of the same round (goal, on the echo: at most 1.10x). One ``SUMMARY`` line at the
end, with both scenarios.

Bounds: servers bind 127.0.0.1 port 0; every child has a watchdog; the parent kills every
child it started, by pid, whatever happens.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import socket
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402

CONTENDERS: tuple[str, ...] = ("tcp", "proxy-v1", "proxy-v2")
#: The contenders of each scenario; the first is the baseline of the others.
SCENARIOS: dict[str, tuple[str, ...]] = {
    "echo": CONTENDERS,
    "http": ("http-tcp", "http-proxy-v1", "http-proxy-v2"),
}
GOAL = 1.10
#: The HTTP scenario's request (after the PROXY header, in the same write).
HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
HEADERS = {
    "tcp": b"",
    "proxy-v1": b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 80\r\n",
    "floor": b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 80\r\n",
    # signature, PROXY, TCP over IPv4, 12 address bytes: 198.51.100.9:4444 -> 127.0.0.1:80
    "proxy-v2": (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes([198, 51, 100, 9, 127, 0, 0, 1])
                 + (4444).to_bytes(2, "big") + (80).to_bytes(2, "big")),
}
HEADERS.update({f"http-{k}": v for k, v in list(HEADERS.items()) if k != "floor"})


# ------------------------------------------------------------------------------ the server child


def serve(kind: str, lifetime: float) -> None:
    import sockserve
    from sockserve.transports._proxy import ProxyLayer

    h.watchdog(lifetime)
    served = itertools.count()
    counted = [0]

    def handle(self: Any) -> None:
        h.echo_stream(self)
        next(served)

    class FloorLayer:
        def prepare_request(self, request: Any, client_address: Any) -> tuple[Any, Any]:
            request, client_address = super().prepare_request(request, client_address)  # type: ignore[misc]
            line = request.recv(536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            request.recv(line.index(b"\n") + 1)
            return request, client_address

    http = kind.startswith("http-")
    base = kind.removeprefix("http-")
    layers: list[Any] = [] if base == "tcp" else [FloorLayer] if base == "floor" else [ProxyLayer]
    cls = sockserve.compose("tcp", "threadpool", layers=layers,
                            options={"threads": 8, "request_queue_size": h.BACKLOG})
    handler: Any
    if http:
        from bench_throughput import _page_handler

        class CountedPage(_page_handler()):  # type: ignore[misc]
            def finish(self) -> None:
                super().finish()
                next(served)

        handler = CountedPage
    else:
        handler = h.handler_class(sockserve, handle)
    server = cls((h.HOST, 0), handler)
    serving = h.ServingThread(server)
    h.announce_port(server.server_address[1])
    start = [0.0]
    marks = [0, 0]

    def collections() -> int:
        return sum(g["collections"] for g in gc.get_stats())

    def on_mark() -> None:
        start[0] = h.cpu_seconds()
        counted[0] = next(served)
        marks[:] = [server.waited, collections()]

    h.serve_commands(on_mark)
    cpu = h.cpu_seconds() - start[0]
    done = next(served) - counted[0] - 1
    waited, collected = server.waited - marks[0], collections() - marks[1]
    serving.stop()
    h.report({"cpu": cpu, "connections": done, "denied": dict(server.requests_denied),
              "waited": waited, "gc": collected})


# ------------------------------------------------------------------------------ the client child


def client(ports: list[int], kinds: list[str], start: float, stop: float, slice_: float,
           first: int) -> None:
    h.watchdog(stop - time.monotonic() + h.CHILD_GRACE)

    def http_requester(port: int, header: bytes) -> Any:
        address = (h.HOST, port)
        message = header + HTTP_REQUEST

        def request() -> bool:
            with socket.create_connection(address, timeout=h.CLIENT_TIMEOUT) as sock:
                sock.sendall(message)
                data = b""
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                return data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"</html>\n")
        return request

    def requester(port: int, header: bytes) -> Any:
        address = (h.HOST, port)
        message = header + h.PAYLOAD

        def request() -> bool:
            with socket.create_connection(address, timeout=h.CLIENT_TIMEOUT) as sock:
                sock.sendall(message)
                data = b""
                while len(data) < len(h.PAYLOAD):
                    chunk = sock.recv(len(h.PAYLOAD) - len(data))
                    if not chunk:
                        break
                    data += chunk
                return data == h.PAYLOAD
        return request

    requesters = [(http_requester if k.startswith("http-") else requester)(p, HEADERS[k])
                  for p, k in zip(ports, kinds)]
    latencies, errors = h.alternate(requesters, start, stop, slice_, first)
    h.report({"completed": [len(x) for x in latencies], "errors": errors})


# ------------------------------------------------------------------------------ the parent


def one_round(args: argparse.Namespace, number: int, children: list[h.Child],
              contenders: tuple[str, ...]) -> dict[str, Any]:
    servers_cpus, clients_cpus = h.pinning(args.pin, servers_on_first=True)
    total = args.warmup + args.duration * len(contenders)
    lifetime = total + h.CHILD_GRACE
    servers = {k: h.Child(h.script_argv(__file__, "--serve", k, "--lifetime", str(lifetime)), children,
                          cpus=servers_cpus) for k in contenders}
    ports = h.read_ports(servers)
    start = time.monotonic() + 0.2
    stop = start + total
    first = number % len(contenders)
    clients = [h.Child(h.script_argv(__file__, "--client", ",".join(str(ports[k]) for k in contenders),
                                     "--kinds", ",".join(contenders),
                                     "--start", repr(start), "--stop", repr(stop), "--slice",
                                     repr(args.slice), "--first", str(first)), children,
                       cpus=clients_cpus, stdin=False) for _ in range(args.clients)]
    time.sleep(max(0.0, start + args.warmup - time.monotonic()))
    h.mark_all(servers)
    loads = [json.loads(c.readline(timeout=total + h.LINE_TIMEOUT)) for c in clients]
    for server in servers.values():
        server.send("stop")
    figures = {k: json.loads(s.readline()) for k, s in servers.items()}
    for child in [*servers.values(), *clients]:
        child.end()
    errors = [sum(load["errors"][i] for load in loads) for i in range(len(contenders))]
    out: dict[str, Any] = {}
    for i, kind in enumerate(contenders):
        f = figures[kind]
        per = f["cpu"] / f["connections"] if f["connections"] else float("nan")
        out[kind] = {"cpu_us": per * 1e6, "connections": f["connections"], "errors": errors[i],
                     "denied": f["denied"], "waited": f["waited"], "gc": f["gc"]}
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=2.0,
                        help="seconds of load per contender, scenario and round")
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--slice", type=float, default=0.1)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--pin", choices=("same", "split", "none"), default="same")
    parser.add_argument("--floor", action="store_true", help="add the peek-and-read-only contender (echo)")
    parser.add_argument("--scenarios", default="echo,http",
                        help="comma-separated: echo (64-byte echo), http (a small page, Connection: close)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--lifetime", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--kinds", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.lifetime)
        return 0
    if args.client:
        client([int(p) for p in args.client.split(",")], args.kinds.split(","), args.start, args.stop,
               args.slice, args.first)
        return 0
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        parser.error(f"--scenarios: {', '.join(unknown) or 'none given'}; choose from {', '.join(SCENARIOS)}")
    scenarios = {n: SCENARIOS[n] for n in names}
    if args.floor and "echo" in scenarios:
        scenarios["echo"] = (*scenarios["echo"], "floor")
    print(h.machine_line(datetime.datetime.now()))
    children: list[h.Child] = []
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in scenarios}
    try:
        for number in range(args.rounds):
            for name, contenders in scenarios.items():
                result = one_round(args, number, children, contenders)
                rounds[name].append(result)
                print(f"round {number + 1} {name}: " + "  ".join(
                    f"{k} {r['cpu_us']:.0f}us/conn ({r['connections']} conns, {r['errors']} errors, "
                    f"{r['waited']} waited, {r['gc']} gc)"
                    for k, r in result.items()), flush=True)
    finally:
        h.kill_all(children)
    sections = []
    worst = 0.0
    errors = denied = 0
    for name, contenders in scenarios.items():
        results = rounds[name]
        base = [r[contenders[0]]["cpu_us"] for r in results]
        for kind in contenders[1:]:
            figure = h.paired(base, [r[kind]["cpu_us"] for r in results])
            if name == "echo" and kind != "floor":  # the goal is the echo's; the floor a reference
                worst = max(worst, figure["ratio"])
            print(f"{kind}: server CPU per connection {figure['candidate']:.0f}us against "
                  f"{contenders[0]} {figure['baseline']:.0f}us: {h.ratio_text(figure)}")
            sections.append(f"{kind}/{contenders[0]} CPU per connection {h.ratio_text(figure)}")
        errors += sum(r[k]["errors"] for r in results for k in contenders)
        denied += sum(sum(r[k]["denied"].values()) for r in results for k in contenders)
    if "echo" in scenarios:
        verdict = "goal met" if worst <= GOAL else "GOAL MISSED"
        sections.append(f"goal (echo) <= {GOAL:.2f}x: {verdict}")
    print(h.summary_line(f"threadpool(8), {args.rounds} rounds", *sections, f"errors {errors}, denied {denied}"))
    return 0 if worst <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
