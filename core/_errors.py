"""The exception hierarchy: everything sockserve raises on purpose derives from SockserveError.

Each subclass also derives from the built-in exception a caller would naturally catch,
and carries the facts of the failure as attributes so that callers and tests can
inspect them without parsing the message.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "SockserveError",
    "PluginLoadError",
    "UnknownPluginError",
    "PluginClashWarning",
    "PluginLoadWarning",
    "AddressError",
    "PortRangeError",
    "PathTooLongError",
    "BindError",
    "HookError",
    "OptionError",
    "DatagramTruncatedError",
    "LayerError",
]


class SockserveError(Exception):
    """Base class of every error sockserve raises on purpose."""


class UnknownPluginError(SockserveError, LookupError):
    """No installed plugin of *kind* is called *plugin_name*.

    :ivar kind: the plugin kind (``"transport"``, ``"concurrency"``, ...).
    :ivar plugin_name: the name that was asked for.
    :ivar installed: the names that are installed for that kind.
    """

    def __init__(self, kind: str, plugin_name: str, installed: Iterable[str]) -> None:
        self.kind = kind
        self.plugin_name = plugin_name
        self.installed = tuple(sorted(installed))
        super().__init__(
            f"no {kind} plugin named {plugin_name!r}; "
            f"installed {kind} plugins: {', '.join(self.installed) or '(none)'}"
        )

    def __str__(self) -> str:  # LookupError/KeyError style quoting is not wanted
        return self.args[0]


class PluginLoadError(SockserveError, ImportError):
    """An installed plugin could not be loaded.

    :ivar kind: the plugin kind.
    :ivar plugin_name: the entry point's name.
    :ivar entry_point: ``"group  name = module:attr"``.
    :ivar distribution: ``"name version"`` of the distribution, or ``None``.
    :ivar cause: the original exception (also ``__cause__``).
    """

    def __init__(
        self,
        kind: str,
        plugin_name: str,
        entry_point: str,
        distribution: str | None,
        cause: BaseException,
        installed: Iterable[str] = (),
    ) -> None:
        self.kind = kind
        self.plugin_name = plugin_name
        self.entry_point = entry_point
        self.distribution = distribution
        self.cause = cause
        self.installed = tuple(sorted(installed))
        dist = distribution or "(no installed distribution)"
        fix = (
            f"install what it needs, or uninstall {distribution.split()[0]} so it is not discovered"
            if distribution
            else "fix the module the entry point names"
        )
        lines = [
            f"cannot load {kind} plugin {plugin_name!r}",
            f"  entry point: {entry_point}",
            f"  distribution: {dist}",
            f"  cause: {type(cause).__name__}: {cause}",
            f"  fix: {fix}",
        ]
        if self.installed:
            lines.append(f"  installed {kind} plugins: {', '.join(self.installed)}")
        super().__init__("\n".join(lines), name=plugin_name)


class PluginLoadWarning(UserWarning):
    """An automatically discovered plugin could not be loaded; everything else goes on."""


class PluginClashWarning(UserWarning):
    """Two distributions register the same plugin name; the message says which one wins."""


class AddressError(SockserveError, TypeError, ValueError):
    """A server address does not have the shape its address family expects.

    Also a ``TypeError`` (what the standard ``socket`` module raises for an address of
    the wrong shape) and a ``ValueError`` (for a value out of its range), so code written
    against the standard module keeps catching it.

    :ivar address: the address as given.
    :ivar family: the name of the address family that rejected it.
    :ivar expected: a description of the accepted shapes.
    """

    def __init__(self, address: object, family: str, expected: str, problem: str = "") -> None:
        self.address = address
        self.family = family
        self.expected = expected
        reason = f": {problem}" if problem else ""
        super().__init__(
            f"bad {family} address {address!r}{reason}; expected {expected}"
        )


class PortRangeError(AddressError, OverflowError):
    """A port number outside 0-65535 (the standard module raises ``OverflowError``)."""


class PathTooLongError(AddressError, OSError):
    """A Unix socket path longer than ``sun_path`` holds (the standard module raises ``OSError``)."""


class BindError(SockserveError, OSError):
    """Binding the server's socket failed; ``errno`` is the operating system's.

    Made with ``from_os_error``, it is also an instance of the error bind() raised
    (``PermissionError``, ``FileNotFoundError``, ``socket.gaierror``, ...), so that code
    written for the standard module catches what it caught there.

    :ivar address: the address that could not be bound.
    """

    def __init__(self, errno: int | None, message: str, address: object) -> None:
        self.address = address
        super().__init__(errno, message)

    def __str__(self) -> str:
        return f"[Errno {self.errno}] {self.strerror}" if self.errno else str(self.strerror)

    def __reduce__(self) -> Any:
        cause = next(
            c for c in type(self).__mro__ if issubclass(c, OSError) and not issubclass(c, SockserveError)
        )
        return (_make_bind_error, (cause, self.errno, self.strerror, self.address))

    @classmethod
    def from_os_error(cls, exc: OSError, message: str, address: object) -> BindError:
        """Report *exc* from bind() with *message*, keeping its type as a base class."""
        return _make_bind_error(type(exc), exc.errno, message, address)


#: BindError subclasses by the OSError subclass they also derive from.
_BIND_ERRORS: dict[type[OSError], type[BindError]] = {OSError: BindError}


def _make_bind_error(
    cause: type[OSError], errno: int | None, message: str, address: object
) -> BindError:
    cls = _BIND_ERRORS.get(cause)
    if cls is None:
        cls = type("BindError", (BindError, cause), {"__module__": "sockserve"})
        cls.__qualname__ = f"BindError[{cause.__name__}]"
        cls = _BIND_ERRORS.setdefault(cause, cls)
    return cls(errno, message, address)


class OptionError(SockserveError, ValueError):
    """An option (a server setting) is unknown or has a bad value.

    :ivar key: the option's name.
    :ivar value: the value given.
    :ivar known: for an unknown name, the options the server class has.
    """

    def __init__(
        self, key: str, value: object, problem: str | None, known: Iterable[str] = ()
    ) -> None:
        self.key = key
        self.value = value
        self.known = tuple(known)
        if problem is None:
            message = f"unknown option {key!r}; known options: {', '.join(self.known) or '(none)'}"
        else:
            message = f"bad value {value!r} for option {key!r}: {problem}"
        super().__init__(message)


class HookError(SockserveError, RuntimeError):
    """A lifecycle plugin's hook implementation raised.

    Raised (chained to the plugin's own exception) inside the server's error handling,
    so ``handle_error`` prints a traceback that names the plugin.

    :ivar hook: the hook's name.
    :ivar plugin_name: the name the plugin was registered under.
    """

    def __init__(self, hook: str, plugin_name: str) -> None:
        self.hook = hook
        self.plugin_name = plugin_name
        super().__init__(f"plugin {plugin_name!r} raised in hook {hook}")


class DatagramTruncatedError(SockserveError, OSError):
    """A datagram was larger than ``max_packet_size``; it was dropped, not cut.

    :ivar max_packet_size: the server's limit.
    :ivar client_address: the sender.
    """

    def __init__(self, max_packet_size: int, client_address: object) -> None:
        self.max_packet_size = max_packet_size
        self.client_address = client_address
        super().__init__(
            f"datagram from {client_address!r} is larger than max_packet_size="
            f"{max_packet_size}; dropped instead of delivering it truncated"
        )


class LayerError(SockserveError, ConnectionError):
    """A per-connection layer refused a connection (DESIGN.md section 6).

    Raised by a layer's ``prepare_request``: a timeout, a bad PROXY header, a failed TLS
    handshake. The server logs it in one line (no traceback), counts it by *reason* in
    ``requests_denied``, fires ``sockserve_request_denied`` and closes the connection.

    :ivar reason: a short, stable word for counters and logs (``"timeout"``,
        ``"bad-header"``, ``"handshake"``).
    :ivar peer: the address the connection came from, when the layer knows it.
    :ivar request: the connection as far as the layer got (a wrapped socket), to be shut
        down instead of the raw one; None for the raw one.
    :ivar log: False when the layer logged the refusal itself (a layer that logs at most
        once per peer per minute); the server then writes no line of its own.

    Raised from ``verify_request`` (on the serving thread, before anything is read, as
    an allow-list does), it refuses the connection the same way, counted by *reason*.
    """

    def __init__(
        self,
        reason: str,
        peer: Any = None,
        detail: str = "",
        *,
        request: Any = None,
        log: bool = True,
    ) -> None:
        self.reason = reason
        self.peer = peer
        self.detail = detail
        self.request = request
        self.log = log
        super().__init__(f"{reason}: {detail}" if detail else reason)

    def __str__(self) -> str:  # OSError would format (errno, strerror) pairs
        return str(self.args[0])
