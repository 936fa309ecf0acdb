"""The built-in transports: each pairs an address family with a socket type.

The two Unix ones carry the ``socket_mode`` option (``UnixSocketMixIn``) and are made on
first use (module ``__getattr__``), so that asking for ``tcp`` does not import the Unix
family's module (DESIGN.md section 3: entry points load lazily).
"""

from __future__ import annotations

from typing import Any

from ..core._plugin_types import Transport

__all__ = ["TCP", "TCP6", "UDP", "UDP6", "UNIX_STREAM", "UNIX_DGRAM"]  # noqa: F822 - the last two lazily

TCP = Transport("tcp", "inet", "stream", "TCP", description="TCP over IPv4; IPv6 literals work too")
TCP6 = Transport("tcp6", "inet6", "stream", "TCP6", description="TCP over IPv6 (ipv6_only option)")
UDP = Transport("udp", "inet", "dgram", "UDP", description="UDP over IPv4; IPv6 literals work too")
UDP6 = Transport("udp6", "inet6", "dgram", "UDP6", description="UDP over IPv6 (ipv6_only option)")

_UNIX = {
    "UNIX_STREAM": ("unix", "stream", "UnixStream", "Unix stream sockets (socket_mode option)"),
    "UNIX_DGRAM": ("unix-dgram", "dgram", "UnixDatagram", "Unix datagram sockets (socket_mode option)"),
}


def __getattr__(name: str) -> Any:
    if name not in _UNIX:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ._unix import UnixSocketMixIn

    transport_name, socket_type, stem, description = _UNIX[name]
    transport = Transport(transport_name, "unix", socket_type, stem, mixin=UnixSocketMixIn,
                          description=description)
    globals()[name] = transport
    return transport
