"""The ``sync`` strategy: the serving thread runs each request itself.

That is ``BaseServer``'s own behaviour, so the mixin is empty, and ``compose`` turns a
transport composed with an empty mixin into the transport class itself:
``compose("tcp", "sync") is TCPServer``.
"""

from __future__ import annotations

__all__ = ["SyncMixIn"]


class SyncMixIn:
    """Handle every request in the serving thread, one at a time."""


# Report the public home in reprs, tracebacks and pickles.
SyncMixIn.__module__ = "sockserve"
