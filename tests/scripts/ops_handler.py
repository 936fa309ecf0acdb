"""The handler tests/test_operations.py serves with ``sockserve serve`` (copied next to the
test's files, so that a test can replace it): one line in, ``<pid> <LINE>`` out.

``hang`` never answers (its worker's serve loop is stuck: inner sync); ``hang-ignoring-abort``
first ignores SIGABRT, as a handler that installs its own signal handling might.
"""

import os
import signal
import time

import sockserve

VERSION = b"v1"


class Handler(sockserve.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline().strip()
        if line == b"hang":
            hang_here()
        if line == b"hang-ignoring-abort":
            signal.signal(signal.SIGABRT, signal.SIG_IGN)
            hang_here()
        self.wfile.write(b"%d %s %s\n" % (os.getpid(), VERSION, line.upper()))


def hang_here():
    time.sleep(120)
