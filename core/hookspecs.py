"""Lifecycle hook specifications: the contract between sockserve and lifecycle plugins.

Plugin authors read this module. Implementations are marked with ``sockserve.hookimpl``
and may accept just the arguments they use. A hook implementation that raises is reported
through the server's ``handle_error`` (with the plugin named) and never stops the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from ._contract import Server as BaseServer

__all__ = [
    "hookspec",
    "hookimpl",
    "PROJECT_NAME",
    "Request",
    "Address",
    "sockserve_server_activate",
    "sockserve_serve_start",
    "sockserve_serve_stop",
    "sockserve_service_actions",
    "sockserve_verify_request",
    "sockserve_request_prepared",
    "sockserve_request_start",
    "sockserve_request_finish",
    "sockserve_request_denied",
    "sockserve_handle_error",
    "sockserve_server_close",
    "sockserve_server_closed",
    "sockserve_pre_fork",
    "sockserve_post_fork",
    "sockserve_worker_ready",
    "sockserve_worker_abort",
    "sockserve_worker_exit",
    "sockserve_accept_error",
]

#: The pluggy project name; markers and the plugin manager share it.
PROJECT_NAME = "sockserve"

#: Marks a function as a hook specification (used in this module only).
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Marks a plugin's function as an implementation of a sockserve hook.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Request = Any
Address = Any

# --------------------------------------------------------------------------- activation


@hookspec
def sockserve_server_activate(server: BaseServer) -> None:
    """React to *server* having bound and started listening.

    Fires in the thread that constructed the server, right after ``server_activate``
    (``bind_and_activate=True``) or when the caller calls ``server_activate`` itself.
    Every implementation runs; return values are ignored.

    :param server: the server; ``server.server_address`` is the real, bound address.

    For plugins that announce the address, register with a supervisor or set socket
    options. Must not serve requests.
    """


# --------------------------------------------------------------------------- serving


@hookspec
def sockserve_serve_start(server: BaseServer) -> None:
    """React to ``serve_forever`` starting its loop.

    Fires in the serving thread before the first request is accepted. Every
    implementation runs.

    :param server: the server about to serve.
    """


@hookspec
def sockserve_serve_stop(server: BaseServer) -> None:
    """React to ``serve_forever`` leaving its loop.

    Fires in the serving thread after the last request was accepted, whether the loop
    ended by ``shutdown()`` or by an exception; in-flight requests of concurrent
    strategies may still be running. Every implementation runs.

    :param server: the server that stopped serving.
    """


@hookspec
def sockserve_service_actions(server: BaseServer) -> None:
    """Do periodic work on each turn of the ``serve_forever`` loop.

    Fires in the serving thread after ``service_actions`` on every loop turn: after each
    request and at least every ``poll_interval`` seconds. Every implementation runs.

    :param server: the serving server.

    Must return quickly: the loop accepts nothing while it runs.
    """


# --------------------------------------------------------------------------- per request


@hookspec(firstresult=True)
def sockserve_verify_request(
    server: BaseServer, request: Request, client_address: Address
) -> bool | None:
    """Decide whether *request* from *client_address* gets handled.

    Fires in the thread running ``serve_forever`` (or ``handle_request``), after the
    request is accepted and before the concurrency strategy hands it to a worker.
    The first implementation that returns a bool decides; with none, the server's own
    ``verify_request`` decides.

    :param server: the server that accepted the request.
    :param request: the connected socket, or ``(data, socket)`` for datagrams.
    :param client_address: the peer address, as the transport reports it.
    :returns: ``False`` to drop the request (it is shut down and closed, the handler
        never runs), ``True`` to accept it without asking ``verify_request``, ``None`` to
        leave it to others.

    For access control and rate limiting. Runs on the serving thread, so it must not
    block; slow checks belong on the worker side of the request.
    """


@hookspec(firstresult=True)
def sockserve_request_prepared(
    server: BaseServer, request: Request, client_address: Address
) -> bool | None:
    """Decide on a request after the layers ran, before it is handled.

    Fires in the thread or process that runs the request, after ``prepare_request``
    (the TLS handshake is done, the PROXY header read), so *request* and *client_address*
    are what the layers returned: the TLS socket, the client behind the proxy. The first
    implementation that returns non-``None`` decides.

    :returns: ``False`` to deny the request (``sockserve_request_denied`` fires with
        reason ``"request_prepared"`` and it is shut down; the handler never runs),
        ``True`` or ``None`` to go on.

    For access control on the real client address and on what TLS negotiated. May
    block briefly: it runs in the worker, not on the serving thread.
    """


@hookspec
def sockserve_request_denied(
    server: BaseServer, request: Request, client_address: Address, reason: str
) -> None:
    """React to a request refused after it was accepted.

    Fires wherever the refusal happens: on the serving thread (``verify_request`` or a
    verify hook said no: reason ``"verify_request"``; ``process_request`` raised:
    ``"process_request"``), in the worker (a layer failed: its ``LayerError.reason`` such
    as ``"timeout"``; ``sockserve_request_prepared`` said no: ``"request_prepared"``), or
    at close (a queued request dropped unrun: ``"closing"``). Every admitted request ends
    in exactly one of ``sockserve_request_finish`` or this hook. Every implementation
    runs; the request is shut down right after.

    :param request: the request as far as it got (the raw socket, or what a layer made).
    :param client_address: the peer address as far as it is known.
    :param reason: a short word saying why (see above; layers add their own).

    For counters and rate-limited logs of refused connections. Must not block.
    """


@hookspec
def sockserve_request_start(
    server: BaseServer, request: Request, client_address: Address
) -> None:
    """React to a request about to be handled.

    Fires in the thread or child process that runs the request (the serving thread for
    ``sync``, the request's thread for ``threading``, the child for ``forking``), just
    before ``finish_request`` builds the handler. Every implementation runs.

    :param server: the server.
    :param request: the connected socket, or ``(data, socket)`` for datagrams.
    :param client_address: the peer address.

    For timing, logging and per-request context. Raising here does not stop the request.
    """


@hookspec
def sockserve_request_finish(
    server: BaseServer, request: Request, client_address: Address, exc: BaseException | None
) -> None:
    """React to a request having been handled.

    Fires in the same thread or process as ``sockserve_request_start``, after the handler
    returned or raised (and after error handling) and before the request is shut down.
    Every implementation runs.

    :param server: the server.
    :param request: the request.
    :param client_address: the peer address.
    :param exc: the exception the handler raised, or ``None`` when it succeeded.

    For access logs, metrics and cleanup of what ``sockserve_request_start`` set up.
    """


@hookspec(firstresult=True)
def sockserve_handle_error(
    server: BaseServer, request: Request, client_address: Address, exc: BaseException
) -> bool | None:
    """Handle an exception a request handler raised.

    Fires where the request ran, inside the ``except`` block, before the server's own
    ``handle_error``. The first implementation that returns non-``None`` decides.

    :param exc: the exception (an ``Exception`` subclass; others are never handled).
    :returns: ``True`` when the error is handled (``handle_error`` is not called),
        ``False`` or ``None`` to let the server's ``handle_error`` report it.

    For error reporting services. Must not raise.
    """


# --------------------------------------------------------------------------- worker processes


@hookspec
def sockserve_pre_fork(server: BaseServer, worker_id: int) -> None:
    """React to a worker process about to be forked (``prefork`` strategy).

    Fires in the parent's serving thread before each fork, also for a replacement.
    Every implementation runs.

    :param server: the parent's server.
    :param worker_id: the worker's slot, 0 to ``workers - 1`` (a replacement keeps the
        slot of the worker it replaces).

    For closing what the child must not inherit.
    """


@hookspec
def sockserve_post_fork(server: BaseServer, worker_id: int) -> None:
    """React to being a freshly forked worker process (``prefork`` strategy).

    Fires in the worker, before it starts accepting. Every implementation runs.

    :param server: the worker's copy of the server (``server.worker_id`` is set).
    :param worker_id: the worker's slot.

    For per-process set-up: reopen connections, seed random generators.
    """


@hookspec
def sockserve_worker_ready(server: BaseServer, worker_id: int, pid: int) -> None:
    """React to a worker process having reported that it serves (``prefork`` strategy).

    Fires in the parent's serving thread when the worker's report arrives over its pipe:
    the worker ran ``sockserve_post_fork`` and entered its serve loop. A rolling reload
    stops an old worker only after its replacement fired this. Every implementation runs.

    :param server: the parent's server.
    :param worker_id: the worker's slot.
    :param pid: the worker's process id.
    """


@hookspec
def sockserve_worker_abort(server: BaseServer, worker_id: int, pid: int) -> None:
    """React to the parent aborting a stuck worker (``prefork`` strategy).

    Fires in the parent's serving thread right after it sent SIGABRT to a worker whose
    serve loop missed its heartbeat for ``timeout`` seconds (the worker writes every
    thread's stack to its log and dies; SIGKILL follows 5 s later if it does not). The
    worker's ``sockserve_worker_exit`` follows, with reason ``"timeout"``. Every
    implementation runs.

    :param server: the parent's server.
    :param worker_id: the worker's slot.
    :param pid: the worker's process id.

    For alerting: a stuck worker is a bug in a handler.
    """


@hookspec
def sockserve_worker_exit(server: BaseServer, worker_id: int, status: int, reason: str, pid: int) -> None:
    """React to a worker process having exited (``prefork`` strategy).

    Fires in the parent's serving thread after the worker was reaped, whether it is
    being replaced or the server is stopping. Every implementation runs.

    :param server: the parent's server.
    :param worker_id: the worker's slot.
    :param status: its exit code as ``os.waitstatus_to_exitcode`` gives it (negative:
        killed by that signal).
    :param reason: why it exited, one of ``"max_requests"`` (recycled itself),
        ``"timeout"`` (aborted as stuck), ``"crash"`` (failed, or exited unasked),
        ``"reload"`` (replaced by a rolling reload), ``"scale"`` (one worker fewer,
        SIGTTOU) and ``"stop"`` (the server is stopping).
    :param pid: its process id.
    """


# --------------------------------------------------------------------------- accepting


@hookspec
def sockserve_accept_error(server: BaseServer, exc: OSError) -> None:
    """React to ``get_request()`` having failed.

    Fires in the serving thread, for every failed ``accept()`` (``EMFILE`` and the other
    resource errors the server backs off from, and ``ECONNABORTED`` and the like it
    ignores) and for a datagram dropped as too long (``sockserve.DatagramTruncatedError``).
    The server handles the error as it would without the hook. Every implementation runs;
    it costs nothing while accepting succeeds.

    :param server: the server.
    :param exc: the error; ``exc.errno`` names it.

    For metrics. Must not block.
    """


# --------------------------------------------------------------------------- shutdown


@hookspec
def sockserve_server_close(server: BaseServer) -> None:
    """React to the server closing.

    Fires in the thread calling ``server_close()``, before the listening socket is
    closed and before in-flight requests are waited for. Every implementation runs.

    :param server: the closing server.

    For flushing statistics and releasing what the plugin holds for this server.
    """


@hookspec
def sockserve_server_closed(server: BaseServer) -> None:
    """React to the server having closed, after the drain.

    Fires in the thread calling ``server_close()``, after the outermost ``server_close``
    returned: the listening socket is closed and every in-flight request has finished or
    was cut off (``server.requests_cut_off``). Fires once per server, only in the process
    that created it (not in forked workers). Every implementation runs.

    :param server: the closed server.

    For final statistics: nothing about this server changes any more.
    """
