"""The ``threading`` strategy: a new thread per request (``ThreadingMixIn``)."""

from __future__ import annotations

import threading
from typing import Any, TYPE_CHECKING

import attrs

from ..core._options import declare_options, flag
from ._drain import drain_deadline, wait_threads

__all__ = ["ThreadingMixIn"]

if TYPE_CHECKING:  # what type checkers see under the mixin: the server it is composed over
    from ..core import BaseServer as _ServerClass
else:
    _ServerClass = object


class _RequestThread(threading.Thread):
    """A request's thread; it drops out of its server's set when it ends.

    The standard module keeps finished threads in a list until the next request prunes
    it; removing each thread as it ends keeps nothing around and costs O(1).
    """

    def __init__(self, owner: set[threading.Thread] | None, target: Any, args: tuple[Any, Any]):
        super().__init__(target=target, args=args)
        self._owner = owner

    def run(self) -> None:
        try:
            super().run()
        finally:
            owner = self._owner
            if owner is not None:
                owner.discard(self)


@attrs.define
class ThreadingOptions:
    """Options of the threading strategy (the standard module's defaults)."""

    #: Make request threads daemon threads (they do not keep the process alive).
    daemon_threads: bool = flag(default=False)
    #: server_close() waits for the request threads to finish.
    block_on_close: bool = flag(default=True)


@declare_options(ThreadingOptions)
class ThreadingMixIn(_ServerClass):
    """Handle each request in a new thread.

    ``server_close()`` waits for the (non-daemon) request threads when ``block_on_close`` is true
    (the default), at most ``drain_timeout`` seconds when that is set; threads still
    running then have their connections shut down (logged and counted).
    """

    # Class attributes made from ThreadingOptions' defaults (declare_options).
    daemon_threads: bool
    block_on_close: bool
    _threads: set[threading.Thread] | None = None

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Run one request in its thread: layers, handler, errors, shut down."""
        self.run_request(request, client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a new thread to process the request."""
        threads = self._threads
        if threads is None and self.block_on_close:
            threads = self._threads = set()
        if self.daemon_threads:
            threads = None  # daemon threads are not waited for, as documented
        thread = _RequestThread(threads, self.process_request_thread, (request, client_address))
        thread.daemon = self.daemon_threads
        if threads is not None:
            threads.add(thread)
        try:
            thread.start()
        except BaseException:
            if threads is not None:
                threads.discard(thread)
            raise

    def server_close(self) -> None:
        """Close the server, then wait for the request threads (see ``block_on_close``)."""
        super().server_close()
        threads = self._threads
        if threads:
            wait_threads(self, threads.copy(), drain_deadline(self))


# Report the public home in reprs, tracebacks and pickles.
ThreadingMixIn.__module__ = "sockserve"
