"""Serve with the systemd notification plugin until SIGTERM (tests/plugins/test_systemd_notify.py).

    notify_server.py CONCURRENCY [WORKERS]

Binds 127.0.0.1 port 0 and prints ``<port> <pid>`` on stdout once bound. The handler
answers a line with ``<pid of the process that ran it>\\n``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import sockserve
from sockserve.plugins._systemd import SYSTEMD


class Pid(sockserve.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()
        self.wfile.write(f"{os.getpid()}\n".encode())


def main(argv: list[str]) -> int:
    concurrency = argv[0]
    options: dict[str, Any] = {"drain_timeout": 5.0}
    if concurrency == "prefork":
        options["workers"] = int(argv[1]) if len(argv) > 1 else 2
    server_class = sockserve.compose("tcp", concurrency, plugins=[SYSTEMD], options=options)
    server = server_class(("127.0.0.1", 0), Pid)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(server.server_address[1], os.getpid(), flush=True)
    try:
        server.serve_forever(0.02)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
