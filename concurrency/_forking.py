"""The ``forking`` strategy: a new child process per request (``ForkingMixIn``)."""

from __future__ import annotations

import os
import select
import signal
import threading
from typing import Any, TYPE_CHECKING

import attrs

from ..core._options import count, declare_options, flag
from ._supervise import exit_child, stop_listening
from ._drain import drain_deadline, reap, stop_processes

__all__ = ["ForkingMixIn", "exit_child"]

if TYPE_CHECKING:  # what type checkers see under the mixin: the server it is composed over
    from ..core import BaseServer as _ServerClass
else:
    _ServerClass = object

#: The standard module's defaults, kept: handle_request() waits 300 s, and at most 40
#: children run at once (the 41st request waits for one to exit).
TIMEOUT = 300
MAX_CHILDREN = 40


@attrs.define
class ForkingOptions:
    """Options of the forking strategy."""

    #: At most this many children at once; beyond it, accepting pauses until one exits.
    max_children: int = count(1, default=MAX_CHILDREN)
    #: server_close() waits for the children to exit.
    block_on_close: bool = flag(default=True)


@declare_options(ForkingOptions)
class ForkingMixIn(_ServerClass):
    """Handle each request in a new child process.

    Exited children are reaped in ``service_actions`` and ``handle_timeout``. At
    ``max_children`` the server pauses accepting (the listen backlog holds new
    connections) until a child exits; only its own children are ever waited for. A child
    whose handler raises reports it through ``handle_error`` and exits with status 1; a
    child never returns into the parent's loop, whatever happens in it, and closes its
    copy of a listening socket at once. ``server_close()`` waits for the children when
    ``block_on_close`` is true, at most ``drain_timeout`` seconds if set (then they get
    SIGTERM, and SIGKILL a second later).
    """

    timeout: float | None = TIMEOUT
    #: Process ids of the children not yet reaped (None before the first fork).
    active_children: set[int] | None = None
    # Options (ForkingOptions declares them and their defaults).
    max_children: int
    block_on_close: bool
    _at_limit = False

    def collect_children(self, *, blocking: bool = False) -> None:
        """Reap exited children; with *blocking*, wait until all have exited."""
        children = self.active_children
        if children is None:
            return
        reap(children, block=blocking)
        if self._at_limit and len(children) < self.max_children:
            self._at_limit = False
            self.resume_accepting()

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
            self.close_request(request)
            self.request_moved(request)  # it runs in the child (max_connections)
            if len(self.active_children) >= self.max_children:
                self._pause_for(pid)
            return
        # The child must not share the parent's wake-up socket (a handler calling
        # server.shutdown() would wake the parent's loop), nor keep the listening socket
        # open (clients would connect to it after the parent closed it).
        self.after_fork()
        stop_listening(self)  # every stream listening socket (add_listener's too)
        # The drain's SIGTERM at its deadline (not a handler inherited from the parent,
        # such as the command line's): the connection is cut off through cut_off(), so
        # the socket a layer made (TLS) is shut down and the handler returns.
        signal.signal(signal.SIGTERM, self._terminated)
        exit_child(lambda: 0 if self.run_request(request, client_address) else 1)

    def _terminated(self, signum: int, frame: Any) -> None:
        # A handler blocked on its connection returns now and the child exits as after
        # any request (the finish hooks fire); one that does not is killed after the
        # grace (stop_processes). With nothing to cut off, the signal does what it does.
        if not self.cut_off(self.in_flight):
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _pause_for(self, newest: int) -> None:
        """At the limit: stop accepting until one of our children exits.

        A thread waits on the children's pidfds and wakes the loop, which reaps them
        in ``service_actions`` and resumes; without pidfds, the loop's turns do.
        """
        self._at_limit = True
        self.pause_accepting()
        if not hasattr(os, "pidfd_open"):
            return
        fds = []
        for pid in list(self.active_children or ()):
            try:
                fds.append(os.pidfd_open(pid))
            except OSError:  # exited and reaped meanwhile, or no pidfd support
                pass

        def wait() -> None:
            try:
                select.select(fds, [], [])
            finally:
                for fd in fds:
                    os.close(fd)
            self.resume_accepting()

        threading.Thread(target=wait, name="sockserve-fork-limit", daemon=True).start()

    def server_close(self) -> None:
        """Close the server, then reap the children (see ``block_on_close``)."""
        super().server_close()
        children = self.active_children
        if not children:
            return
        if not self.block_on_close:
            reap(children)
            return
        late = stop_processes(self, children, drain_deadline(self))
        self.requests_cut_off += late


# Report the public home in reprs, tracebacks and pickles.
ForkingMixIn.__module__ = "sockserve"
