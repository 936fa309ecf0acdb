"""The shared scenarios: echo, prompt shutdown, the drain, handler errors, many connections,
a closed server, after-fork hygiene.

Each is a function of a ``Subject`` (what to compose) and a ``Recorder``; the test classes
of ``_classes.py`` call them. The layer stage's scenarios are in ``_stage.py``. Slightly
over 400 lines: one function per scenario of DESIGN.md section 8, kept together.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

import sockserve
from sockserve.concurrency import CUT_OFF_GRACE, TERMINATE_GRACE

from ._harness import (
    TIMEOUT,
    Holdings,
    Subject,
    ask,
    bounded,
    child_pids,
    drive,
    fd_targets,
    is_refused,
    read_to_eof,
    read_until,
    serving,
    start,
    stop,
)
from ._handler import KitHandler
from ._recorder import Recorder

__all__ = [
    "DEADLINE",
    "PROMPT",
    "after_fork_hygiene",
    "closed_server_refuses",
    "drain_completes",
    "drain_deadline",
    "echo",
    "handler_error",
    "many_requests",
    "prompt_shutdown",
    "recording_errors",
    "run_stuck",
]

#: Seconds within which shutdown() of an idle server must return (its poll interval is
#: far longer: shutdown() must wake the loop, not wait for it).
PROMPT = 1.0
#: The poll interval of the prompt-shutdown scenario.
LONG_POLL = 10.0
#: The drain deadline of the deadline scenarios.
DEADLINE = 0.5
#: Seconds a client of a closed server waits to be told so (the kernel answers at once).
REFUSAL_WAIT = 2.0
#: Seconds the deadline may be overrun: the cut-off grace, a SIGTERM grace, scheduling.
OVERRUN = CUT_OFF_GRACE + TERMINATE_GRACE + 1.0


def recording_errors(cls: type, recorder: Recorder) -> type:
    """*cls* whose ``handle_error`` notes ``handle_error_method`` (and prints nothing)."""

    def handle_error(self: Any, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        recorder.note("handle_error_method", request=type(request).__name__,
                      client=client_address, exc=f"{type(exc).__name__}: {exc}")

    return type(cls.__name__, (cls,), {"handle_error": handle_error})


def _payloads(subject: Subject, count: int) -> list[bytes]:
    end = b"\n" if subject.is_stream() else b""
    return [b"hello %d%s" % (i, end) for i in range(count)]


# --------------------------------------------------------------------------- echo


def echo(subject: Subject, recorder: Recorder, *, forks: bool) -> None:
    """Three requests answered; each ran through ``run_request`` (request_start and
    request_finish fired once, without an exception, where the handler ran) in this
    process or, when the strategy *forks*, in another one; once closed, the server left
    no descriptor, thread or child behind."""
    before = Holdings.now()
    cls = subject.server_class(plugins=[recorder])
    payloads = _payloads(subject, 3)
    with serving(subject.make(cls, KitHandler.recording(recorder))) as server:
        replies = [ask(subject, server, p) for p in payloads]
        finished = recorder.wait_for("request_finish", len(payloads))
    assert replies == [p.upper() for p in payloads], replies
    assert [line["exc"] for line in finished] == [None] * len(payloads), finished
    started, handled = recorder.events("request_start"), recorder.events("handler")
    assert len(started) == len(handled) == len(payloads), (started, handled)

    def where(lines: list[dict[str, Any]]) -> list[tuple[int, int, str]]:
        return sorted((line["pid"], line["thread"], repr(line["client"])) for line in lines)

    assert where(started) == where(handled) == where(finished), (
        f"request_start, the handler and request_finish ran in different places: "
        f"{where(started)}, {where(handled)}, {where(finished)}"
    )
    pids = {line["pid"] for line in handled}
    if forks:
        assert os.getpid() not in pids, f"a forking strategy ran a handler in the parent: {pids}"
    else:
        assert pids == {os.getpid()}, f"handlers ran in other processes: {pids}"
    left = before.left_over()
    assert left == [], left


# --------------------------------------------------------------------------- shutdown


def prompt_shutdown(subject: Subject) -> None:
    """An idle server's ``shutdown()`` returns within PROMPT seconds although the loop
    polls only every LONG_POLL seconds; ``server_close()`` then returns promptly too."""
    cls = subject.server_class()
    server = subject.make(cls, KitHandler)
    thread = start(server, LONG_POLL)
    took = close_took = None
    try:
        payload = _payloads(subject, 1)[0]
        assert ask(subject, server, payload) == payload.upper()  # serving, workers up
        time.sleep(0.2)  # idle again, waiting in its poll
        took = bounded(server.shutdown, LONG_POLL + TIMEOUT, "shutdown()")
        thread.join(TIMEOUT)
    finally:
        if thread.is_alive():
            stop(server, thread)
        else:
            close_took = bounded(server.server_close, TIMEOUT * 3, "server_close()")
    assert not thread.is_alive(), "serve_forever did not return after shutdown()"
    assert took is not None and took < PROMPT, f"shutdown() of an idle server took {took:.3f}s"
    assert close_took is not None and close_took < PROMPT * 2, (
        f"server_close() of an idle server took {close_took:.3f}s"
    )


# --------------------------------------------------------------------------- the drain


def _closer(server: Any, thread: threading.Thread) -> tuple[threading.Thread, list[Any]]:
    """A started thread stopping *server* (shutdown, join, server_close); its outcome list
    gets the seconds it took, or the exception."""
    outcome: list[Any] = []

    def run() -> None:
        started = time.monotonic()
        try:
            stop(server, thread)
        except BaseException as exc:  # reported by the scenario
            outcome.append(exc)
        else:
            outcome.append(time.monotonic() - started)

    closer = threading.Thread(target=run, name="kit-closer", daemon=True)
    closer.start()
    return closer, outcome


def _joined(closer: threading.Thread, outcome: list[Any]) -> float:
    closer.join(TIMEOUT * 4)
    assert not closer.is_alive(), "shutdown() and server_close() did not return"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return float(outcome[0])


def drain_completes(subject: Subject, recorder: Recorder) -> None:
    """With ``drain_timeout=None``, a request in flight when the server stops completes:
    the client gets the whole reply, nothing is cut off, ``request_finish`` reports success."""
    cls = subject.server_class(plugins=[recorder], drain_timeout=None)
    server = subject.make(cls, KitHandler.recording(recorder))
    thread = start(server)
    closer = None
    try:
        with subject.connect(server) as client:
            client.sendall(b"slow\n")
            first = read_until(client, b"started\n")
            assert first.startswith(b"started\n"), first
            closer, outcome = _closer(server, thread)
            rest = first[len(b"started\n"):] + read_to_eof(client)
        took = _joined(closer, outcome)
    finally:
        if closer is None:
            stop(server, thread)
    assert rest == b"done\n", f"the request in flight did not complete: {rest!r}"
    assert server.requests_cut_off == 0
    finished = recorder.wait_for("request_finish")
    assert finished[0]["exc"] is None, finished
    assert server.in_flight == ()
    assert took < TIMEOUT * 2


def run_stuck(subject: Subject, cls: type, recorder: Recorder) -> tuple[Any, bytes, float]:
    """Serve a ``stuck`` request, stop the server, and time the client's view of it.

    :returns: the server (closed), what the client got after ``started`` (b"" for EOF or
        a reset), and the seconds from the start of ``shutdown()`` until the client's
        connection ended.
    """
    server = subject.make(cls, KitHandler.recording(recorder))
    thread = start(server)
    closer = None
    try:
        with subject.connect(server) as client:
            client.sendall(b"stuck\n")
            first = read_until(client, b"started\n")
            assert first == b"started\n", first
            recorder.wait_for("handler", command="stuck")  # in the handler now
            began = time.monotonic()
            closer, outcome = _closer(server, thread)
            try:
                rest = read_to_eof(client)
            except ConnectionResetError:
                rest = b""
            ended = time.monotonic() - began
        _joined(closer, outcome)
    finally:
        if closer is None:
            stop(server, thread)
    return server, rest, ended


def drain_deadline(subject: Subject, recorder: Recorder, *, forks: bool) -> None:
    """With ``drain_timeout=DEADLINE``, a handler stuck on its connection is cut off at the
    deadline: the client sees EOF (or a reset) no sooner and not much later, the cut-off is
    accounted (``requests_cut_off`` in the server, or the handler's wait ending in its
    worker), and nothing stays in flight."""
    cls = subject.server_class(plugins=[recorder], drain_timeout=DEADLINE)
    server, rest, ended = run_stuck(subject, cls, recorder)
    assert rest == b"", f"the stuck request sent {rest!r} instead of ending"
    assert DEADLINE * 0.9 <= ended, f"cut off after {ended:.3f}s, before the {DEADLINE}s deadline"
    assert ended < DEADLINE + OVERRUN, f"the connection ended only after {ended:.3f}s"
    assert server.in_flight == (), server.in_flight
    ends = recorder.events("stuck_end")
    if not forks:
        assert server.requests_cut_off == 1, server.requests_cut_off
        assert [line["got"] for line in ends] == ["b''"], ends
    else:
        # The cut-off happens in the worker (its handler's wait ends) or the parent
        # stops the worker and counts it.
        assert server.requests_cut_off >= 1 or [line["got"] for line in ends] == ["b''"], (
            f"no cut-off accounted: requests_cut_off={server.requests_cut_off}, {ends}"
        )


# --------------------------------------------------------------------------- errors


def handler_error(subject: Subject, recorder: Recorder) -> None:
    """A handler that raises: ``handle_error`` runs (the hook first, then the method),
    ``request_finish`` gets the exception, and the next request is served."""
    cls = recording_errors(subject.server_class(plugins=[recorder]), recorder)
    end = b"\n" if subject.is_stream() else b""
    failed = None
    with serving(subject.make(cls, KitHandler.recording(recorder))) as server:
        if subject.is_stream():
            failed = ask(subject, server, b"fail" + end)
        else:  # no reply comes: do not wait for one
            with subject.connect(server) as client:
                client.send(b"fail")
        recorder.wait_for("handle_error_method")
        after = ask(subject, server, b"after" + end)
        recorder.wait_for("request_finish", 2)
    assert failed in (None, b""), failed
    assert after == b"AFTER" + end, after
    methods = recorder.events("handle_error_method")
    assert [m["exc"] for m in methods] == ["PlannedFailure: kit: a planned failure"], methods
    failing = recorder.events("handler", command="fail")
    assert [(m["pid"], m["thread"]) for m in methods] == [(f["pid"], f["thread"]) for f in failing], (
        "handle_error did not run where the handler raised"
    )
    assert [h["exc"] for h in recorder.events("handle_error")] == [methods[0]["exc"]]
    outcomes = sorted(str(line["exc"]) for line in recorder.events("request_finish"))
    assert outcomes == ["None", "PlannedFailure: kit: a planned failure"], outcomes


# --------------------------------------------------------------------------- resources


def many_requests(subject: Subject, count: int) -> None:
    """*count* requests (connections, or datagrams over a few sockets) from a few client
    threads, all answered; afterwards this process holds as many descriptors and threads
    and children as before."""
    before = Holdings.now()
    cls = subject.server_class()
    stream = subject.is_stream()

    def stream_clients(indexes: range) -> list[Any]:
        failures: list[Any] = []
        for i in indexes:
            payload = b"request %d\n" % i
            try:
                reply = ask(subject, server, payload)
            except OSError as exc:
                failures.append((i, repr(exc)))
                continue
            if reply != payload.upper():
                failures.append((i, reply))
        return failures

    def datagram_clients(indexes: range) -> list[Any]:
        failures: list[Any] = []
        with subject.connect(server) as client:  # one datagram in flight at a time
            for i in indexes:
                payload = b"datagram %d" % i
                try:
                    client.send(payload)
                    reply = client.recv(65536)
                except OSError as exc:
                    failures.append((i, repr(exc)))
                    continue
                if reply != payload.upper():
                    failures.append((i, reply))
        return failures

    with serving(subject.make(cls, KitHandler)) as server:
        failures = drive(count, stream_clients if stream else datagram_clients)
    assert failures == [], failures[:10]
    left = before.left_over()
    assert left == [], left
    assert len(fd_targets()) == len(before.fds)
    assert threading.active_count() == before.threads


def closed_server_refuses(subject: Subject) -> None:
    """After ``server_close()`` a new client is refused at once: nothing (no child, no
    worker) still holds the server's socket. A datagram client is told so by the kernel
    (ICMP port unreachable, or no socket file) when it sends or waits for a reply."""
    cls = subject.server_class()
    payload = _payloads(subject, 1)[0]
    with serving(subject.make(cls, KitHandler)) as server:
        for _ in range(3):
            assert ask(subject, server, payload) == payload.upper()
    try:
        with subject.connect(server) as client:
            client.settimeout(REFUSAL_WAIT)
            client.sendall(payload)
            reply = read_to_eof(client) if subject.is_stream() else client.recv(65536)
    except TimeoutError:
        raise AssertionError(
            f"a closed server's address took a request and sent nothing in {REFUSAL_WAIT}s"
        ) from None
    except OSError as exc:
        assert is_refused(exc), f"connecting to a closed server failed with {exc!r}"
    else:
        raise AssertionError(f"a closed server took a request and replied {reply!r}")


# --------------------------------------------------------------------------- after fork


class _Probe:
    """Notes what the parent holds when its serve loop starts (``serve_start`` fires after
    the loop made its wake-up socket) and which children it has then."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    @sockserve.hookimpl
    def sockserve_serve_start(self, server: Any) -> None:
        self.recorder.note("probe", fds=fd_targets(), children=sorted(child_pids()))


def after_fork_hygiene(subject: Subject, recorder: Recorder) -> None:
    """A worker forked while the parent serves holds none of the sockets the parent's
    serve loop opened (its wake-up socket).

    Each request reports its worker's descriptors (from /proc/self/fd). A worker that
    existed before the loop started cannot have inherited its sockets, so it is killed
    (SIGKILL) until a worker forked later (a replacement, or a per-request child) reports.
    """
    parent = os.getpid()
    cls = subject.server_class(plugins=[recorder, _Probe(recorder)])
    server = subject.make(cls, KitHandler)
    before = set(fd_targets().values())  # the listening socket is the workers' to share
    thread = start(server)
    reports: list[dict[str, Any]] = []
    try:
        probe = recorder.wait_for("probe", pid=parent)[0]
        opened = {t for t in set(probe["fds"].values()) - before if t.startswith("socket:")}
        assert opened, "the kit found no socket opened by serve_forever; nothing to check"
        early = set(probe["children"])
        deadline = time.monotonic() + TIMEOUT * 3
        while True:
            assert time.monotonic() < deadline, (
                f"no worker forked after serving started answered; reports: {reports}"
            )
            report = json.loads(ask(subject, server, b"fds\n"))
            reports.append(report)
            pid, fds = report["pid"], report["fds"]
            assert pid != parent, "the handler ran in the parent: the strategy does not fork"
            held = set(fds.values()) - {fds[str(report["request_fd"])]}
            leaked = sorted(held & opened)
            assert not leaked, (
                f"worker {pid} holds sockets its parent's serve loop opened: {leaked} "
                f"(parent's loop opened {sorted(opened)})"
            )
            if pid not in early:
                break  # forked while serving, and clean
            if pid in child_pids():  # an early worker: make room for a later one
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
    finally:
        stop(server, thread)

