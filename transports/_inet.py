"""The ``inet`` and ``inet6`` address families: (host, port) addresses."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from ..core._errors import AddressError, PortRangeError
from ..core._plugin_types import AddressFamily

if TYPE_CHECKING:
    from ..core._contract import Server as BaseServer

__all__ = ["INET", "INET6", "InetFamily", "Inet6Family"]


def _is_ipv6_literal(host: Any) -> bool:
    if isinstance(host, (bytes, bytearray)):
        host = bytes(host).decode("ascii", "replace")
    if not isinstance(host, str) or ":" not in host:
        return False
    try:
        socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except OSError:
        return False
    return True


def _strip_brackets(address: tuple[Any, ...]) -> tuple[Any, ...]:
    host = address[0]
    if isinstance(host, str) and host.startswith("[") and host.endswith("]"):
        return (host[1:-1], *address[1:])
    return address


class InetFamily(AddressFamily):
    """IPv4 ``(host, port)`` addresses; an IPv6 literal host gets an IPv6 socket.

    The standard module resolves every host with ``AF_INET`` and fails on ``'::1'`` with
    ``gaierror``; serving an IPv6 literal is what anyone giving one means.
    """

    name = "inet"
    address_family = socket.AF_INET
    expected = "a (host, port) tuple with a str host and an int port 0-65535, e.g. ('127.0.0.1', 8000)"
    _max_len = 2

    def check_address(self, address: Any) -> Any:
        if not isinstance(address, tuple) or not 2 <= len(address) <= self._max_len:
            raise AddressError(address, self.name, self.expected)
        host, port = address[0], address[1]
        if not isinstance(host, (str, bytes, bytearray)):
            raise AddressError(address, self.name, self.expected, "the host must be a str")
        if isinstance(port, bool) or not isinstance(port, int):
            raise AddressError(address, self.name, self.expected, "the port must be an int")
        if not 0 <= port <= 65535:
            raise PortRangeError(address, self.name, self.expected, f"port {port} is out of range")
        return _strip_brackets(address)

    def socket_family(self, address: Any) -> int:
        return socket.AF_INET6 if _is_ipv6_literal(address[0]) else self.address_family

    def before_bind(self, server: BaseServer) -> None:
        if server.socket.family == socket.AF_INET6:  # type: ignore[attr-defined]
            _set_v6only(server)


class Inet6Family(InetFamily):
    """IPv6 ``(host, port[, flowinfo[, scope_id]])`` addresses.

    Set ``ipv6_only`` on the server class (or instance, before binding) to ``True`` to
    serve IPv6 only, ``False`` to serve both stacks through IPv4-mapped addresses; the
    default ``None`` leaves the system's setting (both stacks on Linux).
    """

    name = "inet6"
    address_family = socket.AF_INET6
    expected = (
        "a (host, port[, flowinfo[, scope_id]]) tuple with a str host and an int port "
        "0-65535, e.g. ('::1', 8000)"
    )
    _max_len = 4

    def socket_family(self, address: Any) -> int:
        return self.address_family


def _set_v6only(server: Any) -> None:
    v6only = getattr(server, "ipv6_only", None)
    if v6only is not None and hasattr(socket, "IPV6_V6ONLY"):
        server.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(bool(v6only)))


INET = InetFamily()
INET6 = Inet6Family()
