"""The built-in transports: each pairs an address family with a socket type."""

from __future__ import annotations

from ..core._plugin_types import Transport

__all__ = ["TCP", "TCP6", "UDP", "UDP6", "UNIX_STREAM", "UNIX_DGRAM"]

TCP = Transport("tcp", "inet", "stream", "TCP", description="TCP over IPv4; IPv6 literals work too")
TCP6 = Transport("tcp6", "inet6", "stream", "TCP6", description="TCP over IPv6 (ipv6_only option)")
UDP = Transport("udp", "inet", "dgram", "UDP", description="UDP over IPv4; IPv6 literals work too")
UDP6 = Transport("udp6", "inet6", "dgram", "UDP6", description="UDP over IPv6 (ipv6_only option)")
UNIX_STREAM = Transport("unix", "unix", "stream", "UnixStream", description="Unix stream sockets")
UNIX_DGRAM = Transport(
    "unix-dgram", "unix", "dgram", "UnixDatagram", description="Unix datagram sockets"
)
