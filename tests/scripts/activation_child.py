"""A process started the way systemd starts a socket-activated service (tests/transports/test_systemd.py).

    activation_child.py launch --fds FD[,FD...] [--names A:B] [--pid self|parent] -- COMMAND...
        what systemd does after its fork: move the descriptors to 3, 4, ... (inheritable),
        set LISTEN_PID (this process's pid, or with --pid parent another's), LISTEN_FDS
        and LISTEN_FDNAMES (only with --names), then exec this script with COMMAND, which
        keeps the pid
    activation_child.py report [--keep-environment]
        print JSON: what listen_fds() returned, the LISTEN_* variables left afterwards, and
        whether each descriptor from 3 on was close-on-exec before and after the call
    activation_child.py adopt SPEC...
        print JSON: for each SPEC, the adopted socket's family, type and address, or the error
    activation_child.py serve SPEC [--transport T] [--concurrency C] [--workers N]
        adopt SPEC, serve it with ServerClass.from_socket until SIGTERM; exit 2 with
        "activation_child: error: ..." on stderr when adopting or building fails

The handler answers each request (a line, or a datagram) with one JSON object: the pid of
the process that ran it, the LISTEN_* variables that process sees, $GREETING, and the
request upper-cased.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
import threading
from typing import Any

import sockserve
from sockserve.transports._systemd import SD_LISTEN_FDS_START, adopt, listen_fds, transport_for


def cloexec(fd: int) -> bool | None:
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
    except OSError:
        return None  # not open


def listen_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")}


def report(keep: bool) -> None:
    text = os.environ.get("LISTEN_FDS", "")
    count = int(text) if text.isdigit() else 0
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(count, 1))
    before = {fd: cloexec(fd) for fd in fds}
    result: dict[str, Any] = {"pid": os.getpid(), "error": None}
    try:
        result["fds"] = listen_fds(unset_environment=not keep)
    except sockserve.SockserveError as exc:
        result["fds"], result["error"] = [], str(exc)
    result["env_after"] = listen_environment()
    result["cloexec_before"] = before
    result["cloexec_after"] = {fd: cloexec(fd) for fd in fds}
    print(json.dumps(result))


def adopt_all(specs: list[str]) -> None:
    results = []
    for spec in specs:
        try:
            sock = adopt(spec)
        except sockserve.SockserveError as exc:
            results.append({"spec": spec, "error": str(exc)})
            continue
        results.append({
            "spec": spec, "fd": sock.fileno(), "family": sock.family.name, "type": sock.type.name,
            "address": sock.getsockname(), "cloexec": cloexec(sock.fileno()),
        })
    results.append({"env_after": listen_environment()})
    print(json.dumps(results))


def answer(data: bytes) -> bytes:
    return json.dumps({
        "pid": os.getpid(), "env": listen_environment(), "greeting": os.environ.get("GREETING"),
        "echo": data.strip().decode("utf-8", "replace").upper(),
    }).encode() + b"\n"


class Answer(sockserve.BaseRequestHandler):
    def handle(self) -> None:
        if isinstance(self.request, tuple):
            data, sock = self.request
            sock.sendto(answer(data), self.client_address)
            return
        self.request.settimeout(10)
        line = b""
        while not line.endswith(b"\n"):
            chunk = self.request.recv(1024)
            if not chunk:
                break
            line += chunk
        self.request.sendall(answer(line))


def serve(spec: str, options: list[str]) -> int:
    flags = dict(zip(options[::2], options[1::2]))
    try:
        sock = adopt(spec)
        transport = flags.get("--transport") or transport_for(sock)
        concurrency = flags.get("--concurrency", "threading")
        settings: dict[str, Any] = {"drain_timeout": 5.0}
        if concurrency == "prefork":
            settings["workers"] = int(flags.get("--workers", "2"))
        server_class = sockserve.compose(transport, concurrency)
        server = server_class.from_socket(sock, Answer, **settings)
    except sockserve.SockserveError as exc:
        print(f"activation_child: error: {exc}", file=sys.stderr, flush=True)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"serving {type(server).__name__} on {server.server_address!r} pid {os.getpid()}",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever(0.05)
    finally:
        server.server_close()
    return 0


def launch(rest: list[str]) -> int:
    split = rest.index("--")
    flags, command = dict(zip(rest[:split:2], rest[1:split:2])), rest[split + 1:]
    sources = [int(fd) for fd in flags["--fds"].split(",")]
    # Out of the way first: a source may sit where another one is to go.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
    for fd in sources:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, SD_LISTEN_FDS_START + i, inheritable=True)
        os.close(fd)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["LISTEN_PID"] = str(os.getppid() if flags.get("--pid") == "parent" else os.getpid())
    env["LISTEN_FDS"] = str(len(sources))
    if "--names" in flags:
        env["LISTEN_FDNAMES"] = flags["--names"]
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *command], env)
    return 1  # not reached


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    if command == "launch":
        return launch(rest)
    if command == "report":
        report(keep="--keep-environment" in rest)
        return 0
    if command == "adopt":
        adopt_all(rest)
        return 0
    if command == "serve":
        return serve(rest[0], rest[1:])
    print(f"activation_child: unknown command {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    sys.exit(main(sys.argv[1:]))
