"""The HTTP handler tests/test_rolling_haproxy.py serves with ``sockserve serve`` behind
HAProxy (this folder on PYTHONPATH); prints nothing.

``rolling_http:Handler`` answers ``GET /health`` at once and any other GET after
``ROLLING_DELAY`` seconds (default 0.005) with ``instance=<ROLLING_INSTANCE> pid=<pid>
path=<path>``: the test checks which instance, and which process of it, served each request,
and that the body belongs to the request it sent. HTTP/1.1 with ``Content-Length``, so a
client may keep the connection alive.
"""

from __future__ import annotations

import os
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

INSTANCE = os.environ.get("ROLLING_INSTANCE", "?")
DELAY = float(os.environ.get("ROLLING_DELAY", "0.005"))


class Handler(BaseHTTPRequestHandler):
    """``GET /health``: ``ok``; any other GET: which instance and process served it."""

    protocol_version = "HTTP/1.1"
    #: A keep-alive connection that stays silent this long is closed (the idle read).
    timeout = 30

    def do_GET(self) -> None:  # noqa: N802 (the standard name)
        if self.path == "/health":
            body = b"ok\n"
        else:
            time.sleep(DELAY)
            body = f"instance={INSTANCE} pid={os.getpid()} path={self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the standard name)
        pass  # one line per request on stderr would bury the server's own lines
