"""The server as strategies, layers and plugins see it: the strategy contract, typed.

``Server`` is a ``Protocol``: a concurrency mixin or a layer annotates ``self`` with it
(``def process_request(self: Server, request, client_address)``) and type checkers then
know what it may call without the mixin importing ``BaseServer``. ``BaseServer`` provides
all of it; DESIGN.md section 7 gives the meaning of each name, and docs/plugins.md shows a
third-party strategy built from them alone.

This module imports nothing from the rest of ``core``, so that every other core module can
use it for annotations without an import cycle.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol

__all__ = ["Server"]


class Server(Protocol):
    """What a concurrency strategy, a layer or a lifecycle plugin may use on a server."""

    server_address: Any
    RequestHandlerClass: Any
    #: Seconds the drain waits for in-flight work; None waits as long as it takes.
    drain_timeout: float | None
    #: Requests whose connections the drain shut down at its deadline.
    requests_cut_off: int
    #: Requests refused after they were accepted, by reason.
    requests_denied: Counter[str]
    #: Requests ended by a timeout: ``idle``, ``request``.
    requests_timed_out: Counter[str]
    #: Times a limit was reached: ``max_connections``, ``threads`` (a request waited).
    limits_reached: Counter[str]
    #: Seconds a connection may wait for its first byte in ``when_readable``.
    first_byte_timeout: float | None

    # -- the strategy contract (DESIGN.md section 7)

    def run_request(self, request: Any, client_address: Any) -> bool:
        """Run one request where the strategy wants it run: layers, hooks, handler, close."""
        ...

    @property
    def shutdown_requested(self) -> bool:
        """``shutdown()`` was asked for and the serve loop has not stopped yet."""
        ...

    def pause_accepting(self, reason: str = "strategy") -> None:
        """Stop polling the listening socket; the loop keeps turning. Any thread.
        Pauses for different reasons add up."""
        ...

    def resume_accepting(self, reason: str = "strategy") -> None:
        """End the pause for *reason*; poll again when no pause holds. Any thread."""
        ...

    def when_readable(
        self, request: Any, client_address: Any, then: Callable[[Any, Any], Any]
    ) -> None:
        """Call ``then(request, client_address)`` once the connection is readable; until
        then it waits in the serve loop's poller (closed at ``first_byte_timeout``)."""
        ...

    @property
    def waiting(self) -> int:
        """How many connections wait in ``when_readable`` for their first byte."""
        ...

    def reload(self) -> bool:
        """Re-read certificates and the like (SIGHUP); False if some part kept its old state."""
        ...

    @property
    def waited(self) -> int:
        """How many connections have waited in ``when_readable`` so far, in this process."""
        ...

    def request_moved(self, request: Any) -> None:
        """The connection runs in another process now (it no longer counts here)."""
        ...

    @property
    def in_flight(self) -> tuple[Any, ...]:
        """The requests running now in this process, as ``prepare_request`` returned them."""
        ...

    def cut_off(self, requests: Iterable[Any]) -> int:
        """Shut those connections down now; returns (and counts) how many were."""
        ...

    def end_drain(self) -> None:
        """Stop waiting for in-flight work: a running drain cuts off what is left now."""
        ...

    @property
    def drain_ended(self) -> bool:
        """``end_drain()`` was called."""
        ...

    def after_fork(self) -> None:
        """In a forked child: give this copy its own serving state."""
        ...

    def call_hook(self, name: str, **kwargs: Any) -> Any:
        """Fire lifecycle hook ``sockserve_<name>`` for this server."""
        ...

    def deny_request(self, request: Any, client_address: Any, reason: str) -> None:
        """Refuse an admitted request: ``sockserve_request_denied`` fires, then it is shut down."""
        ...

    @property
    def listeners(self) -> tuple[Any, ...]:
        """Every socket the server accepts on: its own first, then ``add_listener``'s."""
        ...

    def add_listener(self, sock: Any) -> None:
        """Serve *sock* too (bound, of the server's socket type); before ``serve_forever``."""
        ...

    def close_listeners(self) -> None:
        """Close the sockets ``add_listener`` added (``server_close`` does)."""
        ...

    # -- the documented methods a strategy or layer chains to or calls

    def fileno(self) -> int: ...

    def get_request(self) -> Any: ...

    def verify_request(self, request: Any, client_address: Any) -> bool: ...

    def process_request(self, request: Any, client_address: Any) -> None: ...

    def prepare_request(self, request: Any, client_address: Any) -> tuple[Any, Any]: ...

    def finish_request(self, request: Any, client_address: Any) -> None: ...

    def shutdown_request(self, request: Any) -> None: ...

    def close_request(self, request: Any) -> None: ...

    def handle_error(self, request: Any, client_address: Any) -> None: ...

    def handle_timeout(self) -> None: ...

    def service_actions(self) -> None: ...

    def serve_forever(self, poll_interval: float = ...) -> None: ...

    def shutdown(self) -> None: ...

    def server_close(self) -> None: ...
