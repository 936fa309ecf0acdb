"""The ``dgram`` socket type: ``UDPServer``, one request per datagram.

A datagram larger than ``max_packet_size`` is not delivered cut to size (what the standard
module does, silently): it is dropped, counted in ``datagrams_truncated`` and reported
through the server's error handling (the ``sockserve_handle_error`` hook, then
``handle_error``) as a ``sockserve.DatagramTruncatedError``.
"""

from __future__ import annotations

import socket
from typing import Any

import attrs

from ..core._errors import DatagramTruncatedError
from ..core._options import count, declare_options
from ..core._plugin_types import SocketType
from ._stream import TCPServer

__all__ = ["UDPServer", "DGRAM"]

#: The standard module's default, kept: the largest datagram handed to the handler.
MAX_PACKET_SIZE = 8192


@attrs.define
class DatagramOptions:
    """Options of datagram servers."""

    #: The largest datagram delivered; larger ones are dropped and reported.
    max_packet_size: int = count(1, default=MAX_PACKET_SIZE)


@declare_options(DatagramOptions)
class UDPServer(TCPServer):
    """A datagram server: each datagram is one request ``(data, socket)``."""

    allow_reuse_address = False
    allow_reuse_port = False
    socket_type = socket.SOCK_DGRAM
    max_packet_size: int  # an option (DatagramOptions)
    #: Datagrams dropped for being larger than ``max_packet_size``.
    datagrams_truncated = 0

    def get_request(self) -> tuple[Any, Any]:
        """Receive one datagram: return ``((data, socket), client_address)``."""
        limit = self.max_packet_size
        sock = self.socket  # looked up once: this runs for every datagram
        # One byte more than the limit: a datagram that fills it was too large.
        data, client_addr = sock.recvfrom(limit + 1)
        if len(data) > limit:
            raise DatagramTruncatedError(limit, client_addr)
        return (data, sock), client_addr

    def server_activate(self) -> None:
        """Nothing to listen for; only the activation hook fires."""
        self.call_hook("server_activate")

    def shutdown_request(self, request: Any) -> None:
        """Nothing to shut down for a datagram."""
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Nothing to close: the socket is the server's."""


DGRAM = SocketType("dgram", socket.SOCK_DGRAM, UDPServer)


# Report the public home in reprs, tracebacks and pickles.
UDPServer.__module__ = "sockserve"
