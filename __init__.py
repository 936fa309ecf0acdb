"""sockserve: the standard ``socketserver``, class for class, built from plugins.

``import sockserve as socketserver`` runs code written for the standard module. The
documented server classes are composed by the registry from the entry-point plugins on
first use: ``sockserve.ThreadingUDPServer is sockserve.compose("udp", "threading")``.
"""

from __future__ import annotations

from typing import Any

from .core import *  # noqa: F403
from .core import __all__ as _core_all

__version__ = "0.1.0"

#: The documented concrete classes: name -> (transport, concurrency).
_STANDARD_CLASSES: dict[str, tuple[str, str]] = {
    "TCPServer": ("tcp", "sync"),
    "UDPServer": ("udp", "sync"),
    "UnixStreamServer": ("unix", "sync"),
    "UnixDatagramServer": ("unix-dgram", "sync"),
    "ForkingTCPServer": ("tcp", "forking"),
    "ForkingUDPServer": ("udp", "forking"),
    "ForkingUnixStreamServer": ("unix", "forking"),
    "ForkingUnixDatagramServer": ("unix-dgram", "forking"),
    "ThreadingTCPServer": ("tcp", "threading"),
    "ThreadingUDPServer": ("udp", "threading"),
    "ThreadingUnixStreamServer": ("unix", "threading"),
    "ThreadingUnixDatagramServer": ("unix-dgram", "threading"),
}
#: The documented mixins: name -> concurrency plugin.
_STANDARD_MIXINS: dict[str, str] = {
    "ThreadingMixIn": "threading",
    "ForkingMixIn": "forking",
}

#: The standard module's ``__all__``, in its order.
STANDARD_NAMES = (
    "BaseServer", "TCPServer", "UDPServer", "ThreadingUDPServer", "ThreadingTCPServer",
    "BaseRequestHandler", "StreamRequestHandler", "DatagramRequestHandler",
    "ThreadingMixIn", "ForkingUDPServer", "ForkingTCPServer", "ForkingMixIn",
    "UnixStreamServer", "UnixDatagramServer", "ThreadingUnixStreamServer",
    "ThreadingUnixDatagramServer", "ForkingUnixStreamServer", "ForkingUnixDatagramServer",
)

__all__ = sorted(set(_core_all) | set(STANDARD_NAMES) | {"STANDARD_NAMES", "__version__"})


def __getattr__(name: str) -> Any:
    # Composed on first use, so that importing sockserve loads no plugin.
    if name in _STANDARD_CLASSES:
        value = compose(*_STANDARD_CLASSES[name])  # noqa: F405
    elif name in _STANDARD_MIXINS:
        value = registry.load("concurrency", _STANDARD_MIXINS[name])  # noqa: F405
    elif name.startswith("__"):
        raise AttributeError(f"module 'sockserve' has no attribute {name!r}")
    else:
        # Any other composed class or built-in mixin (PreforkTCPServer, ThreadpoolMixIn):
        # not kept here, so that a class composed with plugins goes when unused.
        return registry.resolve(name)  # noqa: F405
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
