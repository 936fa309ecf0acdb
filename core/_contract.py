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

from collections.abc import Iterable
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

    # -- the strategy contract (DESIGN.md section 7)

    def run_request(self, request: Any, client_address: Any) -> bool:
        """Run one request where the strategy wants it run: layers, hooks, handler, close."""
        ...

    @property
    def shutdown_requested(self) -> bool:
        """``shutdown()`` was asked for and the serve loop has not stopped yet."""
        ...

    def pause_accepting(self) -> None:
        """Stop polling the listening socket; the loop keeps turning. Any thread."""
        ...

    def resume_accepting(self) -> None:
        """Poll the listening socket again. Any thread."""
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
