"""The command line: ``sockserve serve``, ``sockserve plugins``, ``sockserve --version``.

What belongs here, and why it is one module of more than 400 lines: everything the command
line adds on top of the library, read in one place: parsing (flags, ``SOCKSERVE_<FLAG>``
variables, addresses including passed sockets), what ``sockserve serve`` turns on that the
library leaves off (backlog, drain deadline, limits, the systemd plugin, the tls layer
from ``--tls-cert``), the signals (stop, second stop, reload), the startup lines, and the
``plugins`` listing. The library pieces it calls stay where they are: options in
``_options``, activation in ``transports/_systemd``, TLS flags in ``transports/_tls``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import platform
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from ._errors import PluginClashWarning, PluginLoadError, SockserveError, UnknownPluginError
from ._hooks import block_plugins
from ._options import declared_option_names, parse_command_line_options, with_options
from ._registry import registry
from ._server import LISTEN_BACKLOG

log = logging.getLogger("sockserve")

__all__ = ["main", "parse_address"]

DEFAULT_ADDRESS = "localhost:9999"
DEFAULT_HANDLER = "sockserve.core._demo:UpperCaseHandler"
ADDRESS_SHAPES = "HOST:PORT, [IPV6]:PORT, PORT or unix:PATH"

#: listen() backlog of ``sockserve serve``: the one sockserve's own strategies use.
SERVE_BACKLOG = LISTEN_BACKLOG
#: Seconds ``sockserve serve`` lets in-flight requests finish after Ctrl-C or SIGTERM.
SERVE_DRAIN_TIMEOUT = 10.0
#: Seconds between turns of the serve loop (service_actions, reaping children).
SERVE_POLL_INTERVAL = 0.5
#: Limits ``sockserve serve`` turns on (the library's classes have them off): a client
#: that stops talking for a minute, a handler running for five, more than 1024
#: connections per process or 256 from one client host (the PROXY-protocol client
#: with ``--layer proxy``; behind a load balancer without it every client shares the
#: balancer's address). ``-o NAME=VALUE`` changes one, ``-o NAME=none`` turns it off.
SERVE_LIMITS: dict[str, Any] = {
    "idle_timeout": 60.0,
    "request_timeout": 300.0,
    "max_connections": 1024,
    "max_connections_per_ip": 256,
}


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


def _load_handler(spec: str) -> type:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"handler {spec!r}: expected module:Class, e.g. mypkg.handlers:EchoHandler")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"handler {spec!r}: cannot import {module_name!r}: {exc}") from exc
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


def _build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="sockserve", description="Serve requests with sockserve, or list its plugins."
    )
    parser.add_argument("--version", action="version",
                        version=f"sockserve {__version__} (Python {platform.python_version()})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run a server (default: the upper-casing echo demo)")
    serve.add_argument("address", nargs="?", default=DEFAULT_ADDRESS,
                       help=f"{ADDRESS_SHAPES}, or a passed socket: fd://N, systemd or "
                       f"systemd:NAME (default {DEFAULT_ADDRESS})")
    serve.add_argument("handler", nargs="?", default=DEFAULT_HANDLER,
                       help="request handler as module:Class (default: upper-casing echo)")
    serve.add_argument("--transport", "-t", help="transport plugin (default tcp, unix for unix:PATH, "
                       "the socket's own for fd://N and systemd)")
    serve.add_argument("--concurrency", "-c", default="threading",
                       help="concurrency plugin (default threading)")
    serve.add_argument("--layer", "-l", action="append", default=[],
                       help="add a per-connection layer by name, in order (repeatable)")
    serve.add_argument("--plugin", "-p", action="append", default=[],
                       help="enable a lifecycle plugin by name, or block an auto-loaded one "
                       "with no:NAME (repeatable)")
    serve.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                       help="set a server setting, e.g. drain_timeout=5 (repeatable)")
    serve.add_argument("--workers", "-w", type=_worker_count, metavar="N",
                       help="worker processes (prefork and others that declare workers; "
                       "default $WEB_CONCURRENCY when set)")
    serve.add_argument("--log-level", default="info", type=str.lower,
                       choices=["debug", "info", "warning", "error", "critical"],
                       help="lowest level logged (default info)")
    serve.add_argument("--check-config", action="store_true",
                       help="build the server (classes, options, TLS contexts, the bound "
                       "socket) and exit 0, or 2 with the error, without serving")
    serve.add_argument("--tls-cert", metavar="FILE",
                       help="serve TLS with this PEM certificate chain (adds --layer tls)")
    serve.add_argument("--tls-key", metavar="FILE",
                       help="the private key of --tls-cert (default: in the --tls-cert file)")
    serve.add_argument("--tls-password-file", metavar="FILE",
                       help="a file whose first line is the password of the key")
    commands.add_parser("plugins", help="list installed plugins with their distributions")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from ..transports._systemd import adopt, is_activation_address, transport_for

    if not is_activation_address(args.address):
        return _serve_address(args, *parse_address(args.address))
    # Socket activation: the socket is the address; its family and type pick the transport.
    sock = adopt(args.address)
    try:
        return _serve_address(args, sock, transport_for(sock))
    except BaseException:
        sock.close()  # from_socket closes it once it has it; before that it is ours
        raise


def _serve_address(args: argparse.Namespace, address: Any, implied: str | None) -> int:
    transport = args.transport or implied or "tcp"
    handler = _load_handler(args.handler)
    if os.environ.get("NOTIFY_SOCKET") and not {"systemd", "no:systemd"} & set(args.plugin):
        args.plugin.append("systemd")  # sd_notify READY / STOPPING / WATCHDOG under systemd
    # Blocked before the manager auto-loads, so that (as with SOCKSERVE_BLOCK_PLUGINS) a
    # blocked plugin is not even imported.
    block_plugins(name[3:] for name in args.plugin if name.startswith("no:"))
    plugins = [registry.load("plugin", name) for name in args.plugin if not name.startswith("no:")]
    # An inner strategy (prefork's ``inner``) is composed in, so that its options exist.
    inner = [text.partition("=")[2].strip() for text in args.option
             if text.partition("=")[0].strip() == "inner"]
    # --tls-cert and friends (the standard http.server's flags) add the tls layer, last:
    # after --layer proxy, say, so that the PROXY header is read in clear first.
    from ..transports._tls import tls_options_from_flags  # ssl only when serving

    tls = tls_options_from_flags(args.tls_cert, args.tls_key, args.tls_password_file)
    layers = [*args.layer, "tls"] if tls and "tls" not in args.layer else list(args.layer)
    base = registry.compose(transport, args.concurrency, layers=layers, plugins=plugins,
                            options={"inner": inner[-1]} if inner else None)
    settings: dict[str, Any] = {
        "request_queue_size": SERVE_BACKLOG,
        "drain_timeout": SERVE_DRAIN_TIMEOUT,
        "allow_reuse_address": True,
        **SERVE_LIMITS,
        **tls,  # --option certfile=... given too overrides the flag
    }
    server_class = with_options(base, settings)
    option_texts = list(args.option)
    if args.workers is not None:
        option_texts.insert(0, f"workers={args.workers}")  # an explicit -o workers= wins
    elif os.environ.get("WEB_CONCURRENCY") and "workers" in declared_option_names(server_class):
        try:
            option_texts.insert(0, f"workers={_worker_count(os.environ['WEB_CONCURRENCY'])}")
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"WEB_CONCURRENCY: {exc}") from None
    options = parse_command_line_options(server_class, option_texts, unknown_hint=option_declared_by)
    server_class = with_options(server_class, options)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if isinstance(address, socket.socket):
        from_socket = getattr(server_class, "from_socket", None)
        if from_socket is None:
            raise UsageError(f"transport {transport!r} cannot serve a passed socket "
                             f"({server_class.__name__} has no from_socket)")
        server = from_socket(address, handler)  # a mismatch names both: exit 2
    else:
        server = server_class(address, handler)
    if args.check_config:
        try:
            print(f"sockserve: configuration OK: {base.__name__} on {_show(server.server_address)} "
                  f"with {handler.__module__}.{handler.__qualname__}; limits: {_limits(server)}",
                  file=sys.stderr, flush=True)
        finally:
            server.server_close()
        return 0
    # The stop handler stays installed until server_close() (the drain) has returned.
    stopping: list[int] = []
    installer = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() != installer:
            # A forked child (forking strategy) inherited this handler: it is not the
            # command line, so the signal does what it would have done.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if stopping:  # a second signal: stop waiting for in-flight requests
            print("sockserve: second signal; not waiting for in-flight requests",
                  file=sys.stderr, flush=True)
            server.end_drain()
            return
        stopping.append(signum)
        server.shutdown()  # from the serving thread: returns at once, the loop ends

    def reload(signum: int, frame: Any) -> None:
        if os.getpid() != installer:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        # Off the signal handler: reading files and building contexts may take a while
        # and must not run inside whatever the serving thread was doing.
        threading.Thread(target=_reload, args=(server,), name="sockserve-reload", daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
    try:
        print(
            f"sockserve: {base.__name__} serving on {_show(server.server_address)} "
            f"with {handler.__module__}.{handler.__qualname__}; Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        print(f"sockserve: limits: {_limits(server)}", file=sys.stderr, flush=True)
        server.serve_forever(SERVE_POLL_INTERVAL)
    finally:
        try:
            # Most strategies drain here, not in serve_forever: a second signal during
            # the drain must still reach stop() and end it.
            server.server_close()
        finally:
            for sig, handler_before in previous.items():
                signal.signal(sig, handler_before)
    print("sockserve: stopped", file=sys.stderr, flush=True)
    return 0


def _limits(server: Any) -> str:
    """The limits in force, and how many connections run at once, for the startup line."""
    shown = []
    for name in ("first_byte_timeout", "idle_timeout", "request_timeout", "drain_timeout"):
        value = getattr(server, name, None)
        shown.append(f"{name}={'none' if value is None else f'{value:g}s'}")
    for name in ("max_connections", "max_connections_per_ip"):
        value = getattr(server, name, None)
        shown.append(f"{name}={'none' if value is None else value}")
    capacity = _capacity(server)
    if capacity:
        shown.append(capacity)
    return " ".join(shown)


def _capacity(server: Any) -> str:
    """How many handlers run at once, where a strategy bounds it: a keep-alive client
    holds one for as long as it stays connected, so more of them than this wait."""
    workers = getattr(server, "workers", None)
    inner = getattr(server, "inner", None)
    threads = getattr(server, "threads", None)
    if workers is not None and inner is not None:  # prefork
        if threads is not None:
            return f"(at most {workers}x{threads} handlers at once: keep-alive clients beyond that wait)"
        if inner == "sync":
            return (f"(at most {workers} handlers at once, one per worker: keep-alive clients "
                    "beyond that wait; -o inner=threadpool for more)")
        return ""
    if threads is not None:
        return f"(at most {threads} handlers at once: keep-alive clients beyond that wait)"
    return ""


def _reload(server: Any) -> None:
    try:
        done = server.reload()
    except Exception:  # a layer that raises instead of keeping its old state
        log.exception("sockserve: reload failed; serving on with what was loaded before")
        return
    if done is False:
        log.error("sockserve: reload incomplete: kept what was loaded before where new "
                  "files were bad (see above)")
    else:
        log.info("sockserve: reloaded")


def _show(address: Any) -> str:
    if isinstance(address, tuple):
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in str(host) else f"{host}:{address[1]}"
    return f"unix:{address!r}" if isinstance(address, bytes) or "\0" in str(address) else f"unix:{address}"


def _plugins(out: Any = None) -> int:
    out = out or sys.stdout
    with warnings.catch_warnings():
        # Printed below with the listing: one message per clash, not a warning as well.
        warnings.simplefilter("ignore", PluginClashWarning)
        for kind in registry.kinds():
            registry.names(kind.name)  # discover first: clashes are found by discovery
    for message in registry.clashes:
        print(f"warning: {message}", file=out)
    rows = []
    for kind in registry.kinds():
        for name in registry.names(kind.name):
            info = registry.info(kind.name, name)
            dist = info.describe_distribution() or "(built-in, no installed metadata)"
            description = ""
            try:
                plugin = registry.load(kind.name, name)
                status = ""
                description = getattr(plugin, "description", None) or ""
            except PluginLoadError as exc:
                status = f"  [FAILED: {type(exc.cause).__name__}: {exc.cause}]"
            rows.append((kind.name, name, dist, info.value + status, description))
    name_width = max((len(r[1]) for r in rows), default=0)
    dist_width = max((len(r[2]) for r in rows), default=0)
    for kind in registry.kinds():
        print(f"{kind.title} ({kind.group}):", file=out)
        mine = [r for r in rows if r[0] == kind.name]
        if not mine:
            print("  (none installed)", file=out)
        for _, name, dist, value, description in mine:
            print(f"  {name:<{name_width}}  {dist:<{dist_width}}  {value}", file=out)
            if isinstance(description, str) and description:
                print(f"  {'':<{name_width}}  {description}", file=out)
    return 0


def _worker_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} workers: at least 1")
    return value


def _environment_args(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``serve``'s flags from ``SOCKSERVE_<FLAG>`` variables (``SOCKSERVE_TLS_CERT``,
    ``SOCKSERVE_WORKERS``...), for those the command line does not give: it wins.
    Repeatable flags take several values separated by spaces (``SOCKSERVE_OPTION=
    "threads=8 drain_timeout=5"``). A bad value is a usage error naming the variable."""
    serve = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = serve.choices["serve"]
    given = set()
    for token in argv:
        given.add(token.partition("=")[0])
    extra: list[str] = []
    by_variable: list[tuple[str, list[str]]] = []
    for action in sub._actions:
        longs = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
        if not longs:
            continue
        name = "SOCKSERVE_" + longs[0][2:].upper().replace("-", "_")
        value = os.environ.get(name)
        if value is None or given & set(action.option_strings):
            continue
        if action.nargs == 0:  # a switch: 1/true/yes/on
            if value.strip().lower() in ("1", "true", "yes", "on"):
                extra.append(longs[0])
            elif value.strip().lower() not in ("0", "false", "no", "off", ""):
                raise UsageError(f"environment variable {name}={value!r}: expected 1 or 0")
            continue
        values = value.split() if isinstance(action, argparse._AppendAction) else [value]
        flags = [f"{longs[0]}={one}" for one in values]
        by_variable.append((name, flags))
        extra.extend(flags)
    if by_variable:  # each checked alone, so that an error names its variable
        check = _build_parser()
        for action in check._actions:
            if isinstance(action, argparse._SubParsersAction):
                action.choices["serve"].error = _raise_usage
        for name, flags in by_variable:
            try:
                check.parse_args(["serve", *flags])
            except UsageError as exc:
                raise UsageError(f"environment variable {name}={os.environ[name]!r}: {exc}") from None
    return extra


def _raise_usage(message: str) -> NoReturn:
    raise UsageError(message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        try:
            argv = ["serve", *_environment_args(parser, argv[1:]), *argv[1:]]
        except UsageError as exc:
            print(f"sockserve: error: {exc}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "plugins":
            return _plugins()
    except KeyboardInterrupt:
        print("sockserve: interrupted", file=sys.stderr)
        return 130
    except (SockserveError, OSError) as exc:
        print(f"sockserve: error: {exc}", file=sys.stderr)
        return 2
    parser.print_help()
    return 2
