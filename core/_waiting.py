"""The waiting room: accepted stream connections that wait in the serve loop's poller for
their first byte before a worker gets them (``BaseServer.when_readable``).

A connection that sends nothing holds a descriptor here, not a thread or a process. The
serve loop polls every waiting connection beside the listening socket; one that becomes
readable (data, or the peer closing) is handed to its strategy's ``then``, one that is still
silent at its deadline is denied (``first-byte``). Only the serving thread touches it.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["WaitingRoom", "Waiting"]


class Waiting(NamedTuple):
    """One connection in the waiting room."""

    request: Any
    client_address: Any
    #: Called with (request, client_address) once it is readable: the strategy's hand-over.
    then: Callable[[Any, Any], Any]
    seq: int


class WaitingRoom:
    """The connections waiting for their first byte, by descriptor, with their deadlines."""

    __slots__ = ("entries", "deadlines", "new", "seq")

    def __init__(self) -> None:
        #: fd -> the connection waiting on it.
        self.entries: dict[int, Waiting] = {}
        #: (deadline, seq, fd), a heap; entries handed over meanwhile are skipped.
        self.deadlines: list[tuple[float, int, int]] = []
        #: fds added since the serve loop last registered them with its poller.
        self.new: list[int] = []
        self.seq = 0

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, request: Any, client_address: Any, then: Callable[[Any, Any], Any],
            timeout: float | None) -> None:
        fd = request.fileno()
        self.seq += 1
        self.entries[fd] = Waiting(request, client_address, then, self.seq)
        if timeout is not None:
            heapq.heappush(self.deadlines, (time.monotonic() + timeout, self.seq, fd))
        self.new.append(fd)

    def take(self, fd: int) -> Waiting | None:
        """The connection waiting on *fd*, out of the room; None if there is none."""
        return self.entries.pop(fd, None)

    def _prune(self) -> None:
        deadlines, entries = self.deadlines, self.entries
        while deadlines:
            _, seq, fd = deadlines[0]
            entry = entries.get(fd)
            if entry is not None and entry.seq == seq:
                return
            heapq.heappop(deadlines)

    def poll_timeout(self, timeout_ms: float | None) -> float | None:
        """*timeout_ms* (the loop's poll timeout), shortened to the next deadline."""
        self._prune()
        if not self.deadlines:
            return timeout_ms
        left = max(0, math.ceil((self.deadlines[0][0] - time.monotonic()) * 1000))
        return left if timeout_ms is None else min(timeout_ms, left)

    def expired(self) -> list[tuple[int, Waiting]]:
        """Take out the connections whose deadline has passed: [(fd, entry)]."""
        self._prune()
        deadlines, entries = self.deadlines, self.entries
        if not deadlines or deadlines[0][0] > time.monotonic():
            return []
        now = time.monotonic()
        out = []
        while deadlines and deadlines[0][0] <= now:
            _, seq, fd = heapq.heappop(deadlines)
            entry = entries.get(fd)
            if entry is not None and entry.seq == seq:
                del entries[fd]
                out.append((fd, entry))
        return out

    def take_all(self) -> list[Waiting]:
        """Empty the room; return what waited."""
        out = list(self.entries.values())
        self.entries.clear()
        self.deadlines.clear()
        self.new.clear()
        return out
