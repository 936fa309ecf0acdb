"""What a family, socket type, transport and concurrency plugin is: the plugin contracts.

A plugin conforms by shape; these classes are what the entry points name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    from ._contract import Server

__all__ = ["AddressFamily", "SocketType", "Transport", "ConcurrencyMixIn"]


class AddressFamily:
    """An address family plugin: checks addresses and prepares and releases bound sockets.

    Stateless: one instance serves every server of that family. Per-server state is kept
    on the server. Subclass it and override what your family needs.
    """

    #: The plugin's name (``inet``, ``unix``, ...).
    name: ClassVar[str] = ""
    #: The ``socket.AF_*`` constant.
    address_family: ClassVar[int] = -1
    #: The accepted address shapes, for error messages.
    expected: ClassVar[str] = "an address"

    def check_address(self, address: Any) -> Any:
        """Return *address* (possibly normalised) or raise ``sockserve.AddressError``."""
        return address

    def socket_family(self, address: Any) -> int:
        """Return the ``AF_*`` to create the socket with for *address*."""
        return self.address_family

    def before_bind(self, server: Server) -> None:
        """Prepare ``server.socket`` before it is bound to ``server.server_address``."""

    def bound_address(self, server: Server) -> Any:
        """Return the address to store as ``server.server_address`` after binding."""
        return server.socket.getsockname()  # type: ignore[attr-defined]

    def release(self, server: Server) -> None:
        """Release what binding created (a socket file, say) when the server closes."""

    def __repr__(self) -> str:
        return f"<address family {self.name!r}>"


@attrs.frozen
class SocketType:
    """A socket type plugin: the server class that implements that socket type's behaviour.

    ``server_class`` is the socket type's server for its default family (``TCPServer``
    for ``stream``, ``UDPServer`` for ``dgram``); transports of other families derive
    from it, which gives the documented inheritance (``UnixDatagramServer`` is a
    ``UDPServer``).
    """

    #: The plugin's name (``stream``, ``dgram``, ...).
    name: str
    #: The ``socket.SOCK_*`` constant.
    socket_type: int
    #: The server class implementing this socket type.
    server_class: type


@attrs.frozen
class Transport:
    """A transport plugin: an address family paired with a socket type.

    :param name: the plugin's name (``tcp``, ``unix-dgram``, ...).
    :param family: the address family plugin's name.
    :param socket_type: the socket type plugin's name.
    :param stem: the class name stem: ``"TCP"`` gives ``TCPServer``, ``ThreadingTCPServer``.
    :param mixin: optional extra behaviour (TLS, say), placed before the socket type's
        server class in the MRO.
    :param description: one line for ``sockserve plugins``.
    """

    name: str
    family: str
    socket_type: str
    stem: str
    mixin: type | None = None
    description: str = ""


@runtime_checkable
class ConcurrencyMixIn(Protocol):
    """A concurrency plugin is a mixin class shaped like ``ThreadingMixIn``.

    It overrides ``process_request`` to hand the request to a worker, which runs
    ``self.run_request(request, client_address)`` (finish_request, error handling,
    hooks, shutdown_request), and ``server_close`` to wait for or stop its workers.
    An empty mixin (like ``sync``) composes to the transport class itself.
    """

    def process_request(self, request: Any, client_address: Any) -> None: ...

    def server_close(self) -> None: ...


