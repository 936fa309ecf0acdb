"""A layer and a transport that ``tests/test_author_bugs.py`` installs through entry points
(a ``*.dist-info`` written to a temporary folder, this folder on PYTHONPATH), so that a
``sockserve`` process finds them the way it finds any third party's."""

from __future__ import annotations

import socket
from typing import Any

import sockserve


class TaggedSocket:
    """A connection wrapped by the layer: every call goes on to the socket inside."""

    def __init__(self, sock: socket.socket) -> None:
        self.wrapped = sock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


class AuthorTagLayer:
    """Wrap the connection in a ``TaggedSocket`` and tag the client address."""

    def prepare_request(self, request: Any, client_address: Any) -> tuple[Any, Any]:
        request, client_address = super().prepare_request(  # type: ignore[misc]
            request, client_address
        )
        return TaggedSocket(request), ("tagged-by-layer", client_address[1])


#: A third party's transport, with the description ``sockserve plugins`` is to show.
DESCRIBED_TCP = sockserve.Transport(
    "described-tcp",
    "inet",
    "stream",
    "DescribedTCP",
    description="TCP with a description from a third party",
)
