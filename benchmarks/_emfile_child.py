"""hardening_figures.py's EMFILE point, in a process of its own: ``python _emfile_child.py MODULE``.

It lowers its own descriptor limit, so it runs apart from the script. MODULE (``sockserve``
or ``socketserver``) serves a TCPServer; every free descriptor is then taken, a client
connects (it waits in the backlog, so each ``accept()`` fails with EMFILE), and for 2 s
the serving thread's CPU time and the loop's turns are counted. Then the descriptors are
freed and the waiting client must be answered. One JSON line on stdout.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import resource
import socket
import sys
import threading
import time
from typing import Any

#: The measuring window: long enough that a loop spinning on EMFILE shows up as ~1 CPU-second
#: per second, short enough for the whole script's ~25 s.
WINDOW = 2.0


def main(module_name: str) -> None:
    mod = importlib.import_module(module_name)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.levelname + " " + record.getMessage())

    logging.getLogger("sockserve").addHandler(Keep())
    logging.getLogger("sockserve").setLevel(logging.INFO)

    class H(mod.BaseRequestHandler):  # type: ignore[name-defined,misc]
        def handle(self) -> None:
            self.request.settimeout(5)
            self.request.sendall(self.request.recv(1024).upper())

    class S(mod.TCPServer):  # type: ignore[name-defined,misc]
        emfile = 0
        turns = 0

        def service_actions(self) -> None:
            self.turns += 1

        def get_request(self) -> Any:
            try:
                return super().get_request()
            except OSError as e:
                if e.errno == errno.EMFILE:
                    self.emfile += 1
                raise

    s = S(("127.0.0.1", 0), H)
    t = threading.Thread(target=s.serve_forever, args=(0.5,), daemon=True)
    t.start()
    with socket.create_connection(s.server_address, timeout=5) as c:
        c.sendall(b"warm")
        assert c.recv(64) == b"WARM"
    time.sleep(0.1)
    stat = os.open(f"/proc/self/task/{t.native_id}/schedstat", os.O_RDONLY)

    def ran() -> float:
        return int(os.pread(stat, 256, 0).split()[0]) / 1e9

    client = socket.socket()
    client.settimeout(10)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
    filler = []
    while True:
        try:
            filler.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            break
    client.connect(s.server_address)  # waits in the backlog; accept() gets EMFILE
    deadline = time.monotonic() + 5
    while s.emfile == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.2)
    e0, tu0, r0, p0, w0 = s.emfile, s.turns, ran(), time.process_time(), time.monotonic()
    time.sleep(WINDOW)
    e1, tu1, r1, p1, w1 = s.emfile, s.turns, ran(), time.process_time(), time.monotonic()
    for fd in filler:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    t_free = time.monotonic()
    client.sendall(b"after")
    reply = client.recv(64).decode()
    recovered = time.monotonic() - t_free
    client.close()
    s.shutdown()
    t.join(5)
    s.server_close()
    print(json.dumps({
        "wall_s": round(w1 - w0, 3), "serve_thread_cpu_s": round(r1 - r0, 3),
        "process_cpu_s": round(p1 - p0, 3), "failed_accepts": e1 - e0, "loop_turns": tu1 - tu0,
        "reply_after_fds_freed": reply, "recovered_in_s": round(recovered, 3),
        "log_lines": [x for x in records if "accept" in x],
    }))


if __name__ == "__main__":
    main(sys.argv[1])
