"""The layer stage's scenarios (DESIGN.md section 6): what ``prepare_request`` returns is
what the handler, the worker-side hooks, ``handle_error``, ``in_flight``, the access log,
``shutdown_request`` and the drain's cut-off see; a layer that fails denies the request in
one line, without a traceback.

Each is a function of a ``Subject`` whose layers are the ones under test (``KitLayer`` for
a strategy's tests, a third party's layer for ``LayerTests``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import sockserve

from ._harness import (
    TIMEOUT,
    Subject,
    access_log_to,
    ask,
    read_to_eof,
    serving,
)
from ._handler import KitHandler
from ._recorder import Recorder, plain
from ._scenarios import DEADLINE, OVERRUN, recording_errors, run_stuck

__all__ = ["layer_cut_off", "layer_denied", "layer_result_seen_everywhere", "shown_client"]


def shown_client(address: Any) -> str:
    """A client address as the access log shows it (``host:port``, ``[v6]:port``, ``-``)."""
    if isinstance(address, (tuple, list)) and len(address) >= 2:
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in str(host) else f"{host}:{address[1]}"
    return repr(address) if address else "-"


def _wait_lines(path: Path, count: int) -> list[str]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.01)


def layer_result_seen_everywhere(
    subject: Subject,
    recorder: Recorder,
    log_path: Path,
    *,
    layer_options: dict[str, Any],
    expected_request: str | None = None,
    expected_client: Any = None,
) -> list[dict[str, Any]]:
    """Two requests through the layers, one that succeeds and one whose handler raises.

    The handler, ``in_flight``, ``request_prepared``, ``request_start``,
    ``request_finish``, the ``handle_error`` hook and method, and the access log all see
    one and the same request type and client address: *expected_request* (a type name)
    and *expected_client* when given, else whatever the handler saw.

    :returns: the handler's lines (for checks a layer of its own adds).
    """
    access_log = sockserve.registry.load("plugin", "access-log")
    cls = recording_errors(
        subject.server_class(plugins=[recorder, access_log], **layer_options), recorder
    )
    with access_log_to(log_path):
        with serving(subject.make(cls, KitHandler.recording(recorder))) as server:
            assert ask(subject, server, b"hello\n") == b"HELLO\n"
            assert ask(subject, server, b"fail\n") == b""
            recorder.wait_for("request_finish", 2)
        lines = _wait_lines(log_path, 2)
    handled = recorder.events("handler")
    assert [h["command"] for h in handled] == ["hello", "fail"], handled
    kind = expected_request or handled[0]["request"]
    # Without an expected address, each request is checked against what its own handler
    # saw: two connections of a layer that keeps the peer's address differ in their ports.
    clients = [plain(expected_client) if expected_client is not None else h["client"]
               for h in handled]
    for line, client in zip(handled, clients, strict=True):
        assert (line["request"], line["client"]) == (kind, client), (
            f"the handler saw {line['request']} from {line['client']}, expected {kind} from {client}"
        )
        assert kind in line["in_flight"], f"in_flight held {line['in_flight']}, not the {kind}"
    for hook in ("request_prepared", "request_start", "request_finish", "handle_error",
                 "handle_error_method"):
        seen = [(e["request"], e["client"]) for e in recorder.events(hook)]
        wanted = clients[1:] if hook.startswith("handle_error") else clients  # "fail" raised
        assert seen == [(kind, c) for c in wanted], f"{hook} saw {seen}, expected {kind} from {wanted}"
    outcomes = [e["exc"] for e in recorder.events("request_finish")]
    assert outcomes == [None, "PlannedFailure: kit: a planned failure"], outcomes
    assert len(lines) == 2, f"access log: {lines}"
    ok, failed = (shown_client(c) for c in clients)
    assert lines[0].startswith(f"{ok} ") and lines[0].endswith(" ok"), lines
    assert lines[1].startswith(f"{failed} ") and " error PlannedFailure: " in lines[1], lines
    return handled


def layer_cut_off(
    subject: Subject, recorder: Recorder, *, layer_options: dict[str, Any], forks: bool
) -> list[dict[str, Any]]:
    """A handler stuck on the layer's connection is cut off at the drain deadline: the
    client sees EOF (or a reset) in time, the handler's wait ends with the cut-off (in
    whichever process it runs), and nothing stays in flight.

    :returns: the ``stuck_end`` lines.
    """
    cls = subject.server_class(plugins=[recorder], drain_timeout=DEADLINE, **layer_options)
    server, rest, ended = run_stuck(subject, cls, recorder)
    assert rest == b"", f"the stuck request sent {rest!r} instead of ending"
    assert DEADLINE * 0.9 <= ended < DEADLINE + OVERRUN, f"the connection ended after {ended:.3f}s"
    assert server.in_flight == (), server.in_flight
    handled = recorder.events("handler", command="stuck")
    assert handled and handled[0]["request"] in handled[0]["in_flight"], handled
    ends = recorder.events("stuck_end")
    assert len(ends) == 1 and ends[0]["got"] != "TimeoutError", (
        f"the handler's wait did not end at the cut-off in its worker (pid "
        f"{handled[0]['pid']}{', a forked process' if forks else ''}): stuck_end lines {ends}"
    )
    return ends


def layer_denied(
    subject: Subject,
    recorder: Recorder,
    log_path: Path,
    capfd: pytest.CaptureFixture[str],
    *,
    layer_options: dict[str, Any],
    reason: str,
    act: Callable[[Any], object],
) -> None:
    """A client that makes the layer fail (*act* does what it does on its connection) is
    denied: ``request_denied`` fires with *reason*, no handler and no ``request_start``
    runs, the client sees its connection end, the access log has a ``denied`` line,
    stderr shows no traceback, and the next client is served."""
    access_log = sockserve.registry.load("plugin", "access-log")
    cls = recording_errors(
        subject.server_class(plugins=[recorder, access_log], **layer_options), recorder
    )
    capfd.readouterr()  # what came before is not this scenario's
    with access_log_to(log_path):
        with serving(subject.make(cls, KitHandler.recording(recorder))) as server:
            with subject.connect(server, session=False) as client:
                act(client)
                try:
                    got = read_to_eof(client)
                except ConnectionResetError:
                    got = b""
            denied = recorder.wait_for("request_denied")
            assert ask(subject, server, b"after\n") == b"AFTER\n"
            recorder.wait_for("request_finish")
        lines = _wait_lines(log_path, 2)
    err = capfd.readouterr().err
    assert got == b"", f"a denied client got {got!r}"
    assert [d["reason"] for d in denied] == [reason], denied
    assert [h["command"] for h in recorder.events("handler")] == ["after"]
    assert len(recorder.events("request_start")) == 1
    assert len(recorder.events("request_finish")) == 1
    assert recorder.events("handle_error") == recorder.events("handle_error_method") == []
    assert "Traceback" not in err, f"a layer failure printed a traceback:\n{err}"
    assert any(line.endswith(f"- denied {reason}") for line in lines), f"access log: {lines}"
