"""Where the standard socketserver fails and sockserve holds (issue 3): the figures, side by side.

    python benchmarks/hardening_figures.py [--json PATH]      # about 25 s

Not a speed benchmark: each of the eight points of issue 3 measured over real loopback
sockets for both modules in one run (shutdown latency at poll_interval=10, serve-loop CPU
at descriptor exhaustion, what a handler sees of a 20,000-byte datagram, the drain
deadline, Unix socket files, IPv6 literals, listen backlogs, a raising hook). The tests
(tests/test_hardening.py) assert the behaviour; this prints the numbers behind it, one
line per point and module, then one ``SUMMARY`` line.

Like with like (issue 8, item 12): in every row both modules get the same server class,
handler and fault; where the standard module has no equivalent (plugin hooks, sockserve's
strategies and CLI) its column says so ("n/a") instead of standing in with something else.
The comment above each row's function says what is compared.

Bounds: binds only 127.0.0.1 / ::1 port 0 and a temporary directory (removed at the end).
Every subprocess is waited for with a timeout and killed by its own pid if it overstays.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import _harness as h
import sockserve

MODULES = {"sockserve": sockserve, "socketserver": socketserver}
LOOP4 = (h.HOST, 0)
#: The drain row's handler blocks this long in both modules (a recv with this timeout);
#: drain_timeout is DRAIN_TIMEOUT for both classes (the standard module ignores it).
HANDLER_WAIT = 3.0
DRAIN_TIMEOUT = 0.5
#: The EMFILE point runs in a process of its own (it lowers its descriptor limit).
EMFILE_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_emfile_child.py")
results: dict[str, dict[str, object]] = {}


def handler_class(mod):
    class Upper(mod.BaseRequestHandler):
        def handle(self):
            if isinstance(self.request, tuple):
                data, sock = self.request
                sock.sendto(data.upper(), self.client_address)
            else:
                self.request.settimeout(5)
                self.request.sendall(self.request.recv(1024).upper())
    return Upper


def start(server, poll_interval=0.5):
    return h.ServingThread(server, poll_interval, daemon=True)


def ask(address, payload=b"ping", family=socket.AF_INET, timeout=5.0):
    with socket.socket(family, socket.SOCK_STREAM) as c:
        c.settimeout(timeout)
        c.connect(address)
        c.sendall(payload)
        return c.recv(1024)


# ------------------------------------------------------------------ 1. shutdown latency
# Compared: the same TCPServer subclass (counting loop turns) serving at poll_interval=10;
# seconds from shutdown() to its return, after one request has been served.
def shutdown_latency(mod):
    turns = []

    class S(mod.TCPServer):
        def service_actions(self):
            turns.append(time.monotonic())

    server = S(LOOP4, handler_class(mod))
    serving = start(server, 10)
    try:
        assert ask(server.server_address) == b"PING"
        deadline = time.monotonic() + 5
        while not turns and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)
        t0 = time.monotonic()
        server.shutdown()          # stdlib: returns when its 10 s select() ends
        took = time.monotonic() - t0
        idle = time.monotonic() - turns[-1]
    finally:
        serving.stop(timeout=15)
    return {"shutdown_s": round(took, 4), "loop_idle_before_return_s": round(idle, 3)}


# ------------------------------------------------------------------ 2. EMFILE overload
# Compared: the same script (_emfile_child.py) for both modules: a TCPServer whose accept()
# fails with EMFILE for 2 s; the serving thread's CPU in that window, and whether the
# waiting client is answered once descriptors are free again.
def overload(name):
    env = dict(os.environ, SOCKSERVE_DISABLE_PLUGIN_AUTOLOAD="1")
    proc = subprocess.Popen([sys.executable, EMFILE_CHILD, name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return {"error": "timeout", "stderr": err[-500:]}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "stderr": err[-800:]}
    return json.loads(out)


# ------------------------------------------------------------------ 3. 20,000-byte datagram
# Compared: the same UDPServer subclass and handler (it answers with the length it got);
# a 20,000-byte datagram then a 5-byte one: the lengths the handler saw, in order.
def datagram(mod):
    errors = []

    class LenReply(mod.BaseRequestHandler):
        def handle(self):
            data, sock = self.request
            sock.sendto(str(len(data)).encode(), self.client_address)

    class S(mod.UDPServer):
        def handle_error(self, request, client_address):
            errors.append(type(sys.exc_info()[1]).__name__)

    server = S(LOOP4, LenReply)
    serving = start(server, 0.05)
    seen = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(1.0)
            c.connect(server.server_address)
            c.sendall(b"x" * 20_000)
            c.sendall(b"small")
            for _ in range(2):
                try:
                    seen.append(int(c.recv(64)))
                except socket.timeout:
                    break
    finally:
        serving.stop(timeout=5)
    return {"handler_saw_lengths": seen, "max_packet_size": server.max_packet_size,
            "datagrams_truncated": getattr(server, "datagrams_truncated", None),
            "handle_error_saw": errors}


# ------------------------------------------------------------------ 4. drain deadline
# Compared: the same ThreadingTCPServer subclass (drain_timeout=DRAIN_TIMEOUT on both; the
# standard module has no such setting and ignores it) and the same handler, blocked for
# HANDLER_WAIT s when shutdown() and server_close() are called: how long server_close()
# takes, and whether the handler was cut off or ran out its wait. The standard module's
# server_close() joins the handler threads without a deadline, so its figure is however
# long the handler runs (here HANDLER_WAIT, the same for both); sockserve's is the deadline.
def drain(mod):
    outcome = {}

    class Waits(mod.BaseRequestHandler):
        def handle(self):
            self.request.settimeout(HANDLER_WAIT)
            self.request.sendall(b"started")
            try:
                outcome["handler"] = "cut off (recv got EOF)" if self.request.recv(16) == b"" else "data"
            except socket.timeout:
                outcome["handler"] = f"ran out its {HANDLER_WAIT}s wait"

    cls = type("S", (mod.ThreadingTCPServer,), {"drain_timeout": DRAIN_TIMEOUT})
    server = cls(LOOP4, Waits)
    serving = start(server, 0.05)
    with socket.create_connection(server.server_address, timeout=15) as c:
        assert c.recv(16) == b"started"
        serving.stop(close=False, timeout=5)
        t0 = time.monotonic()
        server.server_close()
        outcome["server_close_s"] = round(time.monotonic() - t0, 3)
    outcome["handler_blocks_for_s"] = HANDLER_WAIT
    outcome["requests_cut_off"] = getattr(server, "requests_cut_off", None)
    return outcome


# ------------------------------------------------------------------ 5. unix socket file
# Compared: UnixStreamServer of each module, same handler: is the socket file left after
# server_close(); can a server bind over a stale file; and over a live server's file.
def unix(mod, tmp):
    r = {}
    path = os.path.join(tmp, f"{mod.__name__}-a.sock")
    mod.UnixStreamServer(path, handler_class(mod)).server_close()
    r["file_left_after_server_close"] = os.path.exists(path)
    stale = os.path.join(tmp, f"{mod.__name__}-stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()
    try:
        srv = mod.UnixStreamServer(stale, handler_class(mod))
        serving = start(srv, 0.05)
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(5)
            c.connect(stale)
            c.sendall(b"fresh")
            r["bind_over_stale"] = f"works (reply {c.recv(16)!r})"
        serving.stop(timeout=5)
    except OSError as e:
        r["bind_over_stale"] = f"{type(e).__name__} errno={errno.errorcode.get(e.errno)}"
    live_path = os.path.join(tmp, f"{mod.__name__}-live.sock")
    live = mod.UnixStreamServer(live_path, handler_class(mod))
    try:
        mod.UnixStreamServer(live_path, handler_class(mod)).server_close()
        r["bind_over_live"] = "bound (!)"
    except OSError as e:
        r["bind_over_live"] = f"{type(e).__name__} errno={errno.errorcode.get(e.errno)}: {e}"
    live.server_close()
    return r


# ------------------------------------------------------------------ 6. IPv6 literal
# Compared: TCPServer and UDPServer of each module constructed with ("::1", 0), nothing
# else set: does it bind and answer over IPv6, or what does it raise.
def ipv6(mod):
    r = {}
    for name in ("TCPServer", "UDPServer"):
        try:
            srv = getattr(mod, name)(("::1", 0), handler_class(mod))
        except Exception as e:
            r[name] = f"{type(e).__module__}.{type(e).__name__}: {e}"
            continue
        serving = start(srv, 0.05)
        try:
            if name == "TCPServer":
                reply = ask(srv.server_address[:2], b"v6", socket.AF_INET6)
            else:
                with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as c:
                    c.settimeout(5)
                    c.sendto(b"v6", srv.server_address[:2])
                    reply = c.recv(16)
            r[name] = f"works, AF_INET6, reply {reply!r}"
        finally:
            serving.stop(timeout=5)
    return r


# ------------------------------------------------------------------ 7. backlog
# Compared: request_queue_size of the same three classes in each module, and the backlog
# the kernel shows (ss) for a TCPServer of each. The rows for compose()'d strategies and
# `sockserve serve` are sockserve's only (no standard-module equivalent, not in SUMMARY).
def ss_backlog(port):
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         timeout=10).stdout.split()
    return int(out[2]) if out and out[0] == "LISTEN" else None


def backlog(mod):
    r = {}
    for name in ("TCPServer", "ThreadingTCPServer", "UnixStreamServer"):
        r[name] = getattr(mod, name).request_queue_size
    with mod.TCPServer(LOOP4, handler_class(mod)) as srv:
        r["TCPServer listen() backlog (ss)"] = ss_backlog(srv.server_address[1])
    if mod is sockserve:
        for conc in ("threadpool", "prefork"):
            cls = sockserve.compose("tcp", conc)
            with cls(LOOP4, handler_class(mod)) as srv:
                r[f"compose('tcp','{conc}') listen() backlog (ss)"] = ss_backlog(srv.server_address[1])
        r["sockserve serve listen() backlog (ss)"] = cli_backlog()
    return r


def cli_backlog():
    env = dict(os.environ, SOCKSERVE_DISABLE_PLUGIN_AUTOLOAD="1")
    proc = subprocess.Popen([sys.executable, "-m", "sockserve", "serve", "127.0.0.1:0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    reader = threading.Thread(target=lambda: lines.append(proc.stderr.readline()), daemon=True)
    reader.start()
    reader.join(15)
    try:
        m = re.search(r"serving on 127\.0\.0\.1:(\d+)", lines[0] if lines else "")
        return ss_backlog(int(m.group(1))) if m else f"no address line: {lines!r}"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate()


# ------------------------------------------------------------------ 8. raising hook
# 8a compared: the same fault for both modules, a TCPServer subclass whose verify_request
# override raises ValueError; three requests: how many are answered, and whether
# serve_forever is still running or raised. (Both modules let the override's exception
# end serve_forever: sockserve keeps the standard module's behaviour for overrides.)
def raising_override(mod):
    class S(mod.TCPServer):
        def verify_request(self, request, client_address):
            raise ValueError("boom in verify")

    server = S(LOOP4, handler_class(mod))
    serving = start(server, 0.05)
    replies = _three_requests(server.server_address, timeout=1)
    serving.thread.join(2)
    alive = serving.thread.is_alive()
    serving.stop(timeout=5)
    return {"replies_of_3": replies, "loop_alive_after": "yes" if alive else "no",
            "serve_forever_raised": [repr(serving.raised)] if serving.raised else []}


# 8b compared: nothing on the standard module's side, which has no plugin hooks: its column
# says n/a. sockserve: a registered plugin whose sockserve_verify_request and
# sockserve_request_start hooks raise; how many of three requests are answered, and what
# handle_error saw (the plugin and hook named).
def raising_plugin_hook():
    errors = []

    class Bad:
        @sockserve.hookimpl
        def sockserve_verify_request(self, server, request, client_address):
            raise ValueError("boom in verify")

        @sockserve.hookimpl
        def sockserve_request_start(self, server, request, client_address):
            raise ValueError("boom in request_start")

    class S(sockserve.TCPServer):
        def handle_error(self, request, client_address):
            e = sys.exc_info()[1]
            errors.append((type(e).__name__, getattr(e, "plugin_name", None), getattr(e, "hook", None)))

    manager = sockserve.get_plugin_manager()
    manager.register(Bad(), name="bad-plugin")
    try:
        server = S(LOOP4, handler_class(sockserve))
        serving = start(server, 0.05)
        replies = _three_requests(server.server_address, timeout=2)
        alive = serving.thread.is_alive()
        serving.stop(timeout=5)
    finally:
        manager.unregister(name="bad-plugin")
    return {"replies_of_3": replies, "loop_alive_after": "yes" if alive else "no",
            "handle_error_saw": sorted(set(errors)), "handle_error_calls": len(errors)}


def _three_requests(address, timeout):
    replies = 0
    for i in range(3):
        try:
            replies += ask(address, b"r%d" % i, timeout=timeout) == b"R%d" % i
        except OSError:
            pass
    return replies


NO_PLUGIN_HOOKS = {"n/a": "the standard module has no plugin hooks"}


def main(json_path: str | None = None) -> None:
    tmp = tempfile.mkdtemp(prefix="hardening-figures-")
    try:
        results["1 shutdown, poll_interval=10"] = {n: shutdown_latency(m) for n, m in MODULES.items()}
        results["2 EMFILE overload, 2 s window"] = {n: overload(n) for n in MODULES}
        results["3 20,000-byte datagram"] = {n: datagram(m) for n, m in MODULES.items()}
        results[DRAIN_POINT] = {n: drain(m) for n, m in MODULES.items()}
        results["5 unix socket file"] = {n: unix(m, tmp) for n, m in MODULES.items()}
        results["6 IPv6 literal ('::1', 0)"] = {n: ipv6(m) for n, m in MODULES.items()}
        results["7 backlog"] = {n: backlog(m) for n, m in MODULES.items()}
        results["8a raising verify_request override"] = {n: raising_override(m) for n, m in MODULES.items()}
        results["8b raising plugin hook"] = {"sockserve": raising_plugin_hook(), "socketserver": NO_PLUGIN_HOOKS}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    for point, by_module in results.items():
        print(f"== {point}")
        for name, fig in by_module.items():
            print(f"   {name:13} {json.dumps(fig)}")
    print(summary(results))


DRAIN_POINT = f"4 drain, ThreadingTCPServer, drain_timeout={DRAIN_TIMEOUT}, handler blocks {HANDLER_WAIT:g} s"


def summary(r: dict[str, dict[str, Any]]) -> str:
    """One line: each point's figure, sockserve first, the standard module after the slash."""
    ours, std = "sockserve", "socketserver"
    shut = r["1 shutdown, poll_interval=10"]
    emfile = r["2 EMFILE overload, 2 s window"]
    big = r["3 20,000-byte datagram"]
    drain = r[DRAIN_POINT]
    unix_ = r["5 unix socket file"]
    v6 = r["6 IPv6 literal ('::1', 0)"]
    override = r["8a raising verify_request override"]
    hook = r["8b raising plugin hook"]

    def cut(fig: dict[str, Any]) -> str:
        return "cut off" if str(fig.get("handler", "")).startswith("cut off") else "handler ran out"

    def seen(fig: dict[str, Any]) -> str:
        truncated = fig.get("datagrams_truncated")
        return f"{fig['handler_saw_lengths'][:1]}" + (f" ({truncated} dropped, counted)" if truncated else "")

    return h.summary_line(
        f"shutdown {shut[ours]['shutdown_s']}s / {shut[std]['shutdown_s']}s",
        f"EMFILE loop CPU {emfile[ours].get('serve_thread_cpu_s')}s / {emfile[std].get('serve_thread_cpu_s')}s per 2 s",
        f"20000-byte datagram seen as {seen(big[ours])} / {seen(big[std])}",
        f"drain close (handlers block {HANDLER_WAIT:g} s) {drain[ours]['server_close_s']}s {cut(drain[ours])}"
        f" / {drain[std]['server_close_s']}s {cut(drain[std])}",
        f"unix file left {unix_[ours]['file_left_after_server_close']} / {unix_[std]['file_left_after_server_close']}",
        f"::1 TCPServer {v6[ours]['TCPServer'].split(',')[0]} / {v6[std]['TCPServer'].split(':')[0]}",
        f"raising verify_request override: {override[ours]['replies_of_3']}/3"
        f" / {override[std]['replies_of_3']}/3 answered",
        f"raising plugin hook: {hook[ours]['replies_of_3']}/3 / n/a answered",
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH")
    main(parser.parse_args().json)
