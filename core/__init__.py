"""sockserve's core: the server lifecycle, request handlers, hooks, registry and errors."""

from types import FunctionType as _FunctionType

from ._errors import (
    AddressError,
    BindError,
    DatagramTruncatedError,
    HookError,
    LayerError,
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
from ._contract import Server
from ._options import (
    OptionCheck,
    any_of,
    check_options,
    choice,
    count,
    declare_options,
    exclusive,
    flag,
    non_negative,
    option,
    option_check,
    option_fields,
    positive,
    python_object,
    read_options,
    requires,
    seconds,
    text,
    with_options,
)
from ._plugin_types import AddressFamily, ConcurrencyMixIn, SocketType, Transport
from ._registry import Kind, PluginInfo, Registry, compose, registry
from ._server import FIRST_BYTE_TIMEOUT, LISTEN_BACKLOG, POLL_INTERVAL, BaseServer
from ._shared import SharedCounters, plugin_state
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
    "LISTEN_BACKLOG",
    "FIRST_BYTE_TIMEOUT",
    "Kind",
    "LayerError",
    "OptionCheck",
    "OptionError",
    "POLL_INTERVAL",
    "PathTooLongError",
    "PluginClashWarning",
    "PluginInfo",
    "PluginLoadError",
    "PluginLoadWarning",
    "PortRangeError",
    "Registry",
    "Server",
    "SharedCounters",
    "SocketType",
    "SockserveError",
    "StreamRequestHandler",
    "Transport",
    "UnknownPluginError",
    "any_of",
    "check_options",
    "choice",
    "compose",
    "count",
    "declare_options",
    "exclusive",
    "flag",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "non_negative",
    "option",
    "option_check",
    "option_fields",
    "plugin_state",
    "positive",
    "python_object",
    "read_options",
    "registry",
    "requires",
    "seconds",
    "text",
    "with_options",
]

# Report the public home in reprs, tracebacks and pickles.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, (type, _FunctionType)):
        _obj.__module__ = "sockserve"
del _name, _obj
