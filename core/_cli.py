"""The command line: ``sockserve serve``, ``sockserve plugins``, ``sockserve --version``.

What belongs here: the parser (flags, ``SOCKSERVE_<FLAG>`` variables), the ``plugins``
listing, and ``main``. The shapes of the arguments (ADDRESS, HANDLER, worker count) are
``_cli_parse``; what ``sockserve serve`` does once parsed (the server on every address,
what it turns on that the library leaves off, the signals, the startup lines, the log
file, the exit status) is ``_cli_serve``. The library pieces they call stay where they
are: options in ``_options``, activation in ``transports/_systemd``, TLS flags in
``transports/_tls``.
"""

from __future__ import annotations

import argparse
import difflib
import os
import platform
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

from ._cli_parse import (
    ADDRESS_SHAPES,
    DEFAULT_ADDRESS,
    UsageError,
    parse_address,
    split_targets,
    worker_count,
)
from ._cli_serve import SERVE_BACKLOG, serve
from ._errors import PluginClashWarning, PluginLoadError, SockserveError
from ._hooks import AUTOLOAD_ENV, BLOCK_ENV
from ._registry import registry

__all__ = ["main", "parse_address", "split_targets", "UsageError", "SERVE_BACKLOG"]


def _build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="sockserve", description="Serve requests with sockserve, or list its plugins."
    )
    parser.add_argument("--version", action="version",
                        version=f"sockserve {__version__} (Python {platform.python_version()})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run a server (default: the upper-casing echo demo)",
                                usage="sockserve serve [ADDRESS]... [HANDLER] [options]")
    serve.add_argument("targets", nargs="*", metavar="ADDRESS... [HANDLER]",
                       help=f"ADDRESS: {ADDRESS_SHAPES}, or a passed socket: fd://N, systemd "
                       f"(every socket passed) or systemd:NAME (default {DEFAULT_ADDRESS}); "
                       "several are served by one server (the same workers). HANDLER, "
                       "last: the request handler as module:Class, the class name "
                       "capitalised (default: upper-casing echo)")
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
    serve.add_argument("--workers", "-w", type=worker_count, metavar="N",
                       help="worker processes (prefork and others that declare workers; "
                       "default $WEB_CONCURRENCY when set)")
    serve.add_argument("--log-level", default="info", type=str.lower,
                       choices=["debug", "info", "warning", "error", "critical"],
                       help="lowest level logged (default info)")
    serve.add_argument("--log-file", metavar="PATH",
                       help="log to this file instead of stderr (the startup lines too, "
                       "also on stderr); SIGUSR1 reopens it, for logrotate")
    serve.add_argument("--check-config", action="store_true",
                       help="build the server (classes, options, TLS contexts, the bound "
                       "socket) and exit 0, or 2 with the error, without serving")
    serve.add_argument("--tls-cert", metavar="FILE",
                       help="serve TLS with this PEM certificate chain (adds --layer tls)")
    serve.add_argument("--tls-key", metavar="FILE",
                       help="the private key of --tls-cert (default: in the --tls-cert file)")
    serve.add_argument("--tls-password-file", metavar="FILE",
                       help="a file whose first line is the password of the key")
    serve.add_argument("--metrics", metavar="HOST:PORT",
                       help="serve Prometheus metrics (GET /metrics) on this address, bound "
                       "before serving; the stats plugin, served by the supervisor under prefork")
    serve.add_argument("--statsd", metavar="HOST:PORT",
                       help="also send the stats plugin's metrics to this statsd server (UDP)")
    commands.add_parser("plugins", help="list installed plugins with their distributions")
    return parser


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


#: What every variable of the command line starts with.
PREFIX = "SOCKSERVE_"


def _environment_args(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``serve``'s flags from ``SOCKSERVE_<FLAG>`` variables (``SOCKSERVE_TLS_CERT``,
    ``SOCKSERVE_WORKERS``...), for those the command line does not give: it wins.
    Repeatable flags take several values separated by spaces (``SOCKSERVE_OPTION=
    "threads=8 drain_timeout=5"``). A bad value is a usage error naming the variable, and
    so is a ``SOCKSERVE_*`` variable that is no setting: a misspelt ``SOCKSERVE_WORKRS=8``
    would otherwise leave a container serving with the default, unnoticed."""
    serve = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = serve.choices["serve"]
    given = set()
    for token in argv:
        given.add(token.partition("=")[0])
    extra: list[str] = []
    by_variable: list[tuple[str, list[str]]] = []
    settings: dict[str, tuple[argparse.Action, str]] = {}  # variable -> (flag, its long option)
    for action in sub._actions:
        long = next((o for o in action.option_strings if o.startswith("--") and o != "--help"), None)
        if long is not None:
            settings[PREFIX + long[2:].upper().replace("-", "_")] = (action, long)
    _refuse_unknown_variables(settings)
    for name, (action, long) in settings.items():
        value = os.environ.get(name)
        if value is None or given & set(action.option_strings):
            continue
        if action.nargs == 0:  # a switch: 1/true/yes/on
            if value.strip().lower() in ("1", "true", "yes", "on"):
                extra.append(long)
            elif value.strip().lower() not in ("0", "false", "no", "off", ""):
                raise UsageError(f"environment variable {name}={value!r}: expected 1 or 0")
            continue
        values = value.split() if isinstance(action, argparse._AppendAction) else [value]
        flags = [f"{long}={one}" for one in values]
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


def _refuse_unknown_variables(settings: Iterable[str]) -> None:
    """A usage error for a ``SOCKSERVE_*`` variable that is neither a flag's nor the library's."""
    known = {*settings, AUTOLOAD_ENV, BLOCK_ENV}
    unknown = sorted(k for k in os.environ if k.startswith(PREFIX) and k not in known)
    if not unknown:
        return
    name = unknown[0]
    suffixes = {k.removeprefix(PREFIX): k for k in known}
    close = difflib.get_close_matches(name.removeprefix(PREFIX), sorted(suffixes), n=1, cutoff=0.75)
    if close:
        hint = f" (did you mean {suffixes[close[0]]}?)"
    else:  # SOCKSERVE_THREADS=8 is most likely an option
        option = name.removeprefix(PREFIX).lower()
        hint = f" (an option goes in SOCKSERVE_OPTION: SOCKSERVE_OPTION='{option}=...')"
    raise UsageError(
        f"environment variable {name} is not a sockserve setting{hint}; the settings are "
        f"SOCKSERVE_<FLAG> for each flag of 'sockserve serve --help', {AUTOLOAD_ENV} and {BLOCK_ENV}"
    )


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
            return serve(args)
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
