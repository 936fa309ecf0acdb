"""The ``seqpacket`` socket type and the ``unix-seqpacket`` transport.

``SOCK_SEQPACKET`` is connection-oriented like a stream, but keeps message boundaries:
each ``send`` arrives as one ``recv``. The standard ``socketserver`` has no such server.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import sockserve

__all__ = ["UnixSeqpacketServer", "SeqpacketRequestHandler", "SEQPACKET", "UNIX_SEQPACKET"]

#: The largest message a handler receives; larger ones raise instead of arriving cut.
MAX_MESSAGE_SIZE = 65536


class UnixSeqpacketServer(sockserve.TCPServer):
    """A connection-oriented server on ``AF_UNIX`` ``SOCK_SEQPACKET`` sockets.

    It is a stream server in every respect (listen, accept, one connection per request)
    except that the socket type keeps message boundaries.
    """

    address_family = socket.AF_UNIX
    socket_type = socket.SOCK_SEQPACKET


class MessageTooLarge(OSError):
    """A message was larger than ``max_message_size`` and was cut by the kernel."""


class SeqpacketRequestHandler(sockserve.BaseRequestHandler):
    """Serve a seqpacket connection one message at a time.

    Override ``handle_message``; what it returns (if not None) is sent back as one message.
    """

    max_message_size = MAX_MESSAGE_SIZE

    def messages(self) -> Iterator[bytes]:
        """Yield each message until the peer closes the connection."""
        while True:
            data, _, flags, _ = self.request.recvmsg(self.max_message_size)
            if flags & socket.MSG_TRUNC:
                raise MessageTooLarge(f"message larger than {self.max_message_size} bytes")
            if not data:
                return
            yield data

    def send_message(self, data: bytes) -> None:
        """Send *data* as one message."""
        self.request.sendall(data)

    def handle(self) -> None:
        for message in self.messages():
            reply = self.handle_message(message)
            if reply is not None:
                self.send_message(reply)

    def handle_message(self, message: bytes) -> bytes | None:
        """Return the reply to *message*, or None for no reply."""
        raise NotImplementedError


SEQPACKET = sockserve.SocketType("seqpacket", socket.SOCK_SEQPACKET, UnixSeqpacketServer)
UNIX_SEQPACKET = sockserve.Transport(
    "unix-seqpacket",
    "unix",
    "seqpacket",
    "UnixSeqpacket",
    description="Unix SOCK_SEQPACKET sockets (message boundaries kept)",
)
