"""The ``stream`` socket type: ``TCPServer``, the connection-oriented server.

``TCPServer`` is the stream server for the default (``inet``) family; every stream
transport of another family derives from it, as the standard module documents.
"""

from __future__ import annotations

import contextvars
import socket
import warnings
from typing import Any, TypeVar, cast

import attrs

from ..core._errors import AddressError, BindError, OptionError, SockserveError
from ..core._options import count, declare_options, flag, with_options
from ..core._plugin_types import AddressFamily, SocketType
from ..core._registry import Registry, registry
from ..core._server import BaseServer

__all__ = ["TCPServer", "STREAM"]

_Socket = socket.socket
_S = TypeVar("_S", bound="TCPServer")
#: The socket ``from_socket`` hands to the constructor it calls (None: make one).
_given_socket: contextvars.ContextVar[socket.socket | None] = contextvars.ContextVar(
    "sockserve_given_socket", default=None
)
_getdefaulttimeout = socket.getdefaulttimeout

#: The standard module's listen() backlog for the documented classes; kept for
#: compatibility. sockserve's own strategies and command line use LISTEN_BACKLOG
#: (core/_server.py).
REQUEST_QUEUE_SIZE = 5


@attrs.define
class StreamOptions:
    """Options of stream (and, through inheritance, datagram) servers."""

    #: The listen() backlog.
    request_queue_size: int = count(0, default=REQUEST_QUEUE_SIZE)
    #: Set SO_REUSEADDR before binding.
    allow_reuse_address: bool = flag(default=False)
    #: Set SO_REUSEPORT before binding.
    allow_reuse_port: bool = flag(default=False)
    #: For IPv6 sockets: True serves IPv6 only, False both stacks (IPv4-mapped), None
    #: leaves the system default.
    ipv6_only: bool | None = flag(optional=True, default=None)


@declare_options(StreamOptions)
class TCPServer(BaseServer):
    """A stream server: binds, listens and accepts connections.

    :param server_address: the address to bind; its shape is checked by the address
        family plugin (``(host, port)`` for inet), with an error saying what was expected.
    :param RequestHandlerClass: the handler class to instantiate per request.
    :param bind_and_activate: bind and listen now (default); on failure the socket is
        closed before the error propagates.
    """

    address_family: int = socket.AF_INET
    socket_type = socket.SOCK_STREAM
    # Options (StreamOptions declares them and their defaults).
    request_queue_size: int
    allow_reuse_address: bool
    allow_reuse_port: bool
    ipv6_only: bool | None
    #: The address family plugin and the registry the class was composed with (set by
    #: ``compose``); a hand-written class looks its family up by ``address_family``.
    sockserve_family: AddressFamily | None = None
    sockserve_registry: Registry | None = None
    _accept_args: tuple[Any, int, int, int] | None = None
    #: The addresses add_address() bound (what their family plugins must release).
    _bindings: list[_Binding] = []  # replaced, never changed in place
    _address_checked = True
    _ssl_warned = False
    #: False for a server built on a given socket (``from_socket``): the address is the
    #: socket's maker's, and closing the server removes nothing (no Unix socket file).
    owns_address = True
    #: The given socket was listening already: server_activate does not listen again
    #: (that would replace the backlog its maker chose, systemd's ``Backlog=``).
    _listening = False

    def __init__(
        self, server_address: Any, RequestHandlerClass: Any, bind_and_activate: bool = True
    ) -> None:
        family = self.sockserve_family
        if family is None or family.address_family != self.address_family:
            family = (self.sockserve_registry or registry).family_for(self.address_family)
        try:
            server_address = family.check_address(server_address)
        except AddressError:
            if bind_and_activate:
                raise
            # Not binding now, the standard module does not look at the address: the
            # caller may set server_address or hand over a socket before binding (systemd
            # socket activation, say). server_bind() checks it then.
            checked = False
        else:
            checked = True
            address_family = family.socket_family(server_address)
            if address_family != self.address_family:
                self.address_family = address_family
        BaseServer.__init__(self, server_address, RequestHandlerClass)
        self._family = family
        self._address_checked = checked
        given = _given_socket.get()
        if given is None:
            self.socket = socket.socket(self.address_family, self.socket_type)
        else:  # from_socket: serve that socket, bound by whoever made it
            _given_socket.set(None)  # for this server only
            self.socket = given
            self.owns_address = False
            if self.socket_type == socket.SOCK_STREAM:
                self._listening = bool(given.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        if bind_and_activate:
            try:
                if given is None:
                    self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

    def server_bind(self) -> None:
        """Bind the socket to ``server_address`` and store the real address there."""
        family = self._family
        if not self._address_checked:
            self.server_address = family.check_address(self.server_address)
            self._address_checked = True
        _bind(self, family)

    def add_address(self, address: Any, family: str | AddressFamily | None = None) -> Any:
        """Bind and serve *address* too: one more listening socket for this server.

        The socket is made and bound as the server's own was: the address checked by the
        family plugin, SO_REUSEADDR / SO_REUSEPORT as ``allow_reuse_address`` /
        ``allow_reuse_port`` say, the family's preparation (``IPV6_V6ONLY`` from
        ``ipv6_only`` for an IPv6 socket, a stale Unix socket file replaced,
        ``socket_mode``), then it listens with ``request_queue_size`` and is served with
        ``add_listener``. A Unix socket file it creates is removed at ``server_close()``,
        as the server's own is. On failure nothing is left: the socket is closed.

        :param family: the address family plugin (or its name) for *address*, when it is
            not the server's (a ``"unix"`` path beside a TCP address); default the
            server's.
        :returns: the bound address (the real port when *address* asked for port 0).
        :raises AddressError: *address* is not of the family's shapes.
        :raises BindError: it cannot be bound; the message names it.
        """
        if family is None:
            plugin: AddressFamily = self._family
        elif isinstance(family, str):
            plugin = (self.sockserve_registry or registry).load("family", family)
        else:
            plugin = family
        address = plugin.check_address(address)
        sock = socket.socket(plugin.socket_family(address), self.socket_type)
        binding = _Binding(self, plugin, sock, address)
        try:
            _bind(binding, plugin)
            self.add_listener(sock)
        except BaseException:
            try:
                plugin.release(binding)  # a socket file bound before listen() failed
            finally:
                sock.close()
            raise
        self._bindings = [*self._bindings, binding]
        return binding.server_address

    def server_activate(self) -> None:
        """Listen with a backlog of ``request_queue_size`` (a given socket that listens
        already keeps its own)."""
        if not self._listening:
            self.socket.listen(self.request_queue_size)
        self.call_hook("server_activate")

    @classmethod
    def from_socket(cls: type[_S], sock: socket.socket, RequestHandlerClass: Any, **options: Any) -> _S:
        """Return a server of this class serving *sock*, a socket bound elsewhere.

        For socket activation (``sockserve.transports._systemd.adopt``, systemd's
        ``LISTEN_FDS``) and sockets made by hand: the socket's family and type must be the
        ones this class serves; ``server_address`` is what ``getsockname()`` says; nothing
        is bound; a stream socket is made to listen only if it does not listen already;
        the server does not own the address (``owns_address`` is False: a Unix socket
        file is never removed at close). From here on the server owns *sock*:
        ``server_close()`` closes it, also when the construction fails.

        :param options: option values, as ``sockserve.with_options`` takes them.
        :raises SocketMismatchError: *sock* is of another family or type; the message
            names both (*sock* is left as it was).
        :raises OptionError: an option cannot apply to a given socket (prefork's
            ``reuse_port`` binds sockets of its own; ``socket_mode`` is for files it binds).
        """
        from ._systemd import SocketMismatchError, describe_socket, transport_for

        if not isinstance(sock, socket.socket):
            raise TypeError(f"from_socket() needs a socket.socket, not {type(sock).__name__}")
        klass: type[_S] = cast("type[_S]", with_options(cls, options)) if options else cls
        have = (int(sock.family), int(sock.type))
        want = (int(klass.address_family), int(klass.socket_type))
        if have != want:
            try:
                hint = f" (transport {transport_for(sock, klass.sockserve_registry)})"
            except SockserveError:
                hint = ""
            raise SocketMismatchError(
                f"this socket is {describe_socket(*have)}{hint} but {klass.__name__} serves "
                f"{describe_socket(*want)}", have[0], have[1], klass,
            )
        if getattr(klass, "reuse_port", False):
            raise OptionError("reuse_port", True, "a server on a given socket cannot bind "
                              "SO_REUSEPORT sockets of its own; turn reuse_port off")
        mode = getattr(klass, "socket_mode", None)
        if mode is not None:
            raise OptionError("socket_mode", mode, "a given socket's file keeps the mode its maker "
                              "gave it (systemd: SocketMode= in the .socket unit)")
        token = _given_socket.set(sock)
        try:
            return klass(sock.getsockname(), RequestHandlerClass)
        except BaseException:
            sock.close()  # the server's now; closed already if the server had it
            raise
        finally:
            _given_socket.reset(token)

    def server_close(self) -> None:
        """Close the listening sockets (and remove the Unix socket files we created)."""
        self._family.release(self)
        self.socket.close()
        bindings, self._bindings = self._bindings, []
        for binding in bindings:
            binding.family.release(binding)
        self.close_listeners()

    def fileno(self) -> int:
        """Return the listening socket's file descriptor (for selectors)."""
        return self.socket.fileno()

    def get_request(self) -> tuple[Any, Any]:
        """Accept a connection: return ``(socket, client_address)``."""
        listening = self.socket
        if type(listening) is not _Socket:  # an ssl.SSLSocket, say: its accept() wraps
            if not self._ssl_warned and hasattr(listening, "do_handshake"):
                type(self)._ssl_warned = True
                warnings.warn(
                    f"{type(self).__name__}: the listening socket is an SSLSocket, so every "
                    "TLS handshake runs on the serving thread and one silent client stalls "
                    "the server; use the 'tls' layer (compose(..., layers=['tls'])), which "
                    "handshakes in the worker with a deadline",
                    DeprecationWarning,
                    stacklevel=2,
                )
            return listening.accept()
        # socket.accept() reads the listening socket's family and type properties on
        # every call to build the new socket, each an IntEnum conversion: together 1.3 µs
        # of a prefork worker's ~35 µs per connection (benchmarks/THROUGHPUT.md). Same
        # steps here, with those values read once per listening socket.
        args = self._accept_args
        if args is None or args[0] is not listening:
            args = self._accept_args = (
                listening, int(listening.family), int(listening.type), listening.proto
            )
        fd, address = listening._accept()  # type: ignore[attr-defined]  # accept()'s first step
        sock = _Socket(args[1], args[2], args[3], fileno=fd)
        if _getdefaulttimeout() is None and listening.gettimeout():
            sock.setblocking(True)  # as socket.accept(): a blocking socket by default
        return sock, address

    def shutdown_request(self, request: Any) -> None:
        """Shut the connection down for writing (so the peer sees EOF), then close it."""
        try:
            # Explicitly shut down: socket.close() alone would not end the connection
            # while a forked child still holds a copy of it.
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer may have closed it already
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Close the connection."""
        request.close()


def _bind(server: Any, family: AddressFamily) -> None:
    """Bind ``server.socket`` to ``server.server_address`` (checked already), then store
    the real address there: the steps of ``server_bind``, for the server's own socket and
    for those of ``add_address`` (*server* a ``_Binding`` then)."""
    if server.allow_reuse_address and hasattr(socket, "SO_REUSEADDR"):
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if server.allow_reuse_port and hasattr(socket, "SO_REUSEPORT"):
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    family.before_bind(server)
    try:
        server.socket.bind(server.server_address)
    except OSError as exc:
        if isinstance(exc, BindError):
            raise
        raise BindError.from_os_error(
            exc,
            f"{exc.strerror or exc}: cannot bind {family.name} address {server.server_address!r}",
            server.server_address,
        ) from exc
    server.server_address = family.bound_address(server)


class _Binding:
    """One address of ``add_address``, as its address family plugin sees the server.

    Family plugins are written against the server: ``server.socket``,
    ``server.server_address``, its options (``ipv6_only``, ``socket_mode``). This view
    gives them the new socket and address and the server's public attributes (settings)
    for everything else. What they store on it stays on it: a private name (the Unix
    family's ``_unix_socket_file``) is never read from the server, whose own socket's
    state it is.
    """

    #: The address was bound here: its socket file is ours to remove, also on a server
    #: built on a given socket (``from_socket``).
    owns_address = True

    def __init__(self, server: TCPServer, family: AddressFamily, sock: socket.socket,
                 address: Any) -> None:
        self._server, self.family, self.socket, self.server_address = server, family, sock, address

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._server, name)


STREAM = SocketType("stream", socket.SOCK_STREAM, TCPServer)


# Report the public home in reprs, tracebacks and pickles.
TCPServer.__module__ = "sockserve"
