"""``KitLayer``: the kit's own test layer, and ``Wrapped``, the connection it returns.

A layer per DESIGN.md section 6, doing the two things real layers do that a strategy can get
wrong: it replaces the connection with another object (as TLS does) and the client address
with another one (as the PROXY protocol does), and it reads from the connection before the
handler, with a deadline (as both do). Whatever the strategy, the handler, the worker-side
hooks, ``handle_error``, ``in_flight``, ``shutdown_request`` and the drain's cut-off must
see the ``Wrapped`` object and ``KIT_ADDRESS``.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import attrs
import sockserve

from ._recorder import Recorder

__all__ = ["KIT_ADDRESS", "KitLayer", "KitLayerOptions", "Wrapped"]

#: The client address KitLayer reports for every connection (TEST-NET-1, RFC 5737).
KIT_ADDRESS = ("192.0.2.1", 1234)
#: The first byte with which a client asks KitLayer to refuse its connection.
REFUSE = b"!"
#: Seconds KitLayer waits for a client's first GREETING bytes by default.
KIT_TIMEOUT = 1.0
#: Bytes KitLayer waits to see before the handler runs, as a TLS or PROXY layer waits for
#: a whole greeting: a client that sends one byte and stalls times the layer out also
#: under strategies that hand a connection over only once it is readable.
GREETING = 2

_HOW = {socket.SHUT_RD: "SHUT_RD", socket.SHUT_WR: "SHUT_WR", socket.SHUT_RDWR: "SHUT_RDWR"}


class Wrapped:
    """A connection wrapped in another object, as a TLS layer's ``SSLSocket`` is.

    Every attribute is the socket's, except ``shutdown``, which is recorded first (in
    ``shutdowns``, and as a ``wrapped_shutdown`` line of *recorder* when there is one, so
    that a worker process's shutdowns are seen by the test).

    :param sock: the connection.
    :param recorder: where to note shutdown calls, or None.
    """

    def __init__(self, sock: socket.socket, recorder: Recorder | None = None) -> None:
        #: The connection inside.
        self.sock = sock
        #: ``shutdown`` calls so far in this process, as ``"SHUT_WR"`` ...
        self.shutdowns: list[str] = []
        self._recorder = recorder

    def shutdown(self, how: int) -> None:
        """Record the call, then shut the connection down."""
        name = _HOW.get(how, str(how))
        self.shutdowns.append(name)
        if self._recorder is not None:
            self._recorder.note("wrapped_shutdown", how=name)
        self.sock.shutdown(how)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def __repr__(self) -> str:
        return f"<Wrapped {self.sock!r}>"


@attrs.define
class KitLayerOptions:
    """Options of KitLayer."""

    #: Seconds to wait for the client's first byte; then the layer fails with "timeout".
    kit_timeout: float = sockserve.seconds(optional=False, default=KIT_TIMEOUT)
    #: The recorder that ``Wrapped`` notes its shutdown calls to (Python only).
    kit_recorder: Recorder | None = sockserve.python_object(Recorder)


@sockserve.declare_options(KitLayerOptions)
class KitLayer:
    """A test layer: wraps each connection in ``Wrapped`` and reports ``KIT_ADDRESS``.

    In ``prepare_request`` (in the worker) it peeks at the client's first two bytes
    (``GREETING``), waiting at most ``kit_timeout`` seconds: fewer by then raises
    ``LayerError("timeout")``, a first byte ``b"!"`` raises ``LayerError("refused")``, a
    client that closed at once ``LayerError("closed")``. The bytes stay unread for the
    handler. Datagram requests pass
    unchanged (they have no connection to wrap).

    ``compose(transport, strategy, layers=[KitLayer], options={"kit_recorder": recorder})``.
    """

    # Options (KitLayerOptions declares them and their defaults).
    kit_timeout: float
    kit_recorder: Recorder | None

    def prepare_request(self, request: Any, client_address: Any) -> tuple[Any, Any]:
        """Peek at two bytes within ``kit_timeout``; return ``Wrapped`` and ``KIT_ADDRESS``.

        :raises sockserve.LayerError: "timeout", "refused" or "closed".
        """
        request, client_address = super().prepare_request(request, client_address)  # type: ignore[misc]
        if isinstance(request, tuple):
            return request, client_address
        previous = request.gettimeout()
        deadline = time.monotonic() + self.kit_timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                request.settimeout(left)
                seen = request.recv(GREETING, socket.MSG_PEEK)
                if seen[:1] == REFUSE:
                    raise sockserve.LayerError("refused", client_address, "the client sent '!'")
                if not seen:
                    raise sockserve.LayerError("closed", client_address, "the client sent nothing")
                if len(seen) >= GREETING:
                    break
                time.sleep(0.01)  # one byte so far: a dripping client
        except TimeoutError:
            raise sockserve.LayerError(
                "timeout", client_address, f"no {GREETING} bytes within {self.kit_timeout}s"
            ) from None
        finally:
            request.settimeout(previous)
        return Wrapped(request, self.kit_recorder), KIT_ADDRESS
