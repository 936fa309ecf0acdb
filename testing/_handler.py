"""``KitHandler``: the request handler every kit scenario serves with."""

from __future__ import annotations

import json
import os
import time

import sockserve

from ._harness import TIMEOUT, fd_targets, read_line
from ._recorder import Recorder

__all__ = ["SLOW", "STUCK_LIMIT", "KitHandler", "PlannedFailure"]

#: Seconds a ``slow`` request works between its two replies.
SLOW = 0.5
#: Seconds a ``stuck`` handler waits for a byte that never comes: far beyond any drain
#: deadline the kit sets, so only a cut-off ends the wait in time.
STUCK_LIMIT = 20.0


class PlannedFailure(Exception):
    """What the kit's handler raises for a ``fail`` request."""


class KitHandler(sockserve.BaseRequestHandler):
    """The kit's handler, for stream and datagram requests.

    A stream request is one line; the reply depends on it:

    - ``fail``: raise ``PlannedFailure`` (no reply);
    - ``slow``: ``started\\n``, then after ``SLOW`` seconds ``done\\n``;
    - ``stuck``: ``started\\n``, then wait up to ``STUCK_LIMIT`` seconds for a byte that
      never comes (noted as ``stuck_end`` with what the wait got);
    - ``fds``: one JSON line: this process's pid and descriptors;
    - anything else: the line upper-cased.

    A datagram is answered upper-cased (``fail`` raises). With a ``recorder`` (set on a
    subclass: ``KitHandler.recording(recorder)``), every request is noted as ``handler``
    with what the handler saw: the request's type, the client address, the types of the
    server's ``in_flight`` requests, its pid.
    """

    recorder: Recorder | None = None

    @classmethod
    def recording(cls, recorder: Recorder) -> type[KitHandler]:
        """A subclass noting each request to *recorder*."""
        return type(cls.__name__, (cls,), {"recorder": recorder})

    def handle(self) -> None:
        if isinstance(self.request, tuple):
            data, sock = self.request
            self._note(data)
            if data == b"fail":
                raise PlannedFailure("kit: a planned failure")
            sock.sendto(data.upper(), self.client_address)
            return
        request = self.request
        request.settimeout(TIMEOUT)
        line = read_line(request)
        command = line.strip()
        self._note(command)
        if command == b"fail":
            raise PlannedFailure("kit: a planned failure")
        if command == b"slow":
            request.sendall(b"started\n")
            time.sleep(SLOW)
            request.sendall(b"done\n")
        elif command == b"stuck":
            request.sendall(b"started\n")
            request.settimeout(STUCK_LIMIT)
            try:
                got = repr(request.recv(1))
            except OSError as exc:
                got = type(exc).__name__
            if self.recorder is not None:
                self.recorder.note("stuck_end", got=got)
        elif command == b"fds":
            report = {"pid": os.getpid(), "fds": fd_targets(),
                      "request_fd": request.fileno()}
            request.sendall(json.dumps(report).encode() + b"\n")
        else:
            request.sendall(line.upper())

    def _note(self, command: bytes) -> None:
        if self.recorder is not None:
            in_flight = getattr(self.server, "in_flight", ())
            self.recorder.note(
                "handler", command=command.decode(errors="replace"),
                request=type(self.request).__name__, client=self.client_address,
                in_flight=[type(r).__name__ for r in in_flight],
            )
