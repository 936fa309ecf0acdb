"""sockserve's core: the server lifecycle, request handlers, hooks, registry and errors."""

from types import FunctionType as _FunctionType

from ._errors import (
    AddressError,
    BindError,
    DatagramTruncatedError,
    HookError,
    OptionError,
    PathTooLongError,
    PluginClashWarning,
    PluginLoadError,
    PluginLoadWarning,
    PortRangeError,
    SockserveError,
    UnknownPluginError,
)
from ._handlers import BaseRequestHandler, DatagramRequestHandler, StreamRequestHandler
from ._hooks import get_plugin_manager
from ._options import with_options
from ._plugin_types import AddressFamily, ConcurrencyMixIn, SocketType, Transport
from ._registry import PluginInfo, Registry, compose, registry
from ._server import BaseServer
from .hookspecs import hookimpl, hookspec

__all__ = [
    "AddressError",
    "AddressFamily",
    "BaseRequestHandler",
    "BaseServer",
    "BindError",
    "ConcurrencyMixIn",
    "DatagramRequestHandler",
    "DatagramTruncatedError",
    "HookError",
    "OptionError",
    "PathTooLongError",
    "PluginClashWarning",
    "PluginInfo",
    "PluginLoadError",
    "PluginLoadWarning",
    "PortRangeError",
    "Registry",
    "SockserveError",
    "SocketType",
    "StreamRequestHandler",
    "Transport",
    "UnknownPluginError",
    "compose",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "registry",
    "with_options",
]

# Report the public home in reprs, tracebacks and pickles.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, (type, _FunctionType)):
        _obj.__module__ = "sockserve"
del _name, _obj
