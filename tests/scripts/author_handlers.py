"""Request handlers that ``tests/test_author_bugs.py`` gives ``sockserve serve`` (run as
``python -m sockserve serve ADDRESS author_handlers:NAME``, this folder on PYTHONPATH).

Every blocking call has a timeout, so that no server process can hang a test.
"""

from __future__ import annotations

import os
import socket
import time

import sockserve

#: Seconds a held request waits for its client before it gives up.
HOLD_LIMIT = 30.0
#: Seconds a ``slow`` request takes between its ``start`` and its ``done`` line.
SLOW_SECONDS = 0.5


def read_line(sock: socket.socket) -> bytes:
    """Bytes up to the first newline (or to EOF), without the newline."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data.strip()


class Hold(sockserve.BaseRequestHandler):
    """Line commands; each reply line ends with the pid of the process that serves it.

    ``slow``: ``start PID``, then ``done PID`` ``SLOW_SECONDS`` later.
    ``hold``: ``start PID``, then nothing until the client ends its side (or the server
    cuts the connection off), then ``released PID``.
    """

    def handle(self) -> None:
        self.request.settimeout(HOLD_LIMIT)
        command = read_line(self.request)
        pid = os.getpid()
        self.request.sendall(b"start %d\n" % pid)
        if command == b"slow":
            time.sleep(SLOW_SECONDS)
            self.request.sendall(b"done %d\n" % pid)
            return
        while self.request.recv(1024):
            pass
        self.request.sendall(b"released %d\n" % pid)


class Report(sockserve.BaseRequestHandler):
    """Reply with what the handler sees: the server's class, the client address and the
    request object's class (a layer may replace the last two)."""

    def handle(self) -> None:
        self.request.settimeout(HOLD_LIMIT)
        read_line(self.request)
        text = (
            f"{type(self.server).__name__} {self.client_address!r} "
            f"{type(self.request).__name__}\n"
        )
        self.request.sendall(text.encode())
