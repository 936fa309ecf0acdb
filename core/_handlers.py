"""Request handlers: the objects that serve one request, as the standard module defines them."""

from __future__ import annotations

import io
import socket
from typing import Any

__all__ = ["BaseRequestHandler", "StreamRequestHandler", "DatagramRequestHandler"]


class BaseRequestHandler:
    """Serve one request: ``setup()``, ``handle()``, then ``finish()``.

    A new instance is made for every request. ``finish()`` runs even when ``handle()``
    raises, but not when ``setup()`` raises.

    :ivar request: the connected socket, or ``(data, socket)`` for datagram servers.
    :ivar client_address: the peer address.
    :ivar server: the server instance.
    """

    def __init__(self, request: Any, client_address: Any, server: Any) -> None:
        self.request = request
        self.client_address = client_address
        self.server = server
        self.setup()
        try:
            self.handle()
        finally:
            self.finish()

    def setup(self) -> None:
        """Prepare for the request; runs before ``handle()``."""

    def handle(self) -> None:
        """Do the work of serving the request."""

    def finish(self) -> None:
        """Clean up after ``handle()``; runs even when it raised."""


class _SocketWriter(io.BufferedIOBase):
    """A writable binary file on a socket that sends every write at once (``wbufsize=0``).

    ``socket.makefile('wb', 0)`` gives a raw file whose ``write`` may send only part of
    the data; this one always sends everything and returns the full length.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._checkClosed()
        self._sock.sendall(b)
        with memoryview(b) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self._sock.fileno()


class StreamRequestHandler(BaseRequestHandler):
    """Handle a stream connection through the files ``rfile`` and ``wfile``."""

    #: Read buffer size; -1 buffers with the default size. The read side is buffered so
    #: that ``readline`` does not read byte by byte.
    rbufsize = -1
    #: Write buffer size; 0 sends every write at once (``wfile`` is then unbuffered but
    #: still a full ``io.BufferedIOBase``).
    wbufsize = 0
    #: Socket timeout for the connection in seconds; None leaves it blocking.
    timeout: float | None = None
    #: Set TCP_NODELAY on the connection (TCP only).
    disable_nagle_algorithm = False

    def setup(self) -> None:
        self.connection = self.request
        if self.timeout is not None:
            self.connection.settimeout(self.timeout)
        if self.disable_nagle_algorithm:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.rfile = self.connection.makefile("rb", self.rbufsize)
        if self.wbufsize == 0:
            self.wfile: Any = _SocketWriter(self.connection)
        else:
            self.wfile = self.connection.makefile("wb", self.wbufsize)

    def finish(self) -> None:
        try:
            if not self.wfile.closed:
                try:
                    self.wfile.flush()
                except OSError:
                    # The peer may have gone away; a final flush failing is not an error.
                    pass
            try:
                self.wfile.close()
            except OSError:
                pass  # close() flushes again what the failed flush left in the buffer
        finally:
            self.rfile.close()


class DatagramRequestHandler(BaseRequestHandler):
    """Handle one datagram through ``rfile`` (its data) and ``wfile`` (the reply).

    ``request`` is ``(data, socket)``; what was written to ``wfile`` is sent back to
    ``client_address`` with ``sendto`` when the handler finishes.
    """

    def setup(self) -> None:
        self.packet, self.socket = self.request
        self.rfile = io.BytesIO(self.packet)
        self.wfile = io.BytesIO()

    def finish(self) -> None:
        self.socket.sendto(self.wfile.getvalue(), self.client_address)
