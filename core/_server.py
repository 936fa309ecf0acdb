"""BaseServer: the request lifecycle shared by every transport and concurrency strategy.

What belongs here: the serve loop, shutdown, the request path (get -> verify -> process ->
prepare -> finish -> shut down) and error handling, as the standard ``socketserver``
documents them, the places where lifecycle hooks fire, and the strategy contract
(DESIGN.md section 7: ``shutdown_requested``, ``pause_accepting``, ``in_flight``,
``cut_off``, ``after_fork``, ``call_hook``, ...) that concurrency strategies and layers are
written against, with the waiting room's hand-over (``when_readable``) and the limits'
bookkeeping on the request path (``first_byte_timeout``, ``idle_timeout``,
``request_timeout``, ``max_connections``, ``max_connections_per_ip``). The per-process
serving state lives in ``_state.py``, the waiting room in ``_waiting.py``, the request
deadline watcher and the connection counts in ``_limits.py``; sockets, addresses and
families in ``transports/``; threads and processes in ``concurrency/``.

It is one module of more than 400 lines because the documented lifecycle is one class:
splitting ``BaseServer`` across modules would split the path every request takes.
"""

from __future__ import annotations

import collections
import functools
import logging
import select
import selectors
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs

from ._errors import DatagramTruncatedError, LayerError
from ._hooks import HookRelay, call_hook, relay_for
from ._limits import Limits, client_host
from ._options import check_options, count, declare_options, seconds, settle_options
from ._state import (
    ACCEPT_BACKOFF_MAX,
    ACCEPT_BACKOFF_MIN,
    READ,
    RESOURCE_ERRNOS,
    Poller,
    ServingState,
    poll_timeout,
)

__all__ = ["BaseServer", "POLL_INTERVAL", "LISTEN_BACKLOG", "FIRST_BYTE_TIMEOUT"]

log = logging.getLogger("sockserve")

#: serve_forever's documented default: how often the loop turns (service_actions) when idle.
#: Shutdown does not wait for it; a wake-up socket interrupts the wait at once.
POLL_INTERVAL = 0.5

#: The listen() backlog of sockserve's own strategies (threadpool, prefork) and of
#: ``sockserve serve``: the most the system allows (the kernel caps it at
#: net.core.somaxconn). The documented 5 drops connections under any burst: with 8
#: clients connecting at once, a dropped SYN costs a 1 s retransmission
#: (benchmarks/THROUGHPUT.md).
LISTEN_BACKLOG = socket.SOMAXCONN
#: first_byte_timeout of the strategies that wait for readability (threadpool, prefork):
#: long enough for a slow network, short enough that silent clients do not pile up.
FIRST_BYTE_TIMEOUT = 10.0
#: The options that make run_request count and time requests (None: off).
LIMITS = ("idle_timeout", "request_timeout", "max_connections", "max_connections_per_ip")
#: recv() flags of when_readable's look at a new connection: peek, never wait.
#: Plain ints: operators on the IntFlag members run Python code on every connection.
_PEEK_NOW = int(socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0))
_CAN_PEEK_NOW = _PEEK_NOW != int(socket.MSG_PEEK)

# poll() has no descriptor limit; select() is the fallback, as in the standard module.
if hasattr(selectors, "PollSelector"):
    _ServerSelector: type[selectors.BaseSelector] = selectors.PollSelector
else:  # pragma: no cover - Windows
    _ServerSelector = selectors.SelectSelector


@attrs.define
class ServerOptions:
    """Options of every server (see ``BaseServer``)."""

    #: Seconds handle_request() waits for a request; None waits forever.
    timeout: float | None = seconds(default=None)
    #: Seconds shutdown()/server_close() wait for in-flight requests before they are cut
    #: off (their connections shut down, logged and counted in ``requests_cut_off``).
    #: None waits as long as they take, which is the standard module's behaviour.
    drain_timeout: float | None = seconds(default=None)
    #: Seconds an accepted connection may wait for its first byte in the serve loop
    #: before it is closed (denied, ``first-byte``), for strategies that hand connections
    #: over only once readable (``when_readable``: threadpool and prefork, which set 10).
    #: None waits as long as the client takes, holding a descriptor, not a thread; 0
    #: hands every connection over at once (no waiting room: the worker waits instead).
    first_byte_timeout: float | None = seconds(default=None)
    #: Seconds each read of a connection may wait (the socket timeout, the standard
    #: ``StreamRequestHandler.timeout`` semantics); a read that times out ends the
    #: request in one log line (``requests_timed_out["idle"]``). None: no limit.
    idle_timeout: float | None = seconds(default=None)
    #: Seconds a request's handler may run; then its connection is shut down so that a
    #: blocked read returns (``requests_timed_out["request"]``). None: no limit.
    request_timeout: float | None = seconds(default=None)
    #: Stream connections this process holds at most (waiting, queued and running): at
    #: the limit it pauses accepting and the listen backlog holds the rest; none is
    #: refused. None: no limit. Under forking, max_children is the limit.
    max_connections: int | None = count(1, optional=True, default=None)
    #: Connections running at once from one client host (the PROXY-protocol client when
    #: that layer is on), in this process; more are denied (``per-ip``). None: no limit.
    max_connections_per_ip: int | None = count(1, optional=True, default=None)


def _closing(close: Callable[[Any], None]) -> Callable[[Any], None]:
    """Wrap a class's ``server_close`` so that the close hooks fire around the outermost one.

    ``sockserve_server_close`` fires when the outermost ``server_close`` starts and
    ``sockserve_server_closed`` after it returned (after every mixin's drain), once per
    server and only in the process that created it.
    """

    @functools.wraps(close)
    def server_close(self: BaseServer) -> None:
        state: ServingState | None = self.__dict__.get("_sockserve_state")
        if state is None:  # BaseServer.__init__ has not run
            close(self)
            return
        depth = state.close_depth
        outer = depth == 0 and not state.closed and state.is_owner
        if outer:
            state.closed = True
            self.call_hook("server_close")
        state.close_depth = depth + 1
        try:
            if depth == 0 and state.waiting:
                self._sockserve_settle_waiting()
            close(self)
        finally:
            state.close_depth = depth
            if depth == 0:
                self.close_listeners()  # a server_close that closed none (not a TCPServer)
                if state.limits is not None:
                    state.limits.deadlines.stop()  # after the drain, which may need it
            if outer:
                self.call_hook("server_closed")

    server_close.__sockserve_closing__ = True  # type: ignore[attr-defined]
    return server_close


def _drain_end(server: BaseServer) -> str:
    if server.drain_ended:
        return "drain ended early"
    return f"drain deadline of {server.drain_timeout}s passed"


@declare_options(ServerOptions)
class BaseServer:
    """Base class of all servers: the lifecycle without any socket specifics.

    Subclasses supply ``fileno``, ``get_request``, ``server_bind`` and friends; this class
    runs the loop. Behaviour beyond the standard module, all compatible with it:

    - ``shutdown()`` wakes the loop at once instead of waiting for the next poll, may be
      called twice, before ``serve_forever`` (which then returns at once) and from the
      serving thread (the loop stops after the current request).
    - accept() failing for lack of descriptors or memory backs off and logs once per burst.
    - ``prepare_request`` runs the per-connection layers in the worker (DESIGN.md
      section 6); every strategy runs its requests through ``run_request``.
    - lifecycle plugins (``sockserve.hookimpl``) are called at the points listed in
      ``sockserve.core.hookspecs``.
    """

    # Options (ServerOptions declares them and their defaults).
    timeout: float | None
    drain_timeout: float | None
    first_byte_timeout: float | None
    idle_timeout: float | None
    request_timeout: float | None
    max_connections: int | None
    max_connections_per_ip: int | None
    #: Lifecycle plugins that apply to this class only (set by ``compose(plugins=...)``).
    _sockserve_plugins: tuple[object, ...] = ()
    #: prepare_request is overridden (a layer is present): run_request calls it.
    _sockserve_layered = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        settle_options(cls)
        cls._sockserve_layered = cls.prepare_request is not BaseServer.prepare_request
        close = cls.server_close
        if not getattr(close, "__sockserve_closing__", False):
            setattr(cls, "server_close", _closing(close))  # noqa: B010 - a method replaced

    if TYPE_CHECKING:
        # Supplied by the transport (``TCPServer``), not here: the standard module's
        # BaseServer has neither, and neither does this one at run time.
        def fileno(self) -> int: ...
        def get_request(self) -> tuple[Any, Any]: ...

    def __init__(self, server_address: Any, RequestHandlerClass: Any) -> None:
        """Store the address and handler class; subclasses create and bind the socket.

        :raises OptionError: a required option is not set, or a check across options fails
            (before anything is bound).
        """
        check_options(self)
        self.server_address = server_address
        self.RequestHandlerClass = RequestHandlerClass
        #: Requests cut off when the drain deadline passed.
        self.requests_cut_off = 0
        #: Requests refused after they were accepted, by reason (``verify_request``,
        #: a layer's reason such as ``timeout``, ``closing`` for those dropped unrun).
        self.requests_denied: collections.Counter[str] = collections.Counter()
        #: Requests ended by a limit: ``idle`` (idle_timeout), ``request`` (request_timeout).
        self.requests_timed_out: collections.Counter[str] = collections.Counter()
        #: Times a limit was reached: ``max_connections`` (accepting paused).
        self.limits_reached: collections.Counter[str] = collections.Counter()
        #: A limit option is set: run_request and the accept path do their bookkeeping.
        self._sockserve_limited = any(getattr(self, name) is not None for name in LIMITS)
        self._sockserve_hooks: HookRelay = relay_for(type(self))
        self._sockserve_state = ServingState()
        #: fd -> the listening sockets add_listener() added (not the server's own socket).
        #: On the server, not in the serving state: a forked worker serves them too.
        self._sockserve_listeners: dict[int, socket.socket] = {}

    def server_activate(self) -> None:
        """Called by the constructor to activate the server; may be overridden."""

    # ------------------------------------------------------------------ serving

    def serve_forever(self, poll_interval: float = POLL_INTERVAL) -> None:
        """Handle one request at a time until ``shutdown()``.

        Polls for shutdown every *poll_interval* seconds and calls ``service_actions``
        on every turn; ``shutdown()`` interrupts the wait at once. If ``shutdown()`` was
        called before, returns at once without accepting anything.
        """
        state = self._sockserve_state
        with state.lock:
            if state.shutdown_request:
                state.shutdown_request = False
                return
            state.is_shut_down.clear()
            state.serving_thread = threading.get_ident()
            wake_r = state.open_wake()
        hooks = self._sockserve_hooks
        try:
            if hooks.serve_start is not None:
                call_hook(self, hooks.serve_start)
            self._sockserve_loop(state, wake_r, poll_interval)
        finally:
            with state.lock:
                state.close_wake()
                state.shutdown_request = False
                state.serving_thread = None
            try:
                if hooks.serve_stop is not None:
                    call_hook(self, hooks.serve_stop)
            finally:
                state.is_shut_down.set()

    def _sockserve_loop(
        self, state: ServingState, wake_r: socket.socket, poll_interval: float | None
    ) -> None:
        """Accept and handle requests until shutdown is asked for.

        Each ready descriptor is dispatched on its own: the wake-up socket is only read,
        the listening sockets are accepted from only while accepting is not paused. The
        server's own socket is compared first; the sockets of ``add_listener`` are looked
        up only for a descriptor that is neither it nor the wake-up socket, so that a
        server with one socket pays nothing for them.
        """
        hooks = self._sockserve_hooks
        # A raw poll object, not the selectors wrapper the standard module uses:
        # selectors builds key objects and lists in Python on every call, which
        # costs more per request than everything sockserve adds (bench_stdlib.py).
        poller = Poller()
        wake_fd = wake_r.fileno()
        poller.register(wake_fd, READ)
        listen_fd = self.fileno()
        extra = self._sockserve_listeners
        polled = False
        timeout = poll_timeout(poll_interval)
        room = state.waiting
        room.new[:] = room.entries  # connections left waiting by an earlier serve_forever
        # The room's lists are changed in place, never replaced: locals stay true.
        waiting_new, deadlines = room.new, room.deadlines
        # Locals save attribute lookups on every turn of the loop.
        poll = poller.poll
        handle = self._handle_request_noblock
        service_actions = self.service_actions
        while not state.shutdown_request:
            if state.accepting is not polled:
                polled = state.accepting
                if polled:
                    poller.register(listen_fd, READ)
                    for fd in extra:
                        poller.register(fd, READ)
                else:
                    poller.unregister(listen_fd)
                    for fd in extra:
                        poller.unregister(fd)
            if waiting_new:
                for fd in waiting_new:
                    poller.register(fd, READ)
                waiting_new.clear()
            ready = poll(room.poll_timeout(timeout) if deadlines else timeout)
            # bpo-35017: shutdown() may have been called during poll().
            if state.shutdown_request:
                break
            for fd, _ in ready:
                if fd == listen_fd:
                    if state.accepting:
                        handle()
                elif fd == wake_fd:
                    state.drain_wake()
                else:
                    self._sockserve_readable(poller, fd)
            if deadlines:
                self._sockserve_expire(poller)
            service_actions()
            if hooks.service_actions is not None:
                call_hook(self, hooks.service_actions)

    def _sockserve_readable(self, poller: Any, fd: int) -> None:
        """A waiting connection became readable: hand it over as its strategy asked.
        Or *fd* is a socket of ``add_listener``: accept from it."""
        state = self._sockserve_state
        waiting = state.waiting.take(fd)
        if waiting is None:
            listener = self._sockserve_listeners.get(fd)
            if listener is not None:
                if state.accepting:
                    self._handle_request_noblock(listener)
                return
            poller.unregister(fd)
            return
        poller.unregister(fd)
        self._sockserve_hand_over(waiting.then, waiting.request, waiting.client_address)

    def _sockserve_hand_over(self, then: Any, request: Any, client_address: Any) -> None:
        state = self._sockserve_state
        state.sync_ran = False
        try:
            then(request, client_address)
        except Exception:
            self._sockserve_handle_error(request, client_address)
            if not state.sync_ran:
                self.deny_request(request, client_address, "process_request")

    def _sockserve_settle_waiting(self) -> None:
        """At close: hand over the waiting connections that become readable before their
        first-byte deadline and the drain deadline; deny the rest (``closing``).

        They were admitted: a client that connected just before the stop and sends its
        request a moment later is served, as a request in flight is.
        """
        state = self._sockserve_state
        room = state.waiting
        poller = Poller()
        for fd in room.entries:
            poller.register(fd, READ)
        room.new.clear()
        end = None if self.drain_timeout is None else time.monotonic() + self.drain_timeout
        while room.entries and not state.drain_end.is_set():
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                break
            step = 0.1 if left is None else min(0.1, left)
            for fd, _ in poller.poll(room.poll_timeout(poll_timeout(step))):
                self._sockserve_readable(poller, fd)
            self._sockserve_expire(poller)
            if not room.deadlines and end is None and room.entries:
                break  # no deadline at all: nothing would end the wait
        for waiting in room.take_all():
            self.deny_request(waiting.request, waiting.client_address, "closing")

    def _sockserve_expire(self, poller: Any) -> None:
        for fd, waiting in self._sockserve_state.waiting.expired():
            try:
                poller.unregister(fd)
            except KeyError:  # added this turn, not registered yet
                pass
            self.deny_request(waiting.request, waiting.client_address, "first-byte")

    def shutdown(self) -> None:
        """Stop the ``serve_forever`` loop and wait until it has stopped.

        Wakes the loop at once (no wait for ``poll_interval``). Safe to call more than once
        and before serving. Called from the serving thread itself (a handler of a sync
        server), it returns at once and the loop stops after the current request.
        In-flight requests of concurrent strategies are not waited for here; that is
        ``server_close()``'s job (``block_on_close``).
        """
        state = self._sockserve_state
        with state.lock:
            state.shutdown_request = True
            state.wake()
            if state.serving_thread == threading.get_ident():
                return
        drain = self.drain_timeout
        if drain is None or state.is_shut_down.wait(drain):
            state.is_shut_down.wait()
            return
        # A sync request still runs in the serving thread past the drain deadline.
        self.cut_off(self.in_flight)
        state.is_shut_down.wait()

    # ------------------------------------------------------------------ listening sockets

    def add_listener(self, sock: socket.socket) -> None:
        """Serve *sock* too, beside the server's own socket: one server, several addresses.

        *sock* is bound by the caller (``TCPServer.add_address`` binds one the way the
        transport binds its own) and of this server's socket type; its family may differ
        (IPv4, IPv6 and Unix sockets in one server: each connection's ``client_address``
        has the shape of the socket it came in on). A stream socket that does not listen
        yet is made to listen with ``request_queue_size``.

        The serve loop polls it with the server's own socket and accepts from whichever
        is ready; what it accepts takes the same path as any connection (``get_request``
        with ``self.socket`` being *sock* for that call, then verify, limits, the waiting
        room, the layers, the hooks). ``pause_accepting`` pauses every listening socket.
        *sock* is made non-blocking: processes that share it (prefork workers) race for
        each connection, and the loser must get EAGAIN, not block. A forked worker serves
        it as its parent does (``after_fork`` keeps it).

        From here on the server owns *sock*: ``server_close()`` closes it (in each
        process its copy). Call it before ``serve_forever``.

        :raises TypeError: *sock* is not a socket, or not of the server's socket type.
        :raises ValueError: *sock* is the server's own socket, added already, or closed.
        :raises RuntimeError: the server is serving now.
        """
        if not isinstance(sock, socket.socket):
            raise TypeError(f"add_listener() needs a socket.socket, not {type(sock).__name__}")
        socket_type = getattr(self, "socket_type", None)
        if socket_type is not None and int(sock.type) != int(socket_type):
            raise TypeError(f"add_listener(): the socket is {sock.type!r} but "
                            f"{type(self).__name__} serves {socket.SocketKind(socket_type)!r}")
        fd = sock.fileno()
        if fd < 0:
            raise ValueError("add_listener(): the socket is closed")
        own = getattr(self, "socket", None)
        if sock is own or fd in self._sockserve_listeners:
            raise ValueError(f"add_listener(): socket {fd} is served already")
        if self._sockserve_state.serving_thread is not None:
            raise RuntimeError("add_listener() while serve_forever runs: add it before")
        if sock.type == socket.SOCK_STREAM and not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            sock.listen(getattr(self, "request_queue_size", LISTEN_BACKLOG))
        sock.setblocking(False)
        self._sockserve_listeners[fd] = sock

    @property
    def listeners(self) -> tuple[socket.socket, ...]:
        """Every socket this server accepts on: its own (``self.socket``) first, then
        those of ``add_listener``. For code that polls or inspects them (``fileno()``
        names only the first)."""
        own = getattr(self, "socket", None)
        extra = tuple(self._sockserve_listeners.values())
        return extra if own is None else (own, *extra)

    def close_listeners(self) -> None:
        """Close the sockets ``add_listener`` added and forget them (safe to call again).

        ``server_close()`` calls it, after the transport's own close (a transport that
        closes its socket early, as ``TCPServer`` does before the drain, calls it there).
        """
        listeners = self._sockserve_listeners
        while listeners:
            _, sock = listeners.popitem()
            sock.close()

    def _sockserve_accept_on(self, listener: socket.socket) -> tuple[Any, Any]:
        """``get_request()`` on *listener*: ``self.socket`` is it for this call only, so
        that a ``get_request`` of a subclass or strategy (prefork's count, a datagram's
        reply socket) works on every listening socket."""
        own = self.socket  # type: ignore[has-type]
        self.socket = listener
        try:
            return self.get_request()
        finally:
            self.socket = own

    # ------------------------------------------------------------------ strategy contract

    @property
    def shutdown_requested(self) -> bool:
        """``shutdown()`` was asked for and the serve loop has not stopped yet."""
        return self._sockserve_state.shutdown_request

    def pause_accepting(self, reason: str = "strategy") -> None:
        """Stop polling the listening socket; the loop keeps turning (wake-ups,
        ``service_actions``, shutdown). Connections wait in the listen backlog. Any thread.

        Pauses with different *reason* words add up: accepting resumes once every one of
        them was resumed (a full pool and ``max_connections``).
        """
        state = self._sockserve_state
        with state.lock:
            state.paused_by.add(reason)
            state.accepting = False

    def resume_accepting(self, reason: str = "strategy") -> None:
        """End the pause for *reason*; poll the listening socket again when no other
        pause holds (any thread: the loop is woken if needed)."""
        state = self._sockserve_state
        with state.lock:
            state.paused_by.discard(reason)
            if state.accepting or state.paused_by:
                return
            state.accepting = True
        if state.serving_thread != threading.get_ident():
            state.wake()

    def when_readable(
        self, request: Any, client_address: Any, then: Callable[[Any, Any], Any]
    ) -> None:
        """Call ``then(request, client_address)`` once the connection is readable.

        For a strategy's ``process_request`` (serving thread): the connection waits in
        the serve loop's poller, holding a descriptor and no worker, until the client
        sends its first byte or closes; one still silent after ``first_byte_timeout``
        seconds is denied (``first-byte``); at ``server_close()`` those still waiting
        are denied (``closing``). A connection with data already there, and a datagram
        request, go to *then* at once; so do all when ``first_byte_timeout`` is 0.
        """
        if isinstance(request, tuple) or self.first_byte_timeout == 0:
            then(request, client_address)  # 0: no waiting room, the worker waits
            return
        try:
            if _CAN_PEEK_NOW:
                ready = request.recv(1, _PEEK_NOW)
            else:  # pragma: no cover - no MSG_DONTWAIT (Windows)
                ready = b"" if select.select([request], [], [], 0)[0] else None
        except BlockingIOError:
            ready = None
        except OSError:  # reset already: the worker sees the error
            ready = b""
        if ready is not None:
            then(request, client_address)
            return
        state = self._sockserve_state
        state.waiting.add(request, client_address, then, self.first_byte_timeout)
        if state.serving_thread != threading.get_ident():
            state.wake()

    @property
    def waiting(self) -> int:
        """How many accepted connections wait for their first byte (``when_readable``)."""
        return len(self._sockserve_state.waiting)

    @property
    def waited(self) -> int:
        """How many connections have waited for their first byte so far, in this process
        (those not readable when accepted)."""
        return self._sockserve_state.waiting.seq

    @property
    def in_flight(self) -> tuple[Any, ...]:
        """The requests running now in this process, as ``prepare_request`` returned them."""
        return tuple(self._sockserve_state.in_flight.values())

    def cut_off(self, requests: Iterable[Any]) -> int:
        """Shut the connections of *requests* down now, so that their handlers return.

        A datagram request has no connection and is left alone. Only connections that
        were really shut down are counted (``requests_cut_off``) and logged.

        :returns: how many were shut down.
        """
        count = 0
        cut = self._sockserve_state.cut
        for request in requests:
            if isinstance(request, tuple):
                continue  # (data, socket): the socket is the server's
            cut.add(id(request))
            try:
                request.shutdown(socket.SHUT_RDWR)
            except (OSError, AttributeError):
                cut.discard(id(request))
                continue  # closed already, or not a connection
            count += 1
        if count:
            with self._sockserve_state.lock:
                self.requests_cut_off += count
            log.warning(
                "%s: %s; cut off %d in-flight request(s)",
                type(self).__name__,
                _drain_end(self),
                count,
            )
        return count

    def end_drain(self) -> None:
        """Stop waiting for in-flight work: a running drain cuts off what is left now.

        For a second Ctrl-C or SIGTERM; safe from a signal handler and any thread.
        """
        self._sockserve_state.drain_end.set()

    @property
    def drain_ended(self) -> bool:
        """``end_drain()`` was called."""
        return self._sockserve_state.drain_end.is_set()

    def after_fork(self) -> None:
        """In a forked child: give this copy of the server its own serving state.

        The child does not share the parent's wake-up socket, lock, shutdown flag or
        in-flight requests, and is not the owner: its ``server_close()`` fires no close
        hooks and removes nothing the parent created.
        """
        old = self._sockserve_state
        old.close_wake()  # the child's copies; the parent's stay open
        for waiting in old.waiting.take_all():
            waiting.request.close()  # the parent's connection: only the child's copy goes
        self._sockserve_state = ServingState(owner_pid=old.owner_pid)

    def call_hook(self, name: str, **kwargs: Any) -> Any:
        """Call lifecycle hook *name* (``"serve_start"`` or ``"sockserve_serve_start"``).

        For strategies that run their own worker loops. Does nothing when no plugin
        implements the hook; an implementation that raises is reported through
        ``handle_error``.

        :returns: the hook's result, or None.
        """
        short = name[len("sockserve_"):] if name.startswith("sockserve_") else name
        try:
            caller = getattr(self._sockserve_hooks, short)
        except AttributeError:
            raise AttributeError(f"no sockserve hook named {name!r}") from None
        if caller is None:
            return None
        return call_hook(self, caller, **kwargs)

    def deny_request(self, request: Any, client_address: Any, reason: str) -> None:
        """Refuse a request that was accepted: count it by *reason*, fire
        ``sockserve_request_denied``, then shut it down. For strategies that drop
        requests unrun and layers that refuse one.
        """
        with self._sockserve_state.lock:
            self.requests_denied[reason] += 1
        try:
            hook = self._sockserve_hooks.request_denied
            if hook is not None:
                call_hook(
                    self, hook, request=request, client_address=client_address, reason=reason
                )
        finally:
            self.shutdown_request(request)
            if self._sockserve_limited:
                self._sockserve_release(request)

    def request_moved(self, request: Any) -> None:
        """The connection now runs in another process (a forked child): it no longer
        counts against this process's ``max_connections``. For strategies."""
        if self._sockserve_limited:
            self._sockserve_release(request)

    # ------------------------------------------------------------------ limits

    def _sockserve_limits(self) -> Limits:
        state = self._sockserve_state
        limits = state.limits
        if limits is None:
            with state.lock:
                limits = state.limits
                if limits is None:
                    limits = state.limits = Limits(self)
        return limits

    def _sockserve_hold(self, request: Any) -> None:
        """Count an accepted connection; pause accepting at ``max_connections``."""
        if isinstance(request, tuple):
            return
        limits = self._sockserve_limits()
        limits.held.add(id(request))
        limit = self.max_connections
        if limit is not None and len(limits.held) >= limit and not limits.paused:
            with self._sockserve_state.lock:
                limits.paused = True
                self.limits_reached["max_connections"] += 1
            if self.limits_reached["max_connections"] == 1:
                log.warning(
                    "%s: max_connections=%d reached; accepting paused until one ends "
                    "(the listen backlog holds new clients; counted in limits_reached)",
                    type(self).__name__, limit,
                )
            self.pause_accepting("max_connections")

    def _sockserve_release(self, request: Any) -> None:
        limits = self._sockserve_state.limits
        if limits is None or id(request) not in limits.held:
            return
        limits.held.discard(id(request))
        limit = self.max_connections
        if limits.paused and (limit is None or len(limits.held) < limit):
            with self._sockserve_state.lock:
                if not limits.paused:
                    return
                limits.paused = False
            self.resume_accepting("max_connections")

    def _sockserve_admit(self, request: Any, client_address: Any) -> tuple[Any, int | None] | None:
        """Per-IP limit and request deadline of a prepared request; None: it was denied."""
        limits = self._sockserve_limits()
        host = None
        per_ip = self.max_connections_per_ip
        if per_ip is not None:
            host = client_host(client_address)
            with self._sockserve_state.lock:
                over = limits.by_host[host] >= per_ip
                if not over:
                    limits.by_host[host] += 1
            if over:
                self.deny_request(request, client_address, "per-ip")
                return None
        token = None
        if self.request_timeout is not None:
            token = limits.deadlines.add(request, self.request_timeout)
        return host, token

    def _sockserve_end(self, raw: Any, admitted: tuple[Any, int | None] | None) -> None:
        limits = self._sockserve_state.limits
        if limits is None:
            return
        if admitted is not None:
            host, token = admitted
            if token is not None:
                limits.deadlines.remove(token)
            if host is not None:
                with self._sockserve_state.lock:
                    limits.by_host[host] -= 1
                    if limits.by_host[host] <= 0:
                        del limits.by_host[host]
        self._sockserve_release(raw)

    # ------------------------------------------------------------------ one request

    def service_actions(self) -> None:
        """Called on every turn of the ``serve_forever`` loop; may be overridden."""

    def reload(self) -> bool:
        """Re-read what the server was built from (certificates and keys), keeping what
        works: a layer whose new files are bad logs the error and keeps the old ones.

        ``sockserve serve`` calls it on SIGHUP. Layers and plugins override it and chain
        with ``super()``; the default does nothing.

        :returns: False when some part kept its old state (it logged why), else True.
        """
        return True

    def handle_request(self) -> None:
        """Handle one request, waiting at most ``timeout`` (then ``handle_timeout()``).

        The wait is the smaller of the socket's own timeout and ``self.timeout``.
        """
        timeout = self.socket.gettimeout()
        if timeout is None:
            timeout = self.timeout
        elif self.timeout is not None:
            timeout = min(timeout, self.timeout)
        if timeout is not None:
            deadline = time.monotonic() + timeout
        with _ServerSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            for listener in self._sockserve_listeners.values():
                selector.register(listener, selectors.EVENT_READ, listener)
            while True:
                ready = selector.select(timeout)
                if ready:
                    return self._handle_request_noblock(ready[0][0].data)
                if timeout is not None:
                    timeout = deadline - time.monotonic()
                    if timeout < 0:
                        return self.handle_timeout()

    def _handle_request_noblock(self, listener: socket.socket | None = None) -> None:
        """Accept one request that is ready and run it through verify and process.

        :param listener: a socket of ``add_listener`` to accept from; None: the server's
            own (the standard module's call, with no argument).
        """
        try:
            if listener is None:
                request, client_address = self.get_request()
            else:
                request, client_address = self._sockserve_accept_on(listener)
        except OSError as exc:
            self._sockserve_accept_failed(exc)
            return
        state = self._sockserve_state
        if state.accept_failures:
            self._sockserve_accept_resumed(state)
        verify = self._sockserve_hooks.verify_request
        try:
            if verify is None:
                accepted = self.verify_request(request, client_address)
            else:
                accepted = self._sockserve_verify(verify, request, client_address)
        except LayerError as exc:  # a layer's allow-list, on the serving thread
            self._sockserve_refuse(exc, request, client_address)
            return
        if not accepted:
            if self._sockserve_hooks.request_denied is None:
                self.shutdown_request(request)
            else:
                self.deny_request(request, client_address, "verify_request")
            return
        if self._sockserve_limited and self.max_connections is not None:
            self._sockserve_hold(request)
        state.sync_ran = False
        try:
            self.process_request(request, client_address)
        except Exception:
            self._sockserve_handle_error(request, client_address)
            if not state.sync_ran:  # never ran: it ends denied
                self.deny_request(request, client_address, "process_request")
        except BaseException:
            if not state.sync_ran:  # run_request shut it down already
                self.shutdown_request(request)
            raise

    def _sockserve_verify(self, verify: Any, request: Any, client_address: Any) -> bool:
        verdict = call_hook(self, verify, request=request, client_address=client_address)
        if verdict is None:
            return self.verify_request(request, client_address)
        return bool(verdict)

    def _sockserve_accept_failed(self, exc: OSError) -> None:
        if self._sockserve_hooks.accept_error is not None:
            call_hook(self, self._sockserve_hooks.accept_error, exc=exc)
        if isinstance(exc, DatagramTruncatedError):
            self.datagrams_truncated = getattr(self, "datagrams_truncated", 0) + 1
            try:
                raise exc
            except DatagramTruncatedError:
                self._sockserve_handle_error(None, exc.client_address)
            return
        if exc.errno not in RESOURCE_ERRNOS:
            return  # a reset or aborted connection: nothing to do, as in the standard module
        state = self._sockserve_state
        state.accept_failures += 1
        if state.accept_failures == 1:
            log.error(
                "%s: accept() failed: %s; backing off until resources free up",
                type(self).__name__,
                exc,
            )
            state.backoff = ACCEPT_BACKOFF_MIN
        else:
            state.backoff = min(state.backoff * 2, ACCEPT_BACKOFF_MAX)
        # Wait on the wake-up socket so that shutdown() still interrupts the pause.
        if state.wake_r is not None:
            select.select([state.wake_r], [], [], state.backoff)
        else:
            time.sleep(state.backoff)

    def _sockserve_accept_resumed(self, state: ServingState) -> None:
        log.warning(
            "%s: accepting again after %d failed accept() call(s)",
            type(self).__name__,
            state.accept_failures,
        )
        state.accept_failures = 0

    def handle_timeout(self) -> None:
        """Called when ``handle_request`` times out; may be overridden."""

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Return ``True`` to process the request, ``False`` to refuse it (default True)."""
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        """Handle the request in the current thread; concurrency mixins override this."""
        self._sockserve_state.sync_ran = True
        self.run_request(request, client_address)

    def prepare_request(self, request: Any, client_address: Any) -> tuple[Any, Any]:
        """Per-connection work before the handler, in the worker; layers override this.

        Returns the request and client address the handler, the worker-side hooks,
        ``handle_error``, ``in_flight``, ``shutdown_request`` and the drain's cut-off are
        to see (a TLS socket, the client behind a proxy). A layer chains with
        ``super()`` and raises ``sockserve.LayerError`` when the connection is refused.
        The default returns both unchanged.
        """
        return request, client_address

    def run_request(self, request: Any, client_address: Any) -> bool:
        """Run one request here, in the worker that is to handle it, then shut it down.

        ``prepare_request`` (the layers), the ``sockserve_request_prepared`` hook, then
        the body of the standard ``process_request_thread``: ``finish_request``,
        ``handle_error`` for an ``Exception``, always ``shutdown_request``; around it the
        ``sockserve_request_start`` / ``sockserve_request_finish`` hooks. Every
        concurrency strategy runs its requests through here, in its thread or process.
        Every request ends in exactly one of ``sockserve_request_finish`` or
        ``sockserve_request_denied``.

        :returns: False when the request was denied or its handler raised, else True.
        """
        hooks = self._sockserve_hooks
        in_flight = self._sockserve_state.in_flight
        raw = request
        in_flight[id(raw)] = raw
        limited = self._sockserve_limited and not isinstance(raw, tuple)
        admitted = None
        try:
            if limited and self.idle_timeout is not None:
                raw.settimeout(self.idle_timeout)  # the layers restore it after their reads
            if self._sockserve_layered:
                prepared = self._sockserve_prepare(raw, client_address)
                if prepared is None:
                    return False
                request, client_address = prepared
                if request is not raw:
                    del in_flight[id(raw)]
                    in_flight[id(request)] = request
            if limited:
                admitted = self._sockserve_admit(request, client_address)
                if admitted is None:
                    return False
            if hooks.request_prepared is not None:
                verdict = call_hook(
                    self, hooks.request_prepared, request=request, client_address=client_address
                )
                if verdict is False:
                    self.deny_request(request, client_address, "request_prepared")
                    return False
            return self._sockserve_run(hooks, request, client_address)
        finally:
            in_flight.pop(id(request), None)
            if request is not raw:
                in_flight.pop(id(raw), None)
            if self._sockserve_state.cut:
                self._sockserve_state.cut.discard(id(request))
            if limited:
                self._sockserve_end(raw, admitted)

    def _sockserve_prepare(self, raw: Any, client_address: Any) -> tuple[Any, Any] | None:
        """Run the layers; on failure deny the request and return None."""
        try:
            return self.prepare_request(raw, client_address)
        except LayerError as exc:
            failed = exc
        except OSError as exc:  # the peer went away or timed out mid-layer
            failed = LayerError(
                "timeout" if isinstance(exc, TimeoutError) else "connection", client_address, str(exc)
            )
        except Exception:
            self._sockserve_handle_error(raw, client_address)
            self.deny_request(raw, client_address, "prepare_request")
            return None
        except BaseException:
            self.shutdown_request(raw)
            raise
        self._sockserve_refuse(failed, raw, client_address)
        return None

    def _sockserve_refuse(self, failed: LayerError, raw: Any, client_address: Any) -> None:
        """A layer refused the connection: one log line (unless it logged), then deny."""
        if failed.log:
            log.warning(
                "%s: refused %s: %s", type(self).__name__, failed.peer or client_address, failed
            )
        request = raw if failed.request is None else failed.request
        self.deny_request(request, client_address, failed.reason)

    def _sockserve_run(self, hooks: HookRelay, request: Any, client_address: Any) -> bool:
        start = hooks.request_start
        finish = hooks.request_finish
        if start is None and finish is None:
            # No per-request hook: the standard module's path, nothing added.
            try:
                self.finish_request(request, client_address)
            except Exception:
                self._sockserve_handle_error(request, client_address)
                return False
            finally:
                self.shutdown_request(request)
            return True
        failure: BaseException | None = None
        try:
            if start is not None:
                call_hook(self, start, request=request, client_address=client_address)
            self.finish_request(request, client_address)
        except Exception as exc:
            failure = exc
            self._sockserve_handle_error(request, client_address)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            try:
                if finish is not None:
                    call_hook(
                        self, finish, request=request, client_address=client_address, exc=failure
                    )
            finally:
                self.shutdown_request(request)
        return failure is None

    def _sockserve_handle_error(self, request: Any, client_address: Any) -> None:
        """Offer the exception being handled to the hook, then to ``handle_error``.

        A request the server cut off itself fails as expected: one line, no traceback.
        """
        cut = self._sockserve_state.cut
        if cut and id(request) in cut:
            log.info("%s: request from %s cut off: %s", type(self).__name__, client_address, sys.exc_info()[1])
            return
        if self.idle_timeout is not None and isinstance(sys.exc_info()[1], TimeoutError):
            with self._sockserve_state.lock:
                self.requests_timed_out["idle"] += 1
            log.info("%s: request from %s: no data for idle_timeout=%ss; closed",
                     type(self).__name__, client_address, self.idle_timeout)
            return
        hook = self._sockserve_hooks.handle_error
        if hook is not None:
            exc = sys.exc_info()[1]
            handled = call_hook(
                self, hook, request=request, client_address=client_address, exc=exc
            )
            if handled:
                return
        self.handle_error(request, client_address)

    def server_close(self) -> None:
        """Clean up the server; may be overridden."""

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Finish one request by instantiating ``RequestHandlerClass``."""
        self.RequestHandlerClass(request, client_address, self)

    def shutdown_request(self, request: Any) -> None:
        """Shut down and close one request (here: only close it)."""
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Release one request's resources; may be overridden."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Report an exception a request raised, then go on serving.

        Prints the traceback to ``sys.stderr``, as the standard module does. Only
        ``Exception`` subclasses come here; others propagate.
        """
        print("-" * 40, file=sys.stderr)
        print(
            "Exception occurred during processing of request from",
            client_address,
            file=sys.stderr,
        )
        traceback.print_exc()
        print("-" * 40, file=sys.stderr)

    def __enter__(self) -> BaseServer:
        return self

    def __exit__(self, *args: object) -> None:
        self.server_close()
