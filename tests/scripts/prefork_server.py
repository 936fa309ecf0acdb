"""A prefork server with two workers, serving in this process's main thread: run by
``support.PreforkScript`` for the SIGTERM and parent-killed tests of
``tests/concurrency/test_prefork.py`` and the SIGINT test of ``tests/test_author_bugs.py``.

Prints ``port N`` once listening, then ``worker PID`` once per worker (from
``sockserve_post_fork``), and ``stopped`` after ``serve_forever`` returned and the server
closed. Each request: the handler reads what the client sent, replies ``start``, then
``done PID`` half a second later.
"""

from __future__ import annotations

import os
import signal
import time

import sockserve

#: Workers the server runs (``support.PreforkScript`` waits for as many ``worker`` lines).
WORKERS = 2
#: Seconds between a request's ``start`` and its ``done`` reply.
REQUEST_SECONDS = 0.5
#: Seconds a handler waits for its client's first bytes.
READ_LIMIT = 10.0


class Announce:
    @sockserve.hookimpl
    def sockserve_post_fork(self, worker_id: int) -> None:
        os.write(1, b"worker %d\n" % os.getpid())  # one write: workers print at once


class Slow(sockserve.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(READ_LIMIT)
        self.request.recv(100)
        self.request.sendall(b"start\n")
        time.sleep(REQUEST_SECONDS)
        self.request.sendall(b"done %d" % os.getpid())


def main() -> None:
    # What an interactive shell gives a program: Ctrl-C raises KeyboardInterrupt (the
    # SIGINT test). Set here because a test runner may start us with SIGINT ignored (a
    # background job); the other tests send SIGTERM or SIGKILL, which this leaves alone.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cls = sockserve.compose("tcp", "prefork", plugins=[Announce()], options={"workers": WORKERS})
    server = cls(("127.0.0.1", 0), Slow)
    os.write(1, b"port %d\n" % server.server_address[1])
    server.serve_forever(0.05)
    server.server_close()
    os.write(1, b"stopped\n")


if __name__ == "__main__":
    main()
