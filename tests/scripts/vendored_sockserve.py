"""Run by tests/core/test_registry.py (vendored, without metadata): prints JSON of what sockserve finds and serves.

Usage: ``python -I -S vendored_sockserve.py VENDOR``, VENDOR a folder holding ``sockserve``
and what it imports (no ``*.dist-info``). Prints ``{"dists", "file", "reply", "class",
"distribution", "version", "names", "stopped"}``: the distributions importlib_metadata
sees, where sockserve came from, an echo over ``compose("tcp", "threading")``, what the
registry says about the ``tcp`` transport and the names it lists, and whether serving stopped.
"""

from __future__ import annotations

import json
import socket
import sys
import threading


def main() -> None:
    vendor = sys.argv[1]
    sys.path.insert(0, vendor)
    import importlib_metadata

    dists = sorted(d.metadata["Name"] for d in importlib_metadata.distributions())
    import sockserve

    cls = sockserve.compose("tcp", "threading")

    class Upper(sockserve.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.readline().upper())

    server = cls(("127.0.0.1", 0), Upper)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        with socket.create_connection(server.server_address, timeout=10) as client:
            client.sendall(b"vendored\n")
            reply = client.makefile("rb").readline()
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
    info = sockserve.registry.info("transport", "tcp")
    print(json.dumps({
        "dists": dists,
        "file": sockserve.__file__,
        "reply": reply.decode(),
        "class": cls.__name__,
        "distribution": info.distribution,
        "version": info.version,
        "names": {k: sockserve.registry.names(k) for k in ("transport", "concurrency")},
        "stopped": not thread.is_alive(),
    }))


if __name__ == "__main__":
    main()
