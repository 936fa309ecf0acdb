"""Run by tests/concurrency/test_prefork.py (ServerProcess): prints ``port N``, ``worker PID`` per worker, ``stopped``.

A prefork server with two workers, serving in this process's main thread. It prints
``port N`` once listening, ``worker PID`` once per worker (from ``sockserve_post_fork``),
and ``stopped`` after ``serve_forever`` returned and the server closed. Each request: the
handler reads what the client sent, replies ``start``, then ``done PID`` half a second later.
"""

from __future__ import annotations

import os
import time

import sockserve


class Announce:
    @sockserve.hookimpl
    def sockserve_post_fork(self, worker_id: int) -> None:
        os.write(1, b"worker %d\n" % os.getpid())  # one write: workers print at once


class Slow(sockserve.BaseRequestHandler):
    def handle(self) -> None:
        self.request.recv(100)
        self.request.sendall(b"start\n")
        time.sleep(0.5)
        self.request.sendall(b"done %d" % os.getpid())


def main() -> None:
    cls = sockserve.compose("tcp", "prefork", plugins=[Announce()], options={"workers": 2})
    server = cls(("127.0.0.1", 0), Slow)
    os.write(1, b"port %d\n" % server.server_address[1])
    server.serve_forever(0.05)
    server.server_close()
    os.write(1, b"stopped\n")


if __name__ == "__main__":
    main()
