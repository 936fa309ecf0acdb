"""BaseServer: the request lifecycle shared by every transport and concurrency strategy.

What belongs here: the serve loop, shutdown, the request path (get -> verify -> process ->
finish -> shut down) and error handling, as the standard ``socketserver`` documents them,
plus the places where lifecycle hooks fire. Sockets, addresses and families live in
``transports/``; threads and processes in ``concurrency/``.
"""

from __future__ import annotations

import errno
import logging
import math
import select
import selectors
import socket
import sys
import threading
import time
import traceback
from typing import Any

import attrs

from ._errors import DatagramTruncatedError
from ._hooks import HookRelay, call_hook, relay_for
from ._options import seconds

__all__ = ["BaseServer"]

log = logging.getLogger("sockserve")

#: serve_forever's documented default: how often the loop turns (service_actions) when idle.
#: Shutdown does not wait for it; a wake-up socket interrupts the wait at once.
POLL_INTERVAL = 0.5

#: accept() errors that mean "out of descriptors or memory right now". Retrying at once
#: spins at 100% CPU (the listening socket stays readable), so the loop backs off instead.
RESOURCE_ERRNOS = frozenset(
    e for e in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) if e is not None
)
#: First and longest pause after a resource error on accept: short enough that service
#: resumes quickly once a descriptor frees up, long enough to take the loop off the CPU.
ACCEPT_BACKOFF_MIN = 0.005
ACCEPT_BACKOFF_MAX = 0.5

# poll() has no descriptor limit; select() is the fallback, as in the standard module.
if hasattr(selectors, "PollSelector"):
    _ServerSelector: type[selectors.BaseSelector] = selectors.PollSelector
else:  # pragma: no cover - Windows
    _ServerSelector = selectors.SelectSelector

if hasattr(select, "poll"):
    _Poller = select.poll
    _READ = select.POLLIN

    def _poll_timeout(seconds: float | None) -> int | None:
        """poll() takes milliseconds; round up so that a short interval never becomes 0."""
        return None if seconds is None else max(0, math.ceil(seconds * 1000))

else:  # pragma: no cover - Windows: the same interface over a selector

    class _Poller:  # type: ignore[no-redef]
        def __init__(self) -> None:
            self._selector = selectors.SelectSelector()

        def register(self, fileobj: Any, events: int) -> None:
            self._selector.register(fileobj, selectors.EVENT_READ)

        def poll(self, timeout: float | None) -> list[Any]:
            return self._selector.select(timeout)

    _READ = selectors.EVENT_READ

    def _poll_timeout(seconds: float | None) -> float | None:
        return seconds


#: The listen() backlog of sockserve's own strategies (threadpool, prefork) and of
#: ``sockserve serve``: the most the system allows (the kernel caps it at
#: net.core.somaxconn). The documented 5 drops connections under any burst: with 8
#: clients connecting at once, a dropped SYN costs a 1 s retransmission
#: (benchmarks/THROUGHPUT.md).
LISTEN_BACKLOG = socket.SOMAXCONN


@attrs.define
class ServerOptions:
    """Options of every server (see ``BaseServer``)."""

    timeout: float | None = seconds()
    drain_timeout: float | None = seconds()


class BaseServer:
    """Base class of all servers: the lifecycle without any socket specifics.

    Subclasses supply ``fileno``, ``get_request``, ``server_bind`` and friends; this class
    runs the loop. Behaviour beyond the standard module, all compatible with it:

    - ``shutdown()`` wakes the loop at once instead of waiting for the next poll, may be
      called twice, before ``serve_forever`` (which then returns at once) and from the
      serving thread (the loop stops after the current request).
    - accept() failing for lack of descriptors or memory backs off and logs once per burst.
    - lifecycle plugins (``sockserve.hookimpl``) are called at the points listed in
      ``sockserve.core.hookspecs``.
    """

    #: Seconds handle_request() waits for a request; None waits forever.
    timeout: float | None = None
    #: Seconds shutdown()/server_close() wait for in-flight requests before they are cut
    #: off (their connections shut down, logged and counted in ``requests_cut_off``).
    #: None waits as long as they take, which is the standard module's behaviour.
    drain_timeout: float | None = None
    #: The options this class declares (see ``sockserve.with_options``).
    sockserve_options = ServerOptions
    #: Lifecycle plugins that apply to this class only (set by ``compose(plugins=...)``).
    _sockserve_plugins: tuple[object, ...] = ()

    def __init__(self, server_address: Any, RequestHandlerClass: Any) -> None:
        """Store the address and handler class; subclasses create and bind the socket."""
        self.server_address = server_address
        self.RequestHandlerClass = RequestHandlerClass
        #: Requests cut off when the drain deadline passed.
        self.requests_cut_off = 0
        self._sockserve_hooks: HookRelay = relay_for(type(self)._sockserve_plugins)
        # Reentrant: a signal handler that calls shutdown() (prefork workers, sockserve
        # serve) runs in the serving thread and may interrupt it while it holds the lock.
        self._sockserve_lock = threading.RLock()
        self._sockserve_shutdown_request = False
        self._sockserve_is_shut_down = threading.Event()
        self._sockserve_is_shut_down.set()
        self._sockserve_serving_thread: int | None = None
        self._sockserve_wake: socket.socket | None = None
        self._sockserve_wake_r: socket.socket | None = None
        self._sockserve_backoff = 0.0
        self._sockserve_accept_failures = 0

    def server_activate(self) -> None:
        """Called by the constructor to activate the server; may be overridden."""

    # ------------------------------------------------------------------ serving

    def serve_forever(self, poll_interval: float = POLL_INTERVAL) -> None:
        """Handle one request at a time until ``shutdown()``.

        Polls for shutdown every *poll_interval* seconds and calls ``service_actions``
        on every turn; ``shutdown()`` interrupts the wait at once. If ``shutdown()`` was
        called before, returns at once without accepting anything.
        """
        wake_r = self._sockserve_enter_loop()
        if wake_r is None:
            return
        hooks = self._sockserve_hooks
        try:
            if hooks.serve_start is not None:
                call_hook(self, hooks.serve_start)
            self._sockserve_loop(wake_r, poll_interval)
        finally:
            self._sockserve_leave_loop()

    def _sockserve_enter_loop(self) -> socket.socket | None:
        """Mark the server as serving and make the wake-up socket pair.

        Returns the socket to poll for wake-ups, or None when ``shutdown()`` was called
        before (the request is consumed and the loop must not run).
        """
        with self._sockserve_lock:
            if self._sockserve_shutdown_request:
                self._sockserve_shutdown_request = False
                return None
            self._sockserve_is_shut_down.clear()
            self._sockserve_serving_thread = threading.get_ident()
            wake_r, wake_w = socket.socketpair()
            wake_r.setblocking(False)
            wake_w.setblocking(False)
            self._sockserve_wake = wake_w
            self._sockserve_wake_r = wake_r
        return wake_r

    def _sockserve_loop(self, wake_r: socket.socket, poll_interval: float | None) -> None:
        """Accept and handle requests until shutdown is asked for."""
        hooks = self._sockserve_hooks
        # A raw poll object, not the selectors wrapper the standard module uses:
        # selectors builds key objects and lists in Python on every call, which
        # costs more per request than everything sockserve adds (bench_stdlib.py).
        poller = _Poller()
        poller.register(self, _READ)
        poller.register(wake_r, _READ)
        timeout = _poll_timeout(poll_interval)
        # Locals save attribute lookups on every turn of the loop.
        poll = poller.poll
        handle = self._handle_request_noblock
        service_actions = self.service_actions
        while not self._sockserve_shutdown_request:
            ready = poll(timeout)
            # bpo-35017: shutdown() may have been called during poll().
            if self._sockserve_shutdown_request:
                break
            if ready:
                handle()
            service_actions()
            if hooks.service_actions is not None:
                call_hook(self, hooks.service_actions)

    def _sockserve_leave_loop(self) -> None:
        """Undo ``_sockserve_enter_loop``, fire ``serve_stop`` and release shutdown()."""
        with self._sockserve_lock:
            wake_w, wake_r = self._sockserve_wake, self._sockserve_wake_r
            self._sockserve_wake = None
            self._sockserve_wake_r = None
            if wake_w is not None:
                wake_w.close()
            if wake_r is not None:
                wake_r.close()
            self._sockserve_shutdown_request = False
            self._sockserve_serving_thread = None
        hooks = self._sockserve_hooks
        try:
            if hooks.serve_stop is not None:
                call_hook(self, hooks.serve_stop)
        finally:
            self._sockserve_is_shut_down.set()

    def _sockserve_after_fork(self) -> None:
        """Give a forked process its own serving state (not the parent's wake-up socket)."""
        for sock in (self._sockserve_wake, self._sockserve_wake_r):
            if sock is not None:
                sock.close()  # the child's copies; the parent's stay open
        self._sockserve_lock = threading.RLock()
        self._sockserve_shutdown_request = False
        self._sockserve_is_shut_down = threading.Event()
        self._sockserve_is_shut_down.set()
        self._sockserve_serving_thread = None
        self._sockserve_wake = None
        self._sockserve_wake_r = None

    def shutdown(self) -> None:
        """Stop the ``serve_forever`` loop and wait until it has stopped.

        Wakes the loop at once (no wait for ``poll_interval``). Safe to call more than once
        and before serving. Called from the serving thread itself (a handler of a sync
        server), it returns at once and the loop stops after the current request.
        In-flight requests of concurrent strategies are not waited for here; that is
        ``server_close()``'s job (``block_on_close``).
        """
        with self._sockserve_lock:
            self._sockserve_shutdown_request = True
            self._sockserve_wake_loop()
            if self._sockserve_serving_thread == threading.get_ident():
                return
        drain = self.drain_timeout
        if drain is None or self._sockserve_is_shut_down.wait(drain):
            self._sockserve_is_shut_down.wait()
            return
        # A sync request still runs in the serving thread past the drain deadline.
        self._sockserve_cut_off_serving_request()
        self._sockserve_is_shut_down.wait()

    def _sockserve_wake_loop(self) -> None:
        """Wake the serve loop where it waits; called by ``shutdown()`` after it set the flag.

        The loop waits in poll(), woken through the socket pair. A strategy that makes the
        serving thread wait elsewhere too (a full thread pool) extends this to wake it
        there; the flag is already set, so a woken loop sees it and never waits again.
        """
        wake = self._sockserve_wake
        if wake is not None:
            try:
                wake.send(b"\0")
            except OSError:  # buffer full: a wake-up is already pending
                pass

    def _sockserve_cut_off_serving_request(self) -> None:
        request = getattr(self, "_sockserve_current", None)
        if request is not None:
            self._sockserve_cut_off([request])

    def _sockserve_cut_off(self, requests: list[Any]) -> None:
        """Shut down the connections of requests still running at the drain deadline."""
        count = 0
        for request in requests:
            sock = request[1] if isinstance(request, tuple) else request
            if isinstance(request, tuple):
                count += 1  # a datagram handler cannot be interrupted; counted only
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except (OSError, AttributeError):
                pass
            count += 1
        if count:
            self.requests_cut_off += count
            log.warning(
                "%s: drain deadline of %ss passed; cut off %d in-flight request(s)",
                type(self).__name__,
                self.drain_timeout,
                count,
            )

    def service_actions(self) -> None:
        """Called on every turn of the ``serve_forever`` loop; may be overridden."""

    def handle_request(self) -> None:
        """Handle one request, waiting at most ``timeout`` (then ``handle_timeout()``).

        The wait is the smaller of the socket's own timeout and ``self.timeout``.
        """
        timeout = self.socket.gettimeout()  # type: ignore[attr-defined]
        if timeout is None:
            timeout = self.timeout
        elif self.timeout is not None:
            timeout = min(timeout, self.timeout)
        if timeout is not None:
            deadline = time.monotonic() + timeout
        with _ServerSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            while True:
                if selector.select(timeout):
                    return self._handle_request_noblock()
                if timeout is not None:
                    timeout = deadline - time.monotonic()
                    if timeout < 0:
                        return self.handle_timeout()

    def _handle_request_noblock(self) -> None:
        """Accept one request that is ready and run it through verify and process."""
        try:
            request, client_address = self.get_request()
        except OSError as exc:
            self._sockserve_accept_failed(exc)
            return
        if self._sockserve_accept_failures:
            self._sockserve_accept_resumed()
        verify = self._sockserve_hooks.verify_request
        if verify is None:
            accepted = self.verify_request(request, client_address)
        else:
            accepted = self._sockserve_verify(verify, request, client_address)
        if accepted:
            try:
                self.process_request(request, client_address)
            except Exception:
                self._sockserve_handle_error(request, client_address)
                self.shutdown_request(request)
            except BaseException:
                self.shutdown_request(request)
                raise
        else:
            self.shutdown_request(request)

    def _sockserve_verify(self, verify: Any, request: Any, client_address: Any) -> bool:
        verdict = call_hook(self, verify, request=request, client_address=client_address)
        if verdict is None:
            return self.verify_request(request, client_address)
        return bool(verdict)

    def _sockserve_accept_failed(self, exc: OSError) -> None:
        if isinstance(exc, DatagramTruncatedError):
            self.datagrams_truncated = getattr(self, "datagrams_truncated", 0) + 1
            try:
                raise exc
            except DatagramTruncatedError:
                self._sockserve_handle_error(None, exc.client_address)
            return
        if exc.errno not in RESOURCE_ERRNOS:
            return  # a reset or aborted connection: nothing to do, as in the standard module
        self._sockserve_accept_failures += 1
        if self._sockserve_accept_failures == 1:
            log.error(
                "%s: accept() failed: %s; backing off until resources free up",
                type(self).__name__,
                exc,
            )
            self._sockserve_backoff = ACCEPT_BACKOFF_MIN
        else:
            self._sockserve_backoff = min(self._sockserve_backoff * 2, ACCEPT_BACKOFF_MAX)
        # Wait on the wake-up socket so that shutdown() still interrupts the pause.
        wake_r = self._sockserve_wake_r
        if wake_r is not None:
            select.select([wake_r], [], [], self._sockserve_backoff)
        else:
            time.sleep(self._sockserve_backoff)

    def _sockserve_accept_resumed(self) -> None:
        log.warning(
            "%s: accepting again after %d failed accept() call(s)",
            type(self).__name__,
            self._sockserve_accept_failures,
        )
        self._sockserve_accept_failures = 0

    def handle_timeout(self) -> None:
        """Called when ``handle_request`` times out; may be overridden."""

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Return ``True`` to process the request, ``False`` to refuse it (default True)."""
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        """Handle the request in the current thread; concurrency mixins override this."""
        # Remembered so that a drain deadline can cut off a request that overstays.
        self._sockserve_current = request
        try:
            hooks = self._sockserve_hooks
            if hooks.request_start is not None or hooks.request_finish is not None:
                self.run_request(request, client_address)
                return
            # run_request's no-hook path, except that a BaseException leaves the request
            # for _handle_request_noblock to shut down, once, as the standard module does.
            try:
                self.finish_request(request, client_address)
            except Exception:
                self._sockserve_handle_error(request, client_address)
            self.shutdown_request(request)
        finally:
            self._sockserve_current = None

    def run_request(self, request: Any, client_address: Any) -> bool:
        """Run one request here, in the worker that is to handle it, then shut it down.

        The body of the standard ``process_request_thread``: ``finish_request``, then
        ``handle_error`` for an ``Exception``, then always ``shutdown_request``; around it
        the ``sockserve_request_start`` / ``sockserve_request_finish`` hooks. Every
        concurrency strategy runs its requests through here, in its thread or process.

        :returns: False when the handler raised (the error was handled), else True.
        """
        hooks = self._sockserve_hooks
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

    def call_hook(self, name: str, **kwargs: Any) -> Any:
        """Call lifecycle hook *name* (``"serve_start"``, without the prefix) for this server.

        For strategies that run their own loops (a worker process's loop fires
        ``serve_start`` / ``serve_stop``). Does nothing when no plugin implements the hook;
        an implementation that raises is reported through ``handle_error``.

        :returns: the hook's result, or None.
        """
        caller = getattr(self._sockserve_hooks, name)
        if caller is None:
            return None
        return call_hook(self, caller, **kwargs)

    def _sockserve_handle_error(self, request: Any, client_address: Any) -> None:
        """Offer the exception being handled to the hook, then to ``handle_error``."""
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
