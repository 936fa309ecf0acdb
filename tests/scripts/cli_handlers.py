"""A handler module that tests/test_cli.py gives ``sockserve serve`` (this folder on PYTHONPATH); prints nothing.

``cli_handlers:Report`` replies with the server's class name and three of its settings.
"""

from __future__ import annotations

import sockserve


class Report(sockserve.BaseRequestHandler):
    """Reply with the server's class name and settings."""

    def handle(self) -> None:
        server = self.server
        self.request.recv(1024)
        text = (
            f"{type(server).__name__} drain_timeout={server.drain_timeout!r} "
            f"daemon_threads={server.daemon_threads!r} "
            f"request_queue_size={server.request_queue_size!r}"
        )
        self.request.sendall(text.encode())
