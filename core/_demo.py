"""The upper-casing echo handler of the standard module's documentation, for the demo server."""

from __future__ import annotations

import logging

from ._handlers import BaseRequestHandler

__all__ = ["UpperCaseHandler"]

log = logging.getLogger("sockserve.demo")

#: Read at most this much before answering, as in the documentation's example: the
#: demo must not buffer without bound for a client that never sends a newline.
MAX_REQUEST = 10_000
RECV_SIZE = 2000


class UpperCaseHandler(BaseRequestHandler):
    """Send back what the client sent, upper-cased: one line per connection or datagram."""

    def handle(self) -> None:
        if isinstance(self.request, tuple):  # a datagram server: (data, socket)
            data, sock = self.request
            log.info("%s wrote %r", self.client_address, data)
            sock.sendto(data.upper(), self.client_address)
            return
        pieces = [b""]
        total = 0
        while b"\n" not in pieces[-1] and total < MAX_REQUEST:
            piece = self.request.recv(RECV_SIZE)
            if not piece:
                break
            pieces.append(piece)
            total += len(piece)
        data = b"".join(pieces)
        log.info("%s wrote %r", self.client_address, data)
        self.request.sendall(data.upper())
