"""Request handlers that ``tests/test_author_bugs.py`` gives ``sockserve serve`` (run as
``python -m sockserve serve ADDRESS author_handlers:NAME``, this folder on PYTHONPATH).

Every blocking call has a timeout (``StreamRequestHandler.timeout``), so that no server
process can hang a test.
"""

from __future__ import annotations

import os
import time

import sockserve

#: Seconds a held request waits for its client before it gives up.
HOLD_LIMIT = 30.0
#: Seconds a ``slow`` request takes between its ``start`` and its ``done`` line.
SLOW_SECONDS = 0.5


class Hold(sockserve.StreamRequestHandler):
    """Line commands; each reply line ends with the pid of the process that serves it.

    ``slow``: ``start PID``, then ``done PID`` ``SLOW_SECONDS`` later.
    ``hold``: ``start PID``, then nothing until the client ends its side (or the server
    cuts the connection off), then ``released PID``.
    """

    timeout = HOLD_LIMIT

    def handle(self) -> None:
        command = self.rfile.readline().strip()
        pid = os.getpid()
        self.wfile.write(b"start %d\n" % pid)
        if command == b"slow":
            time.sleep(SLOW_SECONDS)
            self.wfile.write(b"done %d\n" % pid)
            return
        self.rfile.read()  # to EOF: the client's, or the server's shutdown of the connection
        self.wfile.write(b"released %d\n" % pid)


class Report(sockserve.StreamRequestHandler):
    """Reply with what the handler sees: the server's class, the client address and the
    request object's class (a layer may replace the last two)."""

    timeout = HOLD_LIMIT

    def handle(self) -> None:
        self.rfile.readline()
        text = (
            f"{type(self.server).__name__} {self.client_address!r} "
            f"{type(self.request).__name__}\n"
        )
        self.wfile.write(text.encode())
