"""``sockserve serve`` once its arguments are parsed: the server, its life, its exit status.

What belongs here: turning the ADDRESS list into one server (the first address its own
socket, each other one ``add_address`` or, for a passed socket, ``add_listener``), the
class the command line composes (what it turns on that the library leaves off, a fresh
handler import in each forked worker, handler errors to the log file), ``--check-config``,
the startup lines, the signals (stop, second stop, reload, log reopen), the log file, and
the exit status (2 for what is wrong before serving, 1 for an error that ends serving).
Parsing stays in ``_cli`` (flags, variables) and ``_cli_parse`` (address and handler shapes).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, NamedTuple

from ._cli_parse import (
    UsageError,
    load_handler,
    option_declared_by,
    parse_address_token,
    split_targets,
    worker_count,
)
from ._errors import SockserveError
from ._hooks import block_plugins
from ._options import declared_option_names, parse_command_line_options, with_options
from ._registry import registry
from ._server import LISTEN_BACKLOG

log = logging.getLogger("sockserve")

__all__ = ["serve", "ReopenableFileHandler"]

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
#: The format of ``sockserve serve``'s log lines, on stderr or in ``--log-file``.
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class Listen(NamedTuple):
    """One ADDRESS of the command line: to bind, or a passed socket to serve."""

    text: str
    #: The parsed address to bind; None for a passed socket.
    address: Any
    #: The transport the address implies (``unix`` for ``unix:PATH``), or None.
    implied: str | None
    #: The passed socket (``fd://N``, ``systemd``); None for an address to bind.
    sock: socket.socket | None = None


class ReopenableFileHandler(logging.FileHandler):
    """A log file that ``reopen()`` (SIGUSR1) opens anew at its path, for logrotate:
    after the old file was renamed, the next line goes to a new file of the old name."""

    def reopen(self) -> None:
        """Close the file and open it again at its path (any thread; under the handler's
        lock, so that no line is written half to each)."""
        self.acquire()
        try:
            old, self.stream = self.stream, self._open()
            if old is not None:
                old.close()
        finally:
            self.release()


def serve(args: argparse.Namespace) -> int:
    """Run ``sockserve serve`` with parsed *args*; return the exit status.

    :raises UsageError: (exit 2) a bad address, handler, option or socket; nothing is
        left bound or running.
    """
    log_handler = _configure_logging(args)
    addresses, handler_spec = split_targets(args.targets)
    listens = _parse_listens(addresses)  # all parsed first: a bad one binds nothing
    try:
        listens = _adopt(listens)
        handler, fresh = _load_handler_fresh(handler_spec)
        server, shown, base, names = _build(args, listens, handler, handler_spec, fresh,
                                            log_handler is not None)
    except BaseException:
        for listen in listens:
            if listen.sock is not None:
                listen.sock.close()  # closing a socket a server owns already does nothing
        raise
    described = f"{handler.__module__}.{handler.__qualname__}"
    if args.check_config:
        try:
            _say(log_handler, f"sockserve: configuration OK: {base.__name__} on {', '.join(shown)} "
                 f"with {described}; limits: {_limits(server)}")
        finally:
            server.server_close()
        return 0
    return _run(server, base, shown, described, names, log_handler)


def _parse_listens(addresses: list[str]) -> list[Listen]:
    from ..transports._systemd import is_activation_address
    listens = []
    for text in addresses:
        if is_activation_address(text):
            listens.append(Listen(text, None, None))
        else:
            listens.append(Listen(text, *parse_address_token(text)))
    return listens


def _adopt(listens: list[Listen]) -> list[Listen]:
    """The passed sockets of ``fd://N``, ``systemd`` and ``systemd:NAME``: ``systemd``
    stands for every socket passed (several, one Listen each)."""
    from ..transports._systemd import adopt, adopt_all, is_activation_address

    out: list[Listen] = []
    try:
        for listen in listens:
            if not is_activation_address(listen.text):
                out.append(listen)
            elif listen.text == "systemd":
                out.extend(Listen(listen.text, None, None, sock) for sock in adopt_all("systemd"))
            else:
                out.append(Listen(listen.text, None, None, adopt(listen.text)))
    except BaseException:
        for done in out:
            if done.sock is not None:
                done.sock.close()
        raise
    return out


def _load_handler_fresh(spec: str) -> tuple[type, tuple[str, ...]]:
    """Import the handler; return it with the modules that import added of its own
    top-level package (what a worker imports anew: ``_FreshHandlerImport``)."""
    before = set(sys.modules)
    handler = load_handler(spec)
    module = spec.partition(":")[0]
    top = module.partition(".")[0]
    if top == "sockserve":
        return handler, ()  # the demo handler: the library is not imported anew
    added = {name for name in set(sys.modules) - before
             if name == top or name.startswith(top + ".")}
    return handler, tuple(sorted(added | {module}))


class _FreshHandlerImport:
    """Each worker of a strategy that forks its workers once (prefork) imports the
    handler module anew after the fork, so that the workers a reload (SIGHUP) forks run
    the handler code on disk now, as gunicorn's workers do without ``--preload``.

    The parent imported it at start (a bad handler is an error at once, exit 2). A worker
    whose import fails raises from ``after_fork``: it fails at start-up, before serving.
    Only once per worker: a process forked by the worker (an inner ``forking`` strategy)
    keeps the worker's.
    """

    #: (HANDLER as given, the modules to drop from sys.modules before importing it).
    cli_handler: tuple[str, tuple[str, ...]] = ("", ())

    def after_fork(self) -> None:
        super().after_fork()  # type: ignore[misc]
        if self.__dict__.get("_cli_fresh_import"):
            return
        self.__dict__["_cli_fresh_import"] = True
        spec, modules = self.cli_handler
        for name in modules:
            sys.modules.pop(name, None)
        importlib.invalidate_caches()
        self.RequestHandlerClass = load_handler(spec)


class _LogHandlerErrors:
    """With ``--log-file``: a handler's traceback goes to the log, not to stderr."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.error("%s: exception while processing a request from %s",
                  type(self).__name__, client_address, exc_info=True)


def _forks_workers(server_class: type) -> bool:
    """Workers forked once, each serving many requests: prefork, or a third party's
    built the same way (a ``workers`` option and a ``worker_id``)."""
    return "workers" in declared_option_names(server_class) and hasattr(server_class, "worker_id")


def _build(args: argparse.Namespace, listens: list[Listen], handler: type, spec: str,
           fresh: tuple[str, ...], log_file: bool) -> tuple[Any, list[str], type, dict[str, str]]:
    """Compose the class, make the server on the first address and add the others.

    :returns: the server, every bound address as shown, the composed class, and the
        names the startup lines show (transport, strategy, layers, plugins).
    """
    from ..transports._systemd import transport_for
    from ..transports._tls import tls_options_from_flags  # ssl only when serving
    first = listens[0]
    implied = transport_for(first.sock) if first.sock is not None else first.implied
    transport = args.transport or implied or "tcp"
    if os.environ.get("NOTIFY_SOCKET") and not {"systemd", "no:systemd"} & set(args.plugin):
        args.plugin.append("systemd")  # sd_notify READY / STOPPING / WATCHDOG under systemd
    # Blocked before the manager auto-loads, so that (as with SOCKSERVE_BLOCK_PLUGINS) a
    # blocked plugin is not even imported.
    block_plugins(name[3:] for name in args.plugin if name.startswith("no:"))
    plugin_names = [name for name in args.plugin if not name.startswith("no:")]
    plugins = [registry.load("plugin", name) for name in plugin_names]
    # --metrics / --statsd: a stats plugin of its own (instead of --plugin stats), its side
    # listener bound now: a busy address is an error (exit 2) before anything is served.
    from ..plugins._stats import stats_from_flags

    stats = stats_from_flags(args.metrics, args.statsd)
    if stats is not None:
        plugins = [p for p, n in zip(plugins, plugin_names) if n != "stats"] + [stats]
        plugin_names = [n for n in plugin_names if n != "stats"] + ["stats"]
    try:
        # An inner strategy (prefork's ``inner``) is composed in, so that its options exist.
        inner = [text.partition("=")[2].strip() for text in args.option
                 if text.partition("=")[0].strip() == "inner"]
        # --tls-cert and friends (the standard http.server's flags) add the tls layer, last:
        # after --layer proxy, say, so that the PROXY header is read in clear first.
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
        if len(listens) > 1 and "ipv6_only" in declared_option_names(base):
            # Each address serves what it names: [::]:P beside 0.0.0.0:P must not claim the
            # IPv4 port too (the system default on Linux), or the second bind fails.
            settings["ipv6_only"] = True
        server_class = with_options(base, settings)
        option_texts = list(args.option)
        if args.workers is not None:
            option_texts.insert(0, f"workers={args.workers}")  # an explicit -o workers= wins
        elif os.environ.get("WEB_CONCURRENCY") and "workers" in declared_option_names(server_class):
            try:
                option_texts.insert(0, f"workers={worker_count(os.environ['WEB_CONCURRENCY'])}")
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"WEB_CONCURRENCY: {exc}") from None
        options = parse_command_line_options(server_class, option_texts, unknown_hint=option_declared_by)
        server_class = with_options(server_class, options)
        if len(listens) > 1 and getattr(server_class, "reuse_port", False):
            raise UsageError("reuse_port binds one socket per worker for one address; with several "
                             "addresses turn it off (the workers share every socket)")
        extra: dict[str, Any] = {}
        if _forks_workers(server_class):
            extra["cli_handler"] = (spec, fresh)
        mixins = ((_FreshHandlerImport,) if extra else ()) + ((_LogHandlerErrors,) if log_file else ())
        if mixins:
            # Named as the composed class: the startup line and the tests read that name.
            extra.update(__module__=server_class.__module__, __qualname__=server_class.__qualname__)
            server_class = type(server_class.__name__, (*mixins, server_class), extra)
        server = _first_server(server_class, transport, first, handler)
        shown = [_show(server.server_address)]
        try:
            for listen in listens[1:]:
                shown.append(_add(server, listen))
        except BaseException:
            server.server_close()
            raise
        names = {"transport": transport, "concurrency": args.concurrency,
                 "layers": ", ".join(layers) or "none", "plugins": ", ".join(plugin_names)}
        if stats is not None and stats.metrics_address is not None:
            names["metrics"] = f"http://{_show(stats.metrics_address)}/metrics"
        return server, shown, base, names
    except BaseException:
        if stats is not None:
            stats.close()  # nothing left listening when the server cannot be built
        raise


def _first_server(server_class: Any, transport: str, first: Listen, handler: type) -> Any:
    if first.sock is None:
        return server_class(first.address, handler)
    from_socket = getattr(server_class, "from_socket", None)
    if from_socket is None:
        raise UsageError(f"transport {transport!r} cannot serve a passed socket "
                         f"({server_class.__name__} has no from_socket)")
    return from_socket(first.sock, handler)  # a mismatch names both: exit 2


def _add(server: Any, listen: Listen) -> str:
    """Serve one more ADDRESS on *server*; return it as shown (its real port)."""

    try:
        if listen.sock is not None:
            server.add_listener(listen.sock)
            return _show(listen.sock.getsockname())
        add_address = getattr(server, "add_address", None)
        if add_address is None:
            raise UsageError(f"{type(server).__name__} cannot bind several addresses "
                             "(it has no add_address)")
        own_unix = getattr(server, "address_family", None) == getattr(socket, "AF_UNIX", None)
        if listen.implied == "unix" and not own_unix:
            family: str | None = "unix"
        elif listen.implied != "unix" and own_unix:
            family = "inet"
        else:
            family = None
        return _show(add_address(listen.address, family=family))
    except (SockserveError, OSError, TypeError) as exc:
        raise UsageError(f"address {listen.text!r}: {exc}") from exc


def _configure_logging(args: argparse.Namespace) -> ReopenableFileHandler | None:
    """Log to stderr, or with ``--log-file`` to that file (opened before anything is
    bound: a file that cannot be opened is a usage error with nothing to clean up)."""
    level = getattr(logging, args.log_level.upper())
    if not args.log_file:
        logging.basicConfig(level=level, format=LOG_FORMAT)
        return None
    try:
        handler = ReopenableFileHandler(args.log_file, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--log-file {args.log_file!r}: {exc.strerror or exc}") from None
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    return handler


def _say(log_handler: logging.Handler | None, line: str, level: int = logging.INFO) -> None:
    """A line of the command line's own: on stderr, and in the log file if there is one
    (operators look for the startup line there; whoever started the process, on stderr)."""
    print(line, file=sys.stderr, flush=True)
    if log_handler is not None:
        log.log(level, "%s", line.removeprefix("sockserve: "))


def _run(server: Any, base: type, shown: list[str], described: str, names: dict[str, str],
         log_handler: ReopenableFileHandler | None) -> int:
    """Serve until a stop signal (exit 0) or an error that ends serving (exit 1)."""
    # The stop handler stays installed until server_close() (the drain) has returned.
    stopping: list[int] = []
    installer = os.getpid()

    def inherited(signum: int) -> bool:
        """True in a forked child (forking strategy) that inherited the handler: it is not
        the command line, so the signal does what it would have done (sent again)."""
        if os.getpid() == installer:
            return False
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return True

    def stop(signum: int, frame: Any) -> None:
        if inherited(signum):
            return
        if stopping:  # a second signal: stop waiting for in-flight requests
            _say(log_handler, "sockserve: second signal; not waiting for in-flight requests")
            server.end_drain()
            return
        stopping.append(signum)
        server.shutdown()  # from the serving thread: returns at once, the loop ends

    def reload(signum: int, frame: Any) -> None:
        if inherited(signum):
            return
        # Off the signal handler: reading files and building contexts may take a while
        # and must not run inside whatever the serving thread was doing.
        threading.Thread(target=_reload, args=(server,), name="sockserve-reload", daemon=True).start()

    def reopen(signum: int, frame: Any) -> None:
        # In whichever process gets it (a prefork worker inherits this handler): each
        # process holds its own descriptor of the log file. Off the signal handler: the
        # handler's lock may be held by the very line the signal interrupted.
        if log_handler is not None:
            threading.Thread(target=log_handler.reopen, name="sockserve-reopen", daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
    # Always caught: USR1's default action would end a process that has no log file.
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, reopen)
    failure: Exception | None = None
    try:
        also = f"; also on {', '.join(shown[1:])}" if len(shown) > 1 else ""
        _say(log_handler, f"sockserve: {base.__name__} serving on {shown[0]} with {described}"
             f"{also}; Ctrl-C to stop")
        _say(log_handler, f"sockserve: {_setup(server, names)}")
        _say(log_handler, f"sockserve: limits: {_limits(server)}")
        if "metrics" in names:
            _say(log_handler, f"sockserve: metrics on {names['metrics']}")
        try:
            server.serve_forever(SERVE_POLL_INTERVAL)
        except Exception as exc:  # the supervisor gave up (every worker failed), say
            failure = exc
    finally:
        try:
            # Most strategies drain here, not in serve_forever: a second signal during
            # the drain must still reach stop() and end it.
            server.server_close()
        finally:
            for sig, handler_before in previous.items():
                signal.signal(sig, handler_before)
    if failure is not None:
        _say(log_handler, f"sockserve: error: {failure or type(failure).__name__}", logging.ERROR)
        return 1
    _say(log_handler, "sockserve: stopped")
    return 0


def _setup(server: Any, names: dict[str, str]) -> str:
    """Strategy, transport, layers and plugins, for the startup lines."""
    detail = [f"{value} {name if value != 1 else name[:-1]}" for name, value in
              (("workers", getattr(server, "workers", None)),
               ("threads", getattr(server, "threads", None)))
              if isinstance(value, int)]
    inner = getattr(server, "inner", None)
    if isinstance(inner, str) and "workers" in declared_option_names(type(server)):
        detail.append(f"inner {inner}")
    strategy = names["concurrency"] + (f" ({', '.join(detail)})" if detail else "")
    line = f"strategy: {strategy}; transport: {names['transport']}; layers: {names['layers']}"
    return line + (f"; plugins: {names['plugins']}" if names["plugins"] else "")


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
    from ..transports._systemd import notify  # nothing is sent without $NOTIFY_SOCKET

    # systemd's Type=notify-reload protocol: RELOADING=1 with the monotonic time, then
    # READY=1 once done (also when it failed: the old state keeps serving).
    notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
    try:
        done = server.reload()
    except Exception:  # a layer that raises instead of keeping its old state
        log.exception("sockserve: reload failed; serving on with what was loaded before")
        return
    finally:
        notify("READY=1")
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
