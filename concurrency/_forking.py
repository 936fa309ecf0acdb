"""The ``forking`` strategy: a new child process per request (``ForkingMixIn``)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import attrs

from ..core._options import count, flag

__all__ = ["ForkingMixIn", "exit_child"]

log = logging.getLogger("sockserve")

#: The standard module's defaults, kept: handle_request() waits 300 s, and at most 40
#: children run at once (the 41st request waits for one to exit).
TIMEOUT = 300
MAX_CHILDREN = 40
#: After the drain deadline, children get SIGTERM and this long to exit before SIGKILL.
TERMINATE_GRACE = 1.0
#: How often server_close() looks for exited children while a drain deadline runs.
REAP_INTERVAL = 0.01


@attrs.define
class ForkingOptions:
    """Options of the forking strategy."""

    max_children: int = count(1)
    block_on_close: bool = flag()


def exit_child(body: Callable[[], int]) -> NoReturn:
    """In a forked child: run *body*, then leave through ``os._exit`` with its status.

    Whatever happens (an exception, SystemExit, KeyboardInterrupt), the child never
    returns into the parent's serve loop; it exits 1 when *body* did not return.
    Standard streams are flushed first, because ``os._exit`` skips that.
    """
    status = 1
    try:
        status = body()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


class ForkingMixIn:
    """Handle each request in a new child process.

    Exited children are reaped in ``service_actions`` and ``handle_timeout``, and when
    ``max_children`` are running. A child whose handler raises reports it through
    ``handle_error`` and exits with status 1; a child never returns into the parent's
    loop, whatever happens in it. ``server_close()`` waits for the children when
    ``block_on_close`` is true, at most ``drain_timeout`` seconds if set (then they get
    SIGTERM, and SIGKILL after ``TERMINATE_GRACE`` seconds).
    """

    sockserve_options = ForkingOptions
    timeout: float | None = TIMEOUT
    #: Process ids of the children not yet reaped (None before the first fork).
    active_children: set[int] | None = None
    #: At most this many children at once; beyond it, the loop waits for one to exit.
    max_children = MAX_CHILDREN
    #: server_close() waits for the children to exit.
    block_on_close = True

    def collect_children(self, *, blocking: bool = False) -> None:
        """Reap exited children; with *blocking*, wait until all have exited."""
        children = self.active_children
        if children is None:
            return
        # Over the limit: wait for any child to exit before accepting more.
        while len(children) >= self.max_children:
            try:
                pid, _ = os.waitpid(-1, 0)
                children.discard(pid)
            except ChildProcessError:
                children.clear()  # none of ours is left
            except OSError:
                break
        flags = 0 if blocking else os.WNOHANG
        for pid in children.copy():
            try:
                reaped, _ = os.waitpid(pid, flags)
                children.discard(reaped)
            except ChildProcessError:
                children.discard(pid)  # already reaped elsewhere
            except OSError:
                pass

    def handle_timeout(self) -> None:
        """Reap exited children when handle_request() times out."""
        self.collect_children()

    def service_actions(self) -> None:
        """Reap exited children on every turn of serve_forever()."""
        self.collect_children()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Fork a child to handle the request; the parent closes its copy."""
        pid = os.fork()
        if pid:
            if self.active_children is None:
                self.active_children = set()
            self.active_children.add(pid)
            self.close_request(request)  # type: ignore[attr-defined]
            return
        # The child must not share the parent's wake-up socket: a handler calling
        # server.shutdown() would wake the parent's loop with no stop asked for there.
        self._sockserve_after_fork()  # type: ignore[attr-defined]
        exit_child(lambda: 0 if self.run_request(request, client_address) else 1)  # type: ignore[attr-defined]

    def server_close(self) -> None:
        """Close the server, then reap the children (see ``block_on_close``)."""
        super().server_close()  # type: ignore[misc]
        drain = self.drain_timeout  # type: ignore[attr-defined]
        if not self.block_on_close or drain is None or not self.active_children:
            self.collect_children(blocking=self.block_on_close)
            return
        deadline = time.monotonic() + drain
        while self.active_children and time.monotonic() < deadline:
            self.collect_children()
            if self.active_children:
                time.sleep(REAP_INTERVAL)
        self._terminate_children()

    def _terminate_children(self) -> None:
        children = self.active_children
        if not children:
            return
        count = len(children)
        self.requests_cut_off += count  # type: ignore[attr-defined]
        log.warning(
            "%s: drain deadline of %ss passed; terminating %d child process(es)",
            type(self).__name__,
            self.drain_timeout,  # type: ignore[attr-defined]
            count,
        )
        for sig, wait in ((signal.SIGTERM, TERMINATE_GRACE), (signal.SIGKILL, None)):
            for pid in children.copy():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = None if wait is None else time.monotonic() + wait
            while children and (end is None or time.monotonic() < end):
                self.collect_children(blocking=end is None)
                if children and end is not None:
                    time.sleep(REAP_INTERVAL)
            if not children:
                return


# Report the public home in reprs, tracebacks and pickles.
ForkingMixIn.__module__ = "sockserve"
