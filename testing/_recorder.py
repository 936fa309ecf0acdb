"""``Recorder``: a lifecycle plugin that writes every hook it sees to a file, one JSON line each.

A file, not a list in memory, because hooks fire in whichever process runs the request: a
forked child, a prefork worker, a process-pool worker. Each line is one ``os.write`` to a
descriptor opened with ``O_APPEND``, so lines from several processes never interleave, and
the test process reads them all back.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sockserve

__all__ = ["Recorder", "plain"]

#: Seconds ``Recorder.wait_for`` waits by default: far beyond any scenario's own timing,
#: short enough that a missing hook fails the test instead of stalling it.
WAIT = 10.0
#: How often ``wait_for`` reads the file again.
POLL = 0.01


def plain(value: Any) -> Any:
    """*value* as JSON can hold it: tuples as lists, bytes and other objects by ``repr``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    return repr(value)


def _kind(request: Any) -> str:
    """The type name of a request as a hook sees it: ``socket``, ``tuple``, ``Wrapped``..."""
    return type(request).__name__


class Recorder:
    """Record every lifecycle hook, from every process, as JSON lines in *path*.

    Give it to ``sockserve.compose(..., plugins=[recorder])``. Each line has ``event``
    (the hook's short name, ``request_finish``), ``pid``, ``thread`` and what the hook
    received: ``request`` (the request's type name: ``socket``, ``tuple`` for a datagram,
    or the class a layer wrapped it in), ``client`` (the client address), ``exc`` (the
    exception's type name and text, or None), ``reason``, ``worker_id``, ``status``.
    Every hook implementation returns None, so the recorder never decides anything.
    ``sockserve_service_actions`` is not recorded: it fires on every loop turn.

    Handlers and layers under test add their own lines with ``note``.

    :param path: the file to append to (created on the first line); use a file in
        pytest's ``tmp_path``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        #: The JSON-lines file.
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Recorder({str(self.path)!r})"

    # ------------------------------------------------------------------ writing and reading

    def note(self, event: str, **fields: Any) -> None:
        """Append one line: *event*, this process and thread, and *fields*."""
        line = {"event": event, "pid": os.getpid(), "thread": threading.get_ident(),
                "time": time.monotonic(), **{k: plain(v) for k, v in fields.items()}}
        data = json.dumps(line).encode() + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def events(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """The lines written so far, oldest first: all, or those of *event* whose fields
        equal *match* (``recorder.events("request_denied", reason="timeout")``)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        found = []
        wanted = {k: plain(v) for k, v in match.items()}
        for raw in text.splitlines():
            if not raw:
                continue
            line = json.loads(raw)
            if event is not None and line["event"] != event:
                continue
            if all(line.get(k) == v for k, v in wanted.items()):
                found.append(line)
        return found

    def wait_for(
        self, event: str, count: int = 1, timeout: float = WAIT, **match: Any
    ) -> list[dict[str, Any]]:
        """Wait until *count* lines of *event* (matching *match*) are written; return them.

        :raises AssertionError: fewer than *count* within *timeout* seconds (the message
            lists every line written).
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(event, **match)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{count} {event!r} line(s) matching {match} expected within {timeout}s, "
                    f"got {len(found)}; all lines: {self.events()}"
                )
            time.sleep(POLL)

    # ------------------------------------------------------------------ the hooks

    @sockserve.hookimpl
    def sockserve_server_activate(self, server: Any) -> None:
        self.note("server_activate")

    @sockserve.hookimpl
    def sockserve_serve_start(self, server: Any) -> None:
        self.note("serve_start")

    @sockserve.hookimpl
    def sockserve_serve_stop(self, server: Any) -> None:
        self.note("serve_stop")

    @sockserve.hookimpl
    def sockserve_verify_request(self, server: Any, request: Any, client_address: Any) -> None:
        self.note("verify_request", request=_kind(request), client=client_address)

    @sockserve.hookimpl
    def sockserve_request_prepared(self, server: Any, request: Any, client_address: Any) -> None:
        self.note("request_prepared", request=_kind(request), client=client_address)

    @sockserve.hookimpl
    def sockserve_request_denied(
        self, server: Any, request: Any, client_address: Any, reason: str
    ) -> None:
        self.note("request_denied", request=_kind(request), client=client_address, reason=reason)

    @sockserve.hookimpl
    def sockserve_request_start(self, server: Any, request: Any, client_address: Any) -> None:
        self.note("request_start", request=_kind(request), client=client_address)

    @sockserve.hookimpl
    def sockserve_request_finish(
        self, server: Any, request: Any, client_address: Any, exc: BaseException | None
    ) -> None:
        self.note("request_finish", request=_kind(request), client=client_address,
                  exc=None if exc is None else f"{type(exc).__name__}: {exc}")

    @sockserve.hookimpl
    def sockserve_handle_error(
        self, server: Any, request: Any, client_address: Any, exc: BaseException
    ) -> None:
        self.note("handle_error", request=_kind(request), client=client_address,
                  exc=f"{type(exc).__name__}: {exc}")

    @sockserve.hookimpl
    def sockserve_server_close(self, server: Any) -> None:
        self.note("server_close")

    @sockserve.hookimpl
    def sockserve_server_closed(self, server: Any) -> None:
        self.note("server_closed", requests_cut_off=server.requests_cut_off)

    @sockserve.hookimpl
    def sockserve_pre_fork(self, server: Any, worker_id: int) -> None:
        self.note("pre_fork", worker_id=worker_id)

    @sockserve.hookimpl
    def sockserve_post_fork(self, server: Any, worker_id: int) -> None:
        self.note("post_fork", worker_id=worker_id)

    @sockserve.hookimpl
    def sockserve_worker_exit(self, server: Any, worker_id: int, status: int) -> None:
        self.note("worker_exit", worker_id=worker_id, status=status)
