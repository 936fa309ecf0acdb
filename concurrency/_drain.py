"""The pieces every strategy's drain is made of, public for third-party strategies.

A drain waits for in-flight work until the server's ``drain_timeout`` (None: as long as it
takes) or until ``server.end_drain()`` (a second Ctrl-C), then cuts off what is left:

- threads: ``wait_threads`` joins them; late ones get their connections shut down
  (``server.cut_off(server.in_flight)``) and ``CUT_OFF_GRACE`` seconds to return;
- processes: ``stop_processes`` reaps them; late ones get SIGTERM, then SIGKILL after
  ``TERMINATE_GRACE`` seconds. Only the given process ids are ever waited for, never
  ``waitpid(-1)``: children the application started itself are not ours to reap.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterable, MutableSet

from ..core._contract import Server

__all__ = [
    "CUT_OFF_GRACE",
    "TERMINATE_GRACE",
    "drain_deadline",
    "wait_threads",
    "reap",
    "stop_processes",
]

log = logging.getLogger("sockserve")

#: Seconds a thread gets to return after its connection was cut off: enough for a
#: handler blocked in recv/send to see the error and unwind.
CUT_OFF_GRACE = 1.0
#: Seconds a process gets between SIGTERM and SIGKILL.
TERMINATE_GRACE = 1.0
#: How often a drain looks at processes, and at ``end_drain()`` while joining threads.
POLL = 0.01


def drain_deadline(server: Server) -> float | None:
    """The monotonic time a drain starting now ends, from ``server.drain_timeout``."""
    drain = server.drain_timeout
    return None if drain is None else time.monotonic() + drain


def _remaining(server: Server, deadline: float | None) -> float | None:
    """Seconds left until *deadline* (None: no limit); 0 once ``end_drain()`` was called."""
    if server.drain_ended:
        return 0.0
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def wait_threads(
    server: Server,
    threads: Iterable[threading.Thread],
    deadline: float | None,
    *,
    before_cut_off: Callable[[], object] | None = None,
) -> int:
    """Wait for *threads* until *deadline*; cut off and briefly wait for the late ones.

    *before_cut_off* runs at the deadline, before the in-flight requests are cut off (a
    pool denies what is still queued there).

    :returns: how many are still running after the cut-off grace (logged).
    """
    threads = [t for t in threads if t is not threading.current_thread()]
    for thread in threads:
        while thread.is_alive():
            remaining = _remaining(server, deadline)
            if remaining == 0.0:
                break
            thread.join(POLL if remaining is None else min(remaining, POLL * 10))
    late = [t for t in threads if t.is_alive()]
    if not late:
        return 0
    if before_cut_off is not None:
        before_cut_off()
    server.cut_off(server.in_flight)
    grace_end = time.monotonic() + CUT_OFF_GRACE
    for thread in late:
        thread.join(max(0.0, grace_end - time.monotonic()))
    stuck = sum(t.is_alive() for t in late)
    if stuck:
        log.error("%s: %d thread(s) still running after cut-off", type(server).__name__, stuck)
    return stuck


def reap(pids: MutableSet[int], *, block: bool = False) -> list[tuple[int, int]]:
    """Reap those of *pids* that exited (all of them, with *block*); remove them from it.

    :returns: ``(pid, exit code)`` pairs, the code as ``os.waitstatus_to_exitcode``
        gives it (negative: killed by that signal).
    """
    flags = 0 if block else os.WNOHANG
    done = []
    for pid in list(pids):
        try:
            reaped, status = os.waitpid(pid, flags)
        except ChildProcessError:  # reaped by someone else already
            pids.discard(pid)
            continue
        if reaped:
            pids.discard(pid)
            done.append((pid, os.waitstatus_to_exitcode(status)))
    return done


def _signal(pids: Collection[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_processes(
    server: Server,
    pids: MutableSet[int],
    deadline: float | None,
    *,
    term_first: bool = False,
    grace: float = TERMINATE_GRACE,
    on_exit: Callable[[int, int], object] | None = None,
    cut_off: Callable[[], object] | None = None,
) -> int:
    """Stop child processes *pids*: wait until *deadline*, then SIGTERM, then SIGKILL.

    With *term_first*, SIGTERM is sent at once (to workers that drain on SIGTERM and
    enforce the deadline themselves) and SIGKILL follows *grace* seconds after the
    deadline. *cut_off*, if given, runs at the deadline first
    (shut down the connections the processes still serve: ``server.cut_off(...)`` on
    the parent's copies) and the processes get ``CUT_OFF_GRACE`` seconds to finish
    before any signal. *on_exit* is called with ``(pid, exit code)`` for every child
    reaped. *pids* is empty afterwards.

    :returns: how many processes had to be signalled after the deadline (SIGTERM, or
        with *term_first* SIGKILL).
    """

    def wait(until: float | None) -> None:
        while pids and (until is None or time.monotonic() < until) and not server.drain_ended:
            for pid, code in reap(pids):
                if on_exit is not None:
                    on_exit(pid, code)
            if pids:
                time.sleep(POLL)

    if term_first:
        _signal(pids, signal.SIGTERM)
    wait(deadline)
    late = len(pids)
    if not pids:
        return 0
    if cut_off is not None:
        cut_off()
        wait(time.monotonic() + CUT_OFF_GRACE)
        if not pids:
            return late
    why = "drain ended early" if server.drain_ended else f"drain deadline of {server.drain_timeout}s passed"
    name = type(server).__name__
    if not term_first:
        log.warning("%s: %s; terminating %d child process(es)", name, why, late)
        _signal(pids, signal.SIGTERM)
        wait(time.monotonic() + grace)
        if pids:
            log.info("%s: killing %d process(es)", name, len(pids))
    else:  # they had SIGTERM at the start: a last grace, then SIGKILL
        wait(time.monotonic() + grace)
        late = len(pids)
        if pids:
            log.warning("%s: %s; killing %d process(es)", name, why, late)
    if pids:
        _signal(pids, signal.SIGKILL)
        for pid, code in reap(pids, block=True):
            if on_exit is not None:
                on_exit(pid, code)
    return late
