"""The shapes of ``sockserve``'s arguments: ADDRESS, HANDLER, a worker count; the usage
error they raise; the hint for an option no plugin in the command declares.

Shared by the parser (``_cli``) and what runs the server (``_cli_serve``), neither of which
imports the other's functions.
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Sequence
from typing import Any

from ._errors import PluginLoadError, SockserveError, UnknownPluginError
from ._options import declared_option_names
from ._registry import registry

__all__ = [
    "UsageError",
    "parse_address",
    "parse_address_token",
    "is_handler",
    "split_targets",
    "load_handler",
    "worker_count",
    "option_declared_by",
]

DEFAULT_ADDRESS = "localhost:9999"
DEFAULT_HANDLER = "sockserve.core._demo:UpperCaseHandler"
ADDRESS_SHAPES = "HOST:PORT, [IPV6]:PORT, PORT or unix:PATH"
HANDLER_SHAPE = "module:Class, e.g. mypkg.handlers:EchoHandler"
#: A HANDLER: a dotted module name, a colon, a class name that starts with a capital
#: letter, as class names do. That capital tells it from ``HOST:PORT`` with a named port
#: (``localhost:http``, an error either way, reported as the address it looks like).
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_HANDLER = re.compile(rf"{_DOTTED}:[A-Z]\w*(?:\.[A-Za-z_]\w*)*")
#: module:attr of any case: named in the hint of an address that does not parse.
_LOOSE_HANDLER = re.compile(rf"{_DOTTED}:{_DOTTED}")
#: What always begins an ADDRESS, never a HANDLER (no module of these names is served).
_ADDRESS_PREFIXES = ("unix:", "fd://", "systemd:")


class UsageError(SockserveError, ValueError):
    """A command-line argument is wrong; the message says how."""


def parse_address(text: str) -> tuple[Any, str | None]:
    """Parse a command-line ADDRESS; return ``(address, implied_transport)``.

    :raises UsageError: *text* has none of the accepted shapes.
    """
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise UsageError(f"address {text!r} has an empty path; expected {ADDRESS_SHAPES}")
        return path, "unix"
    host, port_text = "localhost", text
    if text.startswith("["):
        close = text.find("]:")
        if close < 0:
            raise UsageError(f"address {text!r}: expected [IPV6]:PORT, e.g. [::1]:9999")
        host, port_text = text[1:close], text[close + 2:]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise UsageError(f"address {text!r}: put an IPv6 host in brackets, e.g. [::1]:9999")
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(
            f"address {text!r}: port {port_text!r} is not a number; expected {ADDRESS_SHAPES}"
        ) from None
    if not 0 <= port <= 65535:
        raise UsageError(f"address {text!r}: port {port} is out of range 0-65535")
    return (host, port), None


def is_handler(text: str) -> bool:
    """True for a HANDLER token (``module:Class``), False for anything that is, or is
    meant as, an ADDRESS (``unix:``, ``fd://`` and ``systemd`` always are)."""
    if text == "systemd" or text.startswith(_ADDRESS_PREFIXES):
        return False
    return _HANDLER.fullmatch(text) is not None


def split_targets(tokens: Sequence[str]) -> tuple[list[str], str]:
    """Split ``serve``'s positional arguments into the ADDRESS list and the HANDLER.

    The last token is the HANDLER when it has its shape (``is_handler``); every other
    token is an ADDRESS. No address: the default one; no handler: the demo's.

    :raises UsageError: a HANDLER-shaped token that is not last.
    """
    addresses = list(tokens)
    handler = DEFAULT_HANDLER
    if addresses and is_handler(addresses[-1]):
        handler = addresses.pop()
    for text in addresses:
        if is_handler(text):
            raise UsageError(f"{text!r} is a HANDLER ({HANDLER_SHAPE}) before an ADDRESS: give "
                             f"every ADDRESS first ({ADDRESS_SHAPES}, fd://N, systemd or "
                             "systemd:NAME), then at most one HANDLER")
    return addresses or [DEFAULT_ADDRESS], handler


def parse_address_token(text: str) -> tuple[Any, str | None]:
    """``parse_address``, with a hint when *text* may have been meant as the HANDLER."""
    try:
        return parse_address(text)
    except UsageError as exc:
        if _LOOSE_HANDLER.fullmatch(text) and not text.startswith(_ADDRESS_PREFIXES):
            raise UsageError(f"{exc}; a HANDLER is {HANDLER_SHAPE} (a capitalised class "
                             "name), given last") from None
        raise


def load_handler(spec: str) -> type:
    """Import the HANDLER *spec* (``module:Class``) and return the class.

    :raises UsageError: a bad shape, or the module cannot be imported (whatever it
        raised: a missing module, a syntax error, an error at import time), or it has no
        such attribute.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"handler {spec!r}: expected {HANDLER_SHAPE}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        detail = str(exc) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
        raise UsageError(f"handler {spec!r}: cannot import {module_name!r}: {detail}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UsageError(f"handler {spec!r}: module {module_name!r} has no {attr!r}") from None


#: Where an option the composed class lacks may come from: kind -> the flag that adds one.
OPTION_SOURCES = {"concurrency": "--concurrency", "transport": "--transport",
                  "layer": "--layer", "plugin": "--plugin"}


def option_declared_by(key: str) -> str | None:
    """Say which installed plugins declare option *key*, for an "unknown option" error.

    Plugins that fail to load are skipped here (``sockserve plugins`` reports them).
    """
    found = []
    for kind, flag in OPTION_SOURCES.items():
        for name in registry.names(kind):
            try:
                plugin = (registry.transport_class(name) if kind == "transport"
                          else registry.load(kind, name))
            except (PluginLoadError, UnknownPluginError, TypeError):
                continue
            if key in declared_option_names(plugin):
                found.append(f"{flag} {name}")
    if not found:
        return None
    return f"it is declared by {' or '.join(found)}: add that to the command line"


def worker_count(text: str) -> int:
    """A worker count (``-w``, ``WEB_CONCURRENCY``): a whole number, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} workers: at least 1")
    return value
