"""Where the standard socketserver fails and sockserve holds (issue 3): the figures, side by side.

    python benchmarks/hardening_figures.py [--json PATH]      # about 25 s

Not a speed benchmark: each of the eight points of issue 3 measured over real loopback
sockets for both modules in one run (shutdown latency at poll_interval=10, serve-loop CPU
at descriptor exhaustion, what a handler sees of a 20,000-byte datagram, the drain
deadline, Unix socket files, IPv6 literals, listen backlogs, a raising plugin). The tests
(tests/test_hardening.py) assert the behaviour; this prints the numbers behind it, one
line per point and module, then one ``SUMMARY`` line.

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

import sockserve

MODULES = {"sockserve": sockserve, "socketserver": socketserver}
LOOP4 = ("127.0.0.1", 0)
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
    t = threading.Thread(target=server.serve_forever, args=(poll_interval,), daemon=True)
    t.start()
    return t


def ask(address, payload=b"ping", family=socket.AF_INET, timeout=5.0):
    with socket.socket(family, socket.SOCK_STREAM) as c:
        c.settimeout(timeout)
        c.connect(address)
        c.sendall(payload)
        return c.recv(1024)


# ------------------------------------------------------------------ 1. shutdown latency
def shutdown_latency(mod):
    turns = []

    class S(mod.TCPServer):
        def service_actions(self):
            turns.append(time.monotonic())

    server = S(LOOP4, handler_class(mod))
    t = start(server, 10)
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
        t.join(15)
        server.server_close()
    return {"shutdown_s": round(took, 4), "loop_idle_before_return_s": round(idle, 3)}


# ------------------------------------------------------------------ 2. EMFILE overload
OVERLOAD = r'''
import errno, importlib, json, os, resource, socket, sys, threading, time, logging
mod = importlib.import_module(sys.argv[1])
records = []
class Keep(logging.Handler):
    def emit(self, r): records.append(r.levelname + " " + r.getMessage())
logging.getLogger("sockserve").addHandler(Keep()); logging.getLogger("sockserve").setLevel(logging.INFO)
class H(mod.BaseRequestHandler):
    def handle(self):
        self.request.settimeout(5); self.request.sendall(self.request.recv(1024).upper())
class S(mod.TCPServer):
    emfile = 0; turns = 0
    def service_actions(self):
        self.turns += 1
    def get_request(self):
        try:
            return super().get_request()
        except OSError as e:
            if e.errno == errno.EMFILE: self.emfile += 1
            raise
s = S(("127.0.0.1", 0), H)
t = threading.Thread(target=s.serve_forever, args=(0.5,), daemon=True); t.start()
with socket.create_connection(s.server_address, timeout=5) as c:
    c.sendall(b"warm"); assert c.recv(64) == b"WARM"
time.sleep(0.1)
stat = os.open(f"/proc/self/task/{t.native_id}/schedstat", os.O_RDONLY)
def ran(): return int(os.pread(stat, 256, 0).split()[0]) / 1e9
client = socket.socket(); client.settimeout(10)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
filler = []
while True:
    try: filler.append(os.open(os.devnull, os.O_RDONLY))
    except OSError: break
client.connect(s.server_address)          # waits in the backlog; accept() gets EMFILE
deadline = time.monotonic() + 5
while s.emfile == 0 and time.monotonic() < deadline: time.sleep(0.001)
time.sleep(0.2)
e0, tu0, r0, p0, w0 = s.emfile, s.turns, ran(), time.process_time(), time.monotonic()
time.sleep(2.0)
e1, tu1, r1, p1, w1 = s.emfile, s.turns, ran(), time.process_time(), time.monotonic()
for fd in filler: os.close(fd)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
t_free = time.monotonic()
client.sendall(b"after")
reply = client.recv(64).decode(); recovered = time.monotonic() - t_free
client.close()
s.shutdown(); t.join(5); s.server_close()
print(json.dumps({"wall_s": round(w1 - w0, 3), "serve_thread_cpu_s": round(r1 - r0, 3),
    "process_cpu_s": round(p1 - p0, 3), "failed_accepts": e1 - e0, "loop_turns": tu1 - tu0,
    "reply_after_fds_freed": reply, "recovered_in_s": round(recovered, 3),
    "log_lines": [x for x in records if "accept" in x]}))
'''


def overload(name):
    env = dict(os.environ, SOCKSERVE_DISABLE_PLUGIN_AUTOLOAD="1")
    proc = subprocess.Popen([sys.executable, "-c", OVERLOAD, name], stdout=subprocess.PIPE,
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
    t = start(server, 0.05)
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
        server.shutdown(); t.join(5); server.server_close()
    return {"handler_saw_lengths": seen, "max_packet_size": server.max_packet_size,
            "datagrams_truncated": getattr(server, "datagrams_truncated", None),
            "handle_error_saw": errors}


# ------------------------------------------------------------------ 4. drain deadline
def drain(mod, handler_wait):
    outcome = {}

    class Waits(mod.BaseRequestHandler):
        def handle(self):
            self.request.settimeout(handler_wait)
            self.request.sendall(b"started")
            try:
                outcome["handler"] = "cut off (recv got EOF)" if self.request.recv(16) == b"" else "data"
            except socket.timeout:
                outcome["handler"] = f"ran its full {handler_wait}s"

    cls = type("S", (mod.ThreadingTCPServer,), {"drain_timeout": 0.5})
    server = cls(LOOP4, Waits)
    t = start(server, 0.05)
    with socket.create_connection(server.server_address, timeout=15) as c:
        assert c.recv(16) == b"started"
        server.shutdown(); t.join(5)
        t0 = time.monotonic()
        server.server_close()
        outcome["server_close_s"] = round(time.monotonic() - t0, 3)
    outcome["handler_blocked_for_s"] = handler_wait
    outcome["requests_cut_off"] = getattr(server, "requests_cut_off", None)
    return outcome


# ------------------------------------------------------------------ 5. unix socket file
def unix(mod, tmp):
    r = {}
    path = os.path.join(tmp, f"{mod.__name__}-a.sock")
    mod.UnixStreamServer(path, handler_class(mod)).server_close()
    r["file_left_after_server_close"] = os.path.exists(path)
    stale = os.path.join(tmp, f"{mod.__name__}-stale.sock")
    s = socket.socket(socket.AF_UNIX); s.bind(stale); s.close()
    try:
        srv = mod.UnixStreamServer(stale, handler_class(mod))
        t = start(srv, 0.05)
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(5); c.connect(stale); c.sendall(b"fresh")
            r["bind_over_stale"] = f"works (reply {c.recv(16)!r})"
        srv.shutdown(); t.join(5); srv.server_close()
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
def ipv6(mod):
    r = {}
    for name in ("TCPServer", "UDPServer"):
        try:
            srv = getattr(mod, name)(("::1", 0), handler_class(mod))
        except Exception as e:
            r[name] = f"{type(e).__module__}.{type(e).__name__}: {e}"
            continue
        t = start(srv, 0.05)
        try:
            if name == "TCPServer":
                reply = ask(srv.server_address[:2], b"v6", socket.AF_INET6)
            else:
                with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as c:
                    c.settimeout(5); c.sendto(b"v6", srv.server_address[:2]); reply = c.recv(16)
            r[name] = f"works, AF_INET6, reply {reply!r}"
        finally:
            srv.shutdown(); t.join(5); srv.server_close()
    return r


# ------------------------------------------------------------------ 7. backlog
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
    reader.start(); reader.join(15)
    try:
        m = re.search(r"serving on 127\.0\.0\.1:(\d+)", lines[0] if lines else "")
        return ss_backlog(int(m.group(1))) if m else f"no address line: {lines!r}"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL); proc.communicate()


# ------------------------------------------------------------------ 8. raising hook
def raising_hook_ours():
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
        t = start(server, 0.05)
        replies = 0
        for i in range(3):
            try:
                replies += ask(server.server_address, b"r%d" % i, timeout=2) == b"R%d" % i
            except OSError:
                pass
        server.shutdown(); t.join(5); server.server_close()
    finally:
        manager.unregister(name="bad-plugin")
    return {"replies_of_3": replies, "loop_alive_after": "yes" if replies == 3 else "no",
            "handle_error_saw": sorted(set(errors)), "handle_error_calls": len(errors)}


def raising_hook_stdlib():
    """No plugin hooks in the standard module: the nearest equivalent is a raising override
    of a serve-loop callback (verify_request), which ends serve_forever."""
    died = []

    class S(socketserver.TCPServer):
        def verify_request(self, request, client_address):
            raise ValueError("boom in verify")

    server = S(LOOP4, handler_class(socketserver))

    def run():
        try:
            server.serve_forever(0.05)
        except Exception as e:
            died.append(repr(e))

    t = threading.Thread(target=run, daemon=True); t.start()
    replies = 0
    for i in range(3):
        try:
            replies += ask(server.server_address, b"r%d" % i, timeout=1) == b"R%d" % i
        except OSError:
            pass
    t.join(2)
    alive = t.is_alive()
    if alive:
        server.shutdown(); t.join(5)
    server.server_close()
    return {"replies_of_3": replies, "serve_forever_raised": died, "loop_alive_after": "yes" if alive else "no"}


def main(json_path: str | None = None) -> None:
    tmp = tempfile.mkdtemp(prefix="hardening-figures-")
    try:
        results["1 shutdown, poll_interval=10"] = {n: shutdown_latency(m) for n, m in MODULES.items()}
        results["2 EMFILE overload, 2 s window"] = {n: overload(n) for n in MODULES}
        results["3 20,000-byte datagram"] = {n: datagram(m) for n, m in MODULES.items()}
        results["4 drain, ThreadingTCPServer, drain_timeout=0.5"] = {
            "sockserve": drain(sockserve, 10.0), "socketserver": drain(socketserver, 3.0)}
        results["5 unix socket file"] = {n: unix(m, tmp) for n, m in MODULES.items()}
        results["6 IPv6 literal ('::1', 0)"] = {n: ipv6(m) for n, m in MODULES.items()}
        results["7 backlog"] = {n: backlog(m) for n, m in MODULES.items()}
        results["8 raising hook"] = {"sockserve": raising_hook_ours(),
                                     "socketserver": raising_hook_stdlib()}
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


def summary(r: dict[str, dict[str, Any]]) -> str:
    """One line: each point's figure, sockserve first, the standard module after the slash."""
    ours, std = "sockserve", "socketserver"
    shut = r["1 shutdown, poll_interval=10"]
    emfile = r["2 EMFILE overload, 2 s window"]
    big = r["3 20,000-byte datagram"]
    drain = r["4 drain, ThreadingTCPServer, drain_timeout=0.5"]
    unix_ = r["5 unix socket file"]
    v6 = r["6 IPv6 literal ('::1', 0)"]
    hook = r["8 raising hook"]
    return (
        f"SUMMARY shutdown {shut[ours]['shutdown_s']}s / {shut[std]['shutdown_s']}s"
        f" | EMFILE loop CPU {emfile[ours].get('serve_thread_cpu_s')}s / {emfile[std].get('serve_thread_cpu_s')}s per 2 s"
        f" | 20000-byte datagram seen as {big[ours]['handler_saw_lengths'][:1]} (dropped, reported) / {big[std]['handler_saw_lengths'][:1]}"
        f" | drain close {drain[ours]['server_close_s']}s / {drain[std]['server_close_s']}s"
        f" | unix file left {unix_[ours]['file_left_after_server_close']} / {unix_[std]['file_left_after_server_close']}"
        f" | ::1 TCPServer {v6[ours]['TCPServer'].split(',')[0]} / {v6[std]['TCPServer'].split(':')[0]}"
        f" | raising hook: {hook[ours]['replies_of_3']}/3 / {hook[std]['replies_of_3']}/3 answered"
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH")
    main(parser.parse_args().json)
