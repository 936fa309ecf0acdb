"""Lifecycle hooks (DESIGN.md section 4): where each fires, what its result means, and how
plugins come and go, fail, and are loaded automatically (core/_hooks.py, core/hookspecs.py);
which hooks a relay calls directly rather than through pluggy, with the same results, and
how hook-call monitoring turns that off.

Hook calls are recorded as JSON lines appended to a file in ``tmp_path``, so that calls
made in a forked child are seen by the test too.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pluggy
import pytest

import sockserve
from sockserve.core._hooks import SingleImplCaller
from support import (
    CONCURRENCY,
    EchoUpper,
    address_for,
    exchange,
    make_distribution,
    no_leaks,
    script_path,
    serving,
    skip_unless_supported,
    wait_until,
)

SUBPROCESS_TIMEOUT = 60

#: Every hook in DESIGN.md section 4.
#: Strategies whose serving thread is in this process. prefork's workers verify requests
#: in their own processes, and a plugin registered after they forked does not reach them.
IN_PARENT = [c for c in CONCURRENCY if c != "prefork"]

HOOK_NAMES = [
    "sockserve_server_activate",
    "sockserve_serve_start",
    "sockserve_serve_stop",
    "sockserve_verify_request",
    "sockserve_request_start",
    "sockserve_request_finish",
    "sockserve_handle_error",
    "sockserve_service_actions",
    "sockserve_server_close",
    # Added by the connection stage (issue 8).
    "sockserve_request_prepared",
    "sockserve_request_denied",
    "sockserve_server_closed",
    # Added by the prefork strategy (issue 5): worker process lifecycle.
    "sockserve_pre_fork",
    "sockserve_post_fork",
    "sockserve_worker_exit",
    # Added by issue 10: supervision and metrics.
    "sockserve_worker_ready",
    "sockserve_worker_abort",
    "sockserve_accept_error",
]


def record(path: Path, event: str, **fields: Any) -> None:
    """Append one event line (with process and thread) to *path*."""
    line = json.dumps(
        {"event": event, "pid": os.getpid(), "thread": threading.get_ident(), **fields}
    )
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def names(path: Path, *, skip: tuple[str, ...] = ("service_actions",)) -> list[str]:
    return [e["event"] for e in events(path) if e["event"] not in skip]


def ask(server: Any, payload: bytes) -> bytes:
    """Send *payload* over TCP and read the reply to EOF; a refused connection gives b"".

    A server that refuses a request closes it, possibly before the payload is read, which
    the client sees as a reset rather than an end of file.
    """
    try:
        return exchange(server, payload)
    except (ConnectionResetError, BrokenPipeError):
        return b""
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return b""
        raise


class Recorder:
    """A lifecycle plugin implementing every hook; it records and leaves every decision."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @sockserve.hookimpl
    def sockserve_server_activate(self, server):
        listening = None
        if server.socket_type == socket.SOCK_STREAM:
            listening = server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        record(self.path, "server_activate", port=server.server_address[1], listening=listening)

    @sockserve.hookimpl
    def sockserve_serve_start(self, server):
        record(self.path, "serve_start")

    @sockserve.hookimpl
    def sockserve_serve_stop(self, server):
        record(self.path, "serve_stop")

    @sockserve.hookimpl
    def sockserve_verify_request(self, server, request, client_address):
        record(self.path, "verify_request", client=list(client_address))

    @sockserve.hookimpl
    def sockserve_request_start(self, server, request, client_address):
        record(self.path, "request_start", client=list(client_address))

    @sockserve.hookimpl
    def sockserve_request_finish(self, server, request, client_address, exc):
        record(self.path, "request_finish", client=list(client_address), exc=repr(exc))

    @sockserve.hookimpl
    def sockserve_handle_error(self, server, request, client_address, exc):
        record(self.path, "handle_error_hook", exc=repr(exc))

    @sockserve.hookimpl
    def sockserve_service_actions(self, server):
        record(self.path, "service_actions")

    @sockserve.hookimpl
    def sockserve_server_close(self, server):
        record(self.path, "server_close", socket_open=server.socket.fileno() != -1)


class Failing(sockserve.BaseRequestHandler):
    """A handler that raises after reading the request."""

    def handle(self):
        self.request.recv(1024)
        raise ValueError("the handler failed")


def recording_errors(cls: type, path: Path) -> type:
    """*cls* with ``handle_error`` recording the current exception to *path*."""

    class Recording(cls):  # type: ignore[misc, valid-type]
        def handle_error(self, request, client_address):
            exc = sys.exc_info()[1]
            record(
                path,
                "handle_error",
                type=type(exc).__name__,
                message=str(exc),
                hook=getattr(exc, "hook", None),
                plugin_name=getattr(exc, "plugin_name", None),
                cause=repr(exc.__cause__),
                client=list(client_address) if client_address else None,
            )

    return Recording


@pytest.fixture
def plugin_manager():
    """The global plugin manager; plugins registered through it are unregistered after."""
    manager = sockserve.get_plugin_manager()
    before = set(manager.get_plugins())
    yield manager
    for plugin in set(manager.get_plugins()) - before:
        manager.unregister(plugin)


def test_every_documented_hook_is_specified():
    manager = sockserve.get_plugin_manager()
    specified = {name for name in dir(manager.hook) if name.startswith("sockserve_")}
    assert specified == set(HOOK_NAMES)
    for name in HOOK_NAMES:
        assert getattr(sockserve.core.hookspecs, name).__doc__, f"{name} has no docstring"


# --------------------------------------------------------------------------- where hooks fire


# prefork's workers run serve loops of their own; tests/concurrency/test_prefork.py
# covers where its hooks fire.
@pytest.mark.parametrize("concurrency", [c for c in CONCURRENCY if c != "prefork"])
def test_hooks_fire_in_lifecycle_order_where_documented(concurrency, tmp_path):
    skip_unless_supported("tcp", concurrency)
    log = tmp_path / "events.jsonl"
    cls = sockserve.compose("tcp", concurrency, plugins=[Recorder(log)])
    with no_leaks():
        server = cls(address_for("tcp", tmp_path), EchoUpper)
        assert names(log) == ["server_activate"]
        with serving(server):
            with socket.create_connection(server.server_address, timeout=10) as client:
                client.sendall(b"hooked")
                client.shutdown(socket.SHUT_WR)
                assert client.makefile("rb").read() == b"HOOKED"
                client_address = list(client.getsockname())
            # The connection ends after request_finish; the file write is already done.
            assert wait_until(lambda: "request_finish" in names(log), timeout=10.0)
            assert wait_until(lambda: "service_actions" in names(log, skip=()), timeout=10.0)
    assert names(log) == [
        "server_activate",
        "serve_start",
        "verify_request",
        "request_start",
        "request_finish",
        "serve_stop",
        "server_close",
    ]
    by_name = {e["event"]: e for e in events(log)}
    me, main_thread = os.getpid(), threading.main_thread().ident
    serving_thread = by_name["serve_start"]["thread"]
    assert serving_thread != main_thread
    # Constructor and server_close run in the caller's thread.
    assert (by_name["server_activate"]["pid"], by_name["server_activate"]["thread"]) == (me, main_thread)
    assert (by_name["server_close"]["pid"], by_name["server_close"]["thread"]) == (me, main_thread)
    assert by_name["server_activate"]["port"] == server.server_address[1] != 0
    assert by_name["server_activate"]["listening"] == 1
    assert by_name["server_close"]["socket_open"] is True
    # The loop's own hooks run in the serving thread.
    for name in ("serve_start", "verify_request", "service_actions", "serve_stop"):
        assert (by_name[name]["pid"], by_name[name]["thread"]) == (me, serving_thread), name
    # The request's hooks run where the request runs, both in the same place.
    start, finish = by_name["request_start"], by_name["request_finish"]
    assert (start["pid"], start["thread"]) == (finish["pid"], finish["thread"])
    if concurrency == "sync":
        assert (start["pid"], start["thread"]) == (me, serving_thread)
    elif concurrency in ("threading", "threadpool"):
        assert start["pid"] == me
        assert start["thread"] not in (serving_thread, main_thread)
    else:
        assert start["pid"] != me
    assert start["client"] == finish["client"] == by_name["verify_request"]["client"] == client_address
    assert finish["exc"] == "None"


def test_server_activate_fires_only_when_the_server_activates(tmp_path):
    log = tmp_path / "events.jsonl"
    cls = sockserve.compose("tcp", "sync", plugins=[Recorder(log)])
    with no_leaks():
        server = cls(address_for("tcp", tmp_path), EchoUpper, bind_and_activate=False)
        try:
            assert names(log) == []
            server.server_bind()
            assert names(log) == []
            server.server_activate()
            assert names(log) == ["server_activate"]
            assert events(log)[0]["listening"] == 1
        finally:
            server.server_close()


def test_server_activate_fires_for_datagram_servers(tmp_path):
    log = tmp_path / "events.jsonl"
    cls = sockserve.compose("udp", "sync", plugins=[Recorder(log)])
    with no_leaks():
        with serving(cls(address_for("udp", tmp_path), EchoUpper)) as server:
            assert exchange(server, b"datagram") == b"DATAGRAM"
            assert wait_until(lambda: "request_finish" in names(log), timeout=10.0)
    assert names(log) == [
        "server_activate",
        "serve_start",
        "verify_request",
        "request_start",
        "request_finish",
        "serve_stop",
        "server_close",
    ]
    assert events(log)[0]["port"] == server.server_address[1] != 0


def test_service_actions_hook_fires_on_every_loop_turn_after_the_method(tmp_path):
    log = tmp_path / "events.jsonl"

    class Server(sockserve.compose("tcp", "sync", plugins=[Recorder(log)])):
        def service_actions(self):
            record(log, "method")

    with no_leaks():
        with serving(Server(address_for("tcp", tmp_path), EchoUpper), poll_interval=0.01):
            assert wait_until(lambda: names(log, skip=()).count("service_actions") >= 5, timeout=10.0)
    turns = [n for n in names(log, skip=()) if n in ("method", "service_actions")]
    # Each turn: the server's method, then the hook (the last turn may stop in between).
    pairs = turns[: len(turns) // 2 * 2]
    assert pairs == ["method", "service_actions"] * (len(pairs) // 2)


def test_serve_stop_fires_when_serve_forever_ends_by_an_exception(tmp_path):
    log = tmp_path / "events.jsonl"

    class Server(sockserve.compose("tcp", "sync", plugins=[Recorder(log)])):
        def service_actions(self):
            raise KeyboardInterrupt

    with no_leaks():
        server = Server(address_for("tcp", tmp_path), EchoUpper)
        try:
            with pytest.raises(KeyboardInterrupt):
                server.serve_forever(0.01)
        finally:
            server.server_close()
    assert names(log) == ["server_activate", "serve_start", "serve_stop", "server_close"]


# --------------------------------------------------------------------------- verify_request


class Verdict:
    """A plugin answering verify_request with a fixed verdict."""

    def __init__(self, verdict: bool | None) -> None:
        self.verdict = verdict
        self.asked = 0

    @sockserve.hookimpl
    def sockserve_verify_request(self, server, request, client_address):
        self.asked += 1
        return self.verdict


@pytest.mark.parametrize("concurrency", IN_PARENT)
def test_verify_request_false_denies_the_request(concurrency, tmp_path):
    skip_unless_supported("tcp", concurrency)
    log = tmp_path / "events.jsonl"
    deny = Verdict(False)
    cls = sockserve.compose("tcp", concurrency, plugins=[deny, Recorder(log)])
    with no_leaks():
        with serving(cls(address_for("tcp", tmp_path), EchoUpper)) as server:
            # The refused connection is closed without a reply; the handler never runs.
            assert ask(server, b"let me in") == b""
            assert ask(server, b"again") == b""
    assert deny.asked == 2
    assert "request_start" not in names(log)
    assert "request_finish" not in names(log)


@pytest.mark.parametrize(
    "verdicts,server_says,served",
    [
        ((True,), False, True),  # True accepts without asking the server's verify_request
        ((None,), False, False),  # None leaves it to the server
        ((None,), True, True),
        ((None, False), True, False),  # the first non-None decides
        ((None, True), False, True),
        ((), False, False),
    ],
)
def test_verify_request_first_non_none_verdict_decides(verdicts, server_says, served, tmp_path):
    asked = []
    plugins = [Verdict(v) for v in verdicts]

    class Server(sockserve.compose("tcp", "sync", plugins=plugins)):
        def verify_request(self, request, client_address):
            asked.append(client_address)
            return server_says

    with no_leaks():
        with serving(Server(address_for("tcp", tmp_path), EchoUpper)) as server:
            caller = server._sockserve_hooks.verify_request
            reply = ask(server, b"knock")
    # One plugin: called directly; two: through pluggy; none: not at all.
    assert type(caller) is {0: type(None), 1: SingleImplCaller, 2: pluggy.HookCaller}[len(verdicts)]
    assert reply == (b"KNOCK" if served else b"")
    assert all(p.asked <= 1 for p in plugins)
    deciding = [p.asked for p in plugins if p.verdict is not None]
    assert deciding == ([1] if deciding else [])
    server_asked = not any(v is not None for v in verdicts)
    assert len(asked) == (1 if server_asked else 0)


# --------------------------------------------------------------------------- errors in handlers


@pytest.mark.parametrize("concurrency", CONCURRENCY)
def test_request_finish_receives_the_handler_exception(concurrency, tmp_path):
    skip_unless_supported("tcp", concurrency)
    log = tmp_path / "events.jsonl"
    cls = recording_errors(sockserve.compose("tcp", concurrency, plugins=[Recorder(log)]), log)
    with no_leaks():
        with serving(cls(address_for("tcp", tmp_path), Failing)) as server:
            assert ask(server, b"x") == b""
            assert ask(server, b"y") == b""  # still serving
    skipped = ("server_activate", "serve_start", "serve_stop", "server_close", "verify_request")
    request_names = [n for n in names(log) if n not in skipped]
    assert request_names == ["request_start", "handle_error_hook", "handle_error", "request_finish"] * 2
    finishes = [e for e in events(log) if e["event"] == "request_finish"]
    assert [e["exc"] for e in finishes] == [repr(ValueError("the handler failed"))] * 2
    errors = [e for e in events(log) if e["event"] == "handle_error"]
    assert [(e["type"], e["message"]) for e in errors] == [("ValueError", "the handler failed")] * 2


class Handles:
    """A plugin answering handle_error with a fixed verdict."""

    def __init__(self, path: Path, verdict: bool | None) -> None:
        self.path = path
        self.verdict = verdict

    @sockserve.hookimpl
    def sockserve_handle_error(self, server, request, client_address, exc):
        record(self.path, "handle_error_hook", exc=repr(exc), client=list(client_address))
        return self.verdict


@pytest.mark.parametrize("verdict", [True, False, None])
@pytest.mark.parametrize("concurrency", CONCURRENCY)
def test_handle_error_hook_returning_true_suppresses_server_handle_error(concurrency, verdict, tmp_path):
    skip_unless_supported("tcp", concurrency)
    log = tmp_path / "events.jsonl"
    cls = recording_errors(sockserve.compose("tcp", concurrency, plugins=[Handles(log, verdict)]), log)
    with no_leaks():
        with serving(cls(address_for("tcp", tmp_path), Failing)) as server:
            with socket.create_connection(server.server_address, timeout=10) as client:
                client.sendall(b"x")
                assert client.recv(10) == b""
                client_address = list(client.getsockname())
    hook_calls = [e for e in events(log) if e["event"] == "handle_error_hook"]
    assert [(e["exc"], e["client"]) for e in hook_calls] == [
        (repr(ValueError("the handler failed")), client_address)
    ]
    server_calls = [e for e in events(log) if e["event"] == "handle_error"]
    if verdict is True:
        assert server_calls == []
    else:
        assert [(e["type"], e["client"]) for e in server_calls] == [("ValueError", client_address)]


# --------------------------------------------------------------------------- plugins come and go


class Starts:
    """A plugin recording request_start with a label."""

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        self.label = label

    @sockserve.hookimpl
    def sockserve_request_start(self, client_address):
        record(self.path, self.label)


@pytest.mark.parametrize("concurrency", IN_PARENT)
def test_plugin_registered_while_serving_is_seen_and_unregistering_removes_it(
    concurrency, tmp_path, plugin_manager
):
    skip_unless_supported("tcp", concurrency)
    log = tmp_path / "events.jsonl"
    late = Starts(log, "late")
    cls = sockserve.compose("tcp", concurrency)
    with no_leaks():
        with serving(cls(address_for("tcp", tmp_path), EchoUpper)) as server:
            assert exchange(server, b"before") == b"BEFORE"
            plugin_manager.register(late, name="late-plugin")
            assert exchange(server, b"during") == b"DURING"
            assert exchange(server, b"during") == b"DURING"
            plugin_manager.unregister(late)
            assert exchange(server, b"after") == b"AFTER"
    assert names(log) == ["late", "late"]


def test_global_plugin_joins_the_class_plugins_of_a_running_server(tmp_path, plugin_manager):
    log = tmp_path / "events.jsonl"
    cls = sockserve.compose("tcp", "threading", plugins=[Starts(log, "class")])
    late = Starts(log, "global")
    with no_leaks():
        with serving(cls(address_for("tcp", tmp_path), EchoUpper)) as server:
            hooks = server._sockserve_hooks  # the class's own relay, from a private manager
            assert isinstance(hooks.request_start, SingleImplCaller)
            assert exchange(server, b"1") == b"1"
            plugin_manager.register(late, name="late-global")
            assert isinstance(hooks.request_start, pluggy.HookCaller)
            assert exchange(server, b"2") == b"2"
            plugin_manager.unregister(late)
            assert isinstance(hooks.request_start, SingleImplCaller)
            assert exchange(server, b"3") == b"3"
    seen = names(log)
    assert (seen.count("class"), seen.count("global")) == (3, 1)
    assert seen[0] == seen[-1] == "class"  # the global plugin saw only the middle request


# --------------------------------------------------------------------------- plugins that raise


class Exploding:
    """A plugin whose hook implementations raise."""

    def __init__(self, *hooks: str) -> None:
        self.hooks = hooks

    def _maybe_raise(self, hook: str) -> None:
        if hook in self.hooks:
            raise RuntimeError(f"plugin bug in {hook}")

    @sockserve.hookimpl
    def sockserve_request_start(self):
        self._maybe_raise("request_start")

    @sockserve.hookimpl
    def sockserve_verify_request(self):
        self._maybe_raise("verify_request")

    @sockserve.hookimpl
    def sockserve_service_actions(self):
        self._maybe_raise("service_actions")


@pytest.mark.parametrize("path", ["direct", "pluggy"])
@pytest.mark.parametrize("concurrency", CONCURRENCY)
def test_raising_request_hook_goes_to_handle_error_as_hook_error_and_serving_goes_on(
    concurrency, path, tmp_path, plugin_manager
):
    skip_unless_supported("tcp", concurrency)
    log = tmp_path / "events.jsonl"
    plugin_manager.register(Exploding("request_start"), name="exploding-plugin")
    if path == "pluggy":  # a second implementation: the call goes through pluggy
        plugin_manager.register(Starts(tmp_path / "starts.jsonl", "start"), name="starts")
    cls = recording_errors(sockserve.compose("tcp", concurrency), log)
    with no_leaks():
        with serving(cls(address_for("tcp", tmp_path), EchoUpper)) as server:
            kind = SingleImplCaller if path == "direct" else pluggy.HookCaller
            assert isinstance(server._sockserve_hooks.request_start, kind)
            for payload in (b"first", b"second"):
                with socket.create_connection(server.server_address, timeout=10) as client:
                    client.sendall(payload)
                    client.shutdown(socket.SHUT_WR)
                    # The request itself is still handled.
                    assert client.makefile("rb").read() == payload.upper()
                    client_address = list(client.getsockname())
    errors = [e for e in events(log) if e["event"] == "handle_error"]
    assert len(errors) == 2
    error = errors[-1]
    assert error["type"] == "HookError"
    assert error["message"] == "plugin 'exploding-plugin' raised in hook sockserve_request_start"
    assert error["hook"] == "sockserve_request_start"
    assert error["plugin_name"] == "exploding-plugin"
    assert error["cause"] == repr(RuntimeError("plugin bug in request_start"))
    assert error["client"] == client_address


@pytest.mark.parametrize("hook", ["verify_request", "service_actions"])
def test_raising_serving_thread_hook_goes_to_handle_error_and_the_loop_goes_on(
    hook, tmp_path, plugin_manager
):
    captured = []

    class Server(sockserve.compose("tcp", "sync")):
        def handle_error(self, request, client_address):
            captured.append(sys.exc_info()[1])

    plugin_manager.register(Exploding(hook), name="exploding-plugin")
    with no_leaks():
        with serving(Server(address_for("tcp", tmp_path), EchoUpper)) as server:
            assert isinstance(getattr(server._sockserve_hooks, hook), SingleImplCaller)
            assert exchange(server, b"one") == b"ONE"
            assert exchange(server, b"two") == b"TWO"
    assert captured, "handle_error was not called"
    for exc in captured:
        assert isinstance(exc, sockserve.HookError)
        assert isinstance(exc, RuntimeError)
        assert str(exc) == f"plugin 'exploding-plugin' raised in hook sockserve_{hook}"
        assert (exc.hook, exc.plugin_name) == (f"sockserve_{hook}", "exploding-plugin")
        assert isinstance(exc.__cause__, RuntimeError)
        assert str(exc.__cause__) == f"plugin bug in {hook}"
    if hook == "verify_request":
        assert len(captured) == 2  # one per request; the server's verify_request then decided


# --------------------------------------------------------------------------- cost when unused


class OnlyLifecycle:
    """A plugin implementing hooks that are not on the per-request path."""

    @sockserve.hookimpl
    def sockserve_server_close(self, server):
        pass

    @sockserve.hookimpl
    def sockserve_serve_start(self, server):
        pass


@pytest.mark.parametrize("concurrency", ["sync", "threading"])
@pytest.mark.parametrize("implemented", ["request_start", "lifecycle only", "nothing"])
def test_request_path_calls_a_hook_only_when_it_is_implemented(
    concurrency, implemented, tmp_path, monkeypatch, plugin_manager
):
    calls = count_hook_calls(monkeypatch)
    if implemented == "request_start":
        plugin_manager.register(Starts(tmp_path / "events.jsonl", "start"), name="starts")
    elif implemented == "lifecycle only":
        plugin_manager.register(OnlyLifecycle(), name="lifecycle-only")
    with no_leaks():
        with serving(sockserve.compose("tcp", concurrency)(address_for("tcp", tmp_path), EchoUpper)) as server:
            assert exchange(server, b"warm up") == b"WARM UP"
            calls.clear()
            for i in range(20):
                assert exchange(server, b"req %d" % i) == b"REQ %d" % i
            monkeypatch.undo()
    if implemented == "request_start":
        # The counting works; one implementation is called directly.
        assert calls == [("direct", "sockserve_request_start")] * 20
    else:
        assert calls == []


# --------------------------------------------------------------------------- the direct call


def count_hook_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record every hook call a relay makes, as ("pluggy" or "direct", hook name)."""
    calls: list[tuple[str, str]] = []
    through_pluggy = pluggy.HookCaller.__call__
    direct = SingleImplCaller.call

    def counting_pluggy(self, **kwargs):
        calls.append(("pluggy", self.name))
        return through_pluggy(self, **kwargs)

    def counting_direct(self, kwargs):
        calls.append(("direct", self.name))
        return direct(self, kwargs)

    monkeypatch.setattr(pluggy.HookCaller, "__call__", counting_pluggy)
    monkeypatch.setattr(SingleImplCaller, "call", counting_direct)
    return calls


class Finishes:
    """A plugin recording request_finish (the exception's type) with a label."""

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        self.label = label

    @sockserve.hookimpl
    def sockserve_request_finish(self, client_address, exc):
        record(self.path, self.label, exc=type(exc).__name__)


class FinishesDefaulted:
    """request_finish with a defaulted argument: pluggy passes it when the call has it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @sockserve.hookimpl
    def sockserve_request_finish(self, client_address, exc="not given"):
        record(self.path, "defaulted", exc=exc if isinstance(exc, str) else type(exc).__name__)


class FinishesWrapper:
    """request_finish as a new-style wrapper: the code around its yield must run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @sockserve.hookimpl(wrapper=True)
    def sockserve_request_finish(self, exc):
        record(self.path, "wrapper before", exc=type(exc).__name__)
        result = yield
        record(self.path, "wrapper after", result=result)
        return result


class FinishesOldWrapper:
    """request_finish as an old-style hookwrapper."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @sockserve.hookimpl(hookwrapper=True)
    def sockserve_request_finish(self, exc):
        record(self.path, "old wrapper before", exc=type(exc).__name__)
        outcome = yield
        record(self.path, "old wrapper after", result=outcome.get_result())


def finish_plugins(case: str, path: Path) -> list[object]:
    return {
        "one plain": [Finishes(path, "plain")],
        "two plain": [Finishes(path, "plain"), Finishes(path, "second")],
        "one wrapper": [FinishesWrapper(path)],
        "one old-style wrapper": [FinishesOldWrapper(path)],
        "one defaulted argument": [FinishesDefaulted(path)],
    }[case]


def pluggy_passes_defaults() -> bool:
    """Whether this pluggy passes a hook implementation's defaulted argument."""
    spec, impl = pluggy.HookspecMarker("scratch"), pluggy.HookimplMarker("scratch")

    class Spec:
        @spec
        def scratch_hook(self, arg): ...

    class Impl:
        @impl
        def scratch_hook(self, arg="default"):
            return arg

    manager = pluggy.PluginManager("scratch")
    manager.add_hookspecs(Spec)
    manager.register(Impl())
    return manager.hook.scratch_hook(arg="given") == ["given"]


#: What each case's plugins record per request, and how the hook is called.
FINISH_CASES: dict[str, tuple[list[dict[str, Any]], str]] = {
    "one plain": ([{"event": "plain", "exc": "NoneType"}], "direct"),
    "two plain": (
        [{"event": "second", "exc": "NoneType"}, {"event": "plain", "exc": "NoneType"}], "pluggy"
    ),
    "one wrapper": (
        [{"event": "wrapper before", "exc": "NoneType"}, {"event": "wrapper after", "result": []}],
        "pluggy",
    ),
    "one old-style wrapper": (
        [{"event": "old wrapper before", "exc": "NoneType"},
         {"event": "old wrapper after", "result": []}],
        "pluggy",
    ),
    # pluggy >= 1.6 passes a defaulted argument that the call provides; older ones never do.
    "one defaulted argument": (
        [{"event": "defaulted", "exc": "NoneType" if pluggy_passes_defaults() else "not given"}],
        "pluggy",
    ),
}


def plain(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in ("pid", "thread")}


@pytest.mark.parametrize("case", list(FINISH_CASES))
def test_only_a_sole_plain_implementation_is_called_directly(case, tmp_path, monkeypatch):
    log = tmp_path / "events.jsonl"
    expected, how = FINISH_CASES[case]
    cls = sockserve.compose("tcp", "sync", plugins=finish_plugins(case, log))
    with no_leaks():
        with serving(cls(address_for("tcp", tmp_path), EchoUpper)) as server:
            relayed = server._sockserve_hooks.request_finish
            assert isinstance(relayed, SingleImplCaller if how == "direct" else pluggy.HookCaller)
            calls = count_hook_calls(monkeypatch)
            for i in range(3):
                assert exchange(server, b"r%d" % i) == b"R%d" % i
            assert wait_until(lambda: len(events(log)) == 3 * len(expected), timeout=10.0)
            monkeypatch.undo()
    assert calls == [(how, "sockserve_request_finish")] * 3
    assert [plain(e) for e in events(log)] == expected * 3


class Returns:
    """A plugin whose one hook returns a fixed value and records what it was given."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.seen: list[tuple[Any, ...]] = []


def returning(hook: str, value: Any) -> Returns:
    """A ``Returns`` implementing *hook* with two of its arguments, out of order."""

    def implementation(self, client_address, server):
        self.seen.append((client_address, server))
        return self.value

    cls = type("Returns_" + hook, (Returns,), {hook: sockserve.hookimpl(implementation)})
    return cls(value)


class StubServer:
    """What ``call_hook`` needs of a server: ``handle_error`` (here: it must not be called)."""

    def handle_error(self, request, client_address):
        raise AssertionError(f"handle_error called: {sys.exc_info()[1]!r}")


@pytest.mark.parametrize("returns", [None, False, True, 0, "", "a value", ("a", "tuple")])
@pytest.mark.parametrize(
    "hook",
    ["sockserve_verify_request", "sockserve_request_prepared", "sockserve_handle_error",  # firstresult
     "sockserve_request_start", "sockserve_request_finish", "sockserve_request_denied"],
)
def test_a_direct_call_returns_what_pluggy_returns(hook, returns):
    from sockserve.core._hooks import call_hook

    manager = pluggy.PluginManager(sockserve.core.hookspecs.PROJECT_NAME)
    manager.add_hookspecs(sockserve.core.hookspecs)
    plugin = returning(hook, returns)
    manager.register(plugin)
    caller = getattr(manager.hook, hook)
    (impl,) = caller.get_hookimpls()
    assert SingleImplCaller.handles(caller, [impl])
    direct = SingleImplCaller(caller, impl)
    assert direct.name == caller.name == hook
    assert direct.get_hookimpls() == [impl]
    server = StubServer()
    values = {"request": object(), "client_address": ("127.0.0.1", 4242), "exc": None, "reason": "r"}
    kwargs = {name: values[name] for name in caller.spec.argnames if name != "server"}
    through_pluggy = caller(server=server, **kwargs)
    assert direct(server=server, **kwargs) == through_pluggy
    assert call_hook(server, direct, **kwargs) == call_hook(server, caller, **kwargs) == through_pluggy
    firstresult = caller.spec.opts.get("firstresult")
    assert through_pluggy == (returns if firstresult else ([] if returns is None else [returns]))
    assert plugin.seen == [(("127.0.0.1", 4242), server)] * 4


class Prepared:
    """A plugin answering request_prepared with a fixed verdict."""

    def __init__(self, verdict: bool | None) -> None:
        self.verdict = verdict
        self.asked = 0

    @sockserve.hookimpl
    def sockserve_request_prepared(self, request):
        self.asked += 1
        return self.verdict


@pytest.mark.parametrize("concurrency", IN_PARENT)
@pytest.mark.parametrize("hook", ["verify_request", "request_prepared"])
def test_a_sole_implementations_veto_refuses_a_real_connection(hook, concurrency, tmp_path):
    skip_unless_supported("tcp", concurrency)
    deny = Verdict(False) if hook == "verify_request" else Prepared(False)
    cls = sockserve.compose("tcp", concurrency, plugins=[deny])
    with no_leaks():
        with serving(cls(address_for("tcp", tmp_path), EchoUpper)) as server:
            assert isinstance(getattr(server._sockserve_hooks, hook), SingleImplCaller)
            assert ask(server, b"let me in") == b""
            assert ask(server, b"again") == b""
            if concurrency == "forking":
                return  # the plugin's count and the denial's stay in each forked child
            if hook == "request_prepared":
                assert wait_until(lambda: server.requests_denied["request_prepared"] == 2)
    assert deny.asked == 2


class Ready:
    """worker_ready taking only *worker_id*: a call lacking *pid* still reaches it."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    @sockserve.hookimpl
    def sockserve_worker_ready(self, worker_id):
        self.seen.append(worker_id)


class ReadyPid(Ready):
    """worker_ready taking *pid* too: a call lacking it cannot reach it."""

    @sockserve.hookimpl
    def sockserve_worker_ready(self, worker_id, pid):
        self.seen.append(worker_id)


@pytest.mark.parametrize("needs_pid", [False, True])
def test_a_call_lacking_an_argument_of_the_spec_is_left_to_pluggy(needs_pid, tmp_path):
    """pluggy warns; an implementation needing the argument gets no call (HookCallError)."""
    captured = []
    ready = ReadyPid() if needs_pid else Ready()

    class Server(sockserve.compose("tcp", "sync", plugins=[ready])):
        def handle_error(self, request, client_address):
            captured.append(sys.exc_info()[1])

    with no_leaks():
        server = Server(address_for("tcp", tmp_path), EchoUpper)
        try:
            assert isinstance(server._sockserve_hooks.worker_ready, SingleImplCaller)
            with pytest.warns(UserWarning, match="'pid' which are declared in the hookspec"):
                result = server.call_hook("worker_ready", worker_id=3)
            assert server.call_hook("worker_ready", worker_id=4, pid=os.getpid()) == []
        finally:
            server.server_close()
    if needs_pid:
        assert (result, ready.seen) == (None, [4])
        (exc,) = captured
        assert isinstance(exc, sockserve.HookError)
        assert exc.hook == "sockserve_worker_ready"
        assert isinstance(exc.__cause__, pluggy.HookCallError)
    else:
        assert (result, ready.seen, captured) == ([], [3, 4], [])


@pytest.mark.parametrize("concurrency", ["sync", "threading", "threadpool"])
def test_registering_and_unregistering_while_serving_switches_how_the_hook_is_called(
    concurrency, tmp_path, monkeypatch, plugin_manager
):
    skip_unless_supported("tcp", concurrency)
    log = tmp_path / "events.jsonl"
    first, second = Starts(log, "first"), Starts(log, "second")
    with no_leaks():
        with serving(sockserve.compose("tcp", concurrency)(address_for("tcp", tmp_path), EchoUpper)) as server:
            hooks = server._sockserve_hooks
            calls = count_hook_calls(monkeypatch)
            steps = [
                (lambda: None, type(None), [], []),
                (lambda: plugin_manager.register(first, name="first"), SingleImplCaller,
                 ["direct"], ["first"]),
                (lambda: plugin_manager.register(second, name="second"), pluggy.HookCaller,
                 ["pluggy"], ["second", "first"]),
                (lambda: plugin_manager.unregister(first), SingleImplCaller, ["direct"], ["second"]),
                (lambda: plugin_manager.unregister(second), type(None), [], []),
            ]
            for change, kind, how, labels in steps:
                change()
                assert type(hooks.request_start) is kind
                before = len(events(log))
                calls.clear()
                assert exchange(server, b"step") == b"STEP"
                assert [e["event"] for e in events(log)[before:]] == labels
                assert calls == [(h, "sockserve_request_start") for h in how]
            monkeypatch.undo()


def monitor(seen: list[tuple[Any, ...]]) -> tuple[Any, Any]:
    """before/after functions for add_hookcall_monitoring, recording into *seen*."""

    def before(hook_name, hook_impls, kwargs):
        seen.append(("before", hook_name, [i.plugin_name for i in hook_impls], sorted(kwargs)))

    def after(outcome, hook_name, hook_impls, kwargs):
        seen.append(("after", hook_name, outcome.get_result()))

    return before, after


def test_hookcall_monitoring_sees_every_call_until_undone(tmp_path, plugin_manager):
    log = tmp_path / "events.jsonl"
    seen: list[tuple[Any, ...]] = []
    plugin_manager.register(Starts(log, "start"), name="starts")
    class_plugin = sockserve.compose("tcp", "sync", plugins=[Finishes(log, "class")])
    with no_leaks():
        other = class_plugin(address_for("tcp", tmp_path), EchoUpper)  # a private manager's relay
        try:
            with serving(sockserve.compose("tcp", "sync")(address_for("tcp", tmp_path), EchoUpper)) as server:
                hooks = server._sockserve_hooks
                assert isinstance(hooks.request_start, SingleImplCaller)
                assert isinstance(other._sockserve_hooks.request_finish, SingleImplCaller)
                assert exchange(server, b"unseen") == b"UNSEEN"
                undo = plugin_manager.add_hookcall_monitoring(*monitor(seen))
                try:
                    assert plugin_manager.monitored
                    assert isinstance(hooks.request_start, pluggy.HookCaller)
                    assert isinstance(other._sockserve_hooks.request_finish, pluggy.HookCaller)
                    for i in range(3):
                        assert exchange(server, b"seen %d" % i) == b"SEEN %d" % i
                finally:
                    undo()
                assert not plugin_manager.monitored
                assert isinstance(hooks.request_start, SingleImplCaller)
                assert isinstance(other._sockserve_hooks.request_finish, SingleImplCaller)
                assert exchange(server, b"unseen") == b"UNSEEN"
        finally:
            other.server_close()
    assert seen == [
        ("before", "sockserve_request_start", ["starts"], ["client_address", "request", "server"]),
        ("after", "sockserve_request_start", []),
    ] * 3
    assert names(log) == ["start"] * 5


def test_enable_tracing_traces_every_call_until_undone(tmp_path, plugin_manager):
    log = tmp_path / "events.jsonl"
    lines: list[str] = []
    plugin_manager.register(Starts(log, "start"), name="starts")

    def traced() -> int:
        return sum("finish sockserve_request_start -->" in line for line in lines)  # one per call

    plugin_manager.trace.root.setwriter(lines.append)
    try:
        with no_leaks():
            with serving(sockserve.compose("tcp", "sync")(address_for("tcp", tmp_path), EchoUpper)) as server:
                hooks = server._sockserve_hooks
                undo = plugin_manager.enable_tracing()
                try:
                    assert isinstance(hooks.request_start, pluggy.HookCaller)
                    for i in range(2):
                        assert exchange(server, b"traced %d" % i) == b"TRACED %d" % i
                finally:
                    undo()
                assert isinstance(hooks.request_start, SingleImplCaller)
                assert exchange(server, b"direct") == b"DIRECT"
    finally:
        plugin_manager.trace.root.setwriter(None)
    assert traced() == 2
    assert names(log) == ["start"] * 3


def test_nested_monitors_keep_pluggys_callers_until_the_last_is_undone(tmp_path, plugin_manager):
    log = tmp_path / "events.jsonl"
    outer: list[tuple[Any, ...]] = []
    inner: list[tuple[Any, ...]] = []
    plugin_manager.register(Starts(log, "start"), name="starts")
    with no_leaks():
        with serving(sockserve.compose("tcp", "sync")(address_for("tcp", tmp_path), EchoUpper)) as server:
            hooks = server._sockserve_hooks
            undo_outer = plugin_manager.add_hookcall_monitoring(*monitor(outer))
            try:
                undo_inner = plugin_manager.add_hookcall_monitoring(*monitor(inner))
                assert exchange(server, b"both") == b"BOTH"
                undo_inner()
                undo_inner()  # twice: it still ends only its own monitor
                assert isinstance(hooks.request_start, pluggy.HookCaller)
                assert exchange(server, b"outer") == b"OUTER"
            finally:
                undo_outer()
            assert isinstance(hooks.request_start, SingleImplCaller)
            assert exchange(server, b"neither") == b"NEITHER"
    assert (len(outer), len(inner)) == (4, 2)  # before and after, per call seen
    assert names(log) == ["start"] * 3


# --------------------------------------------------------------------------- autoloading


DEMO_PLUGIN = """
import sockserve

activated = []

@sockserve.hookimpl
def sockserve_server_activate(server):
    activated.append(server.server_address[1])
"""

def run_autoload(tmp_path: Path, env_value: str | None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("SOCKSERVE_DISABLE_PLUGIN_AUTOLOAD", "PYTHONPATH")}
    env["PYTHONPATH"] = str(tmp_path / "site")
    if env_value is not None:
        env["SOCKSERVE_DISABLE_PLUGIN_AUTOLOAD"] = env_value
    proc = subprocess.run(
        [sys.executable, script_path("autoload_demo.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("env_value,autoloaded", [(None, True), ("", True), ("0", True), ("1", False)])
def test_disable_plugin_autoload_variable_stops_autoloading(env_value, autoloaded, tmp_path):
    make_distribution(
        tmp_path / "site",
        "sockserve-demo-plugin",
        "1.0",
        {"sockserve.plugins": {"demo": "sockserve_demo_plugin"}},
        {"sockserve_demo_plugin.py": DEMO_PLUGIN},
    )
    result = run_autoload(tmp_path, env_value)
    assert result["warnings"] == []
    # Named plugins can still be asked for.
    assert "demo" in result["names"]
    assert result["loads"] == "sockserve_demo_plugin"
    if autoloaded:
        assert (result["imported"], result["registered"], result["activated"]) == (True, True, True)
    else:
        assert (result["imported"], result["registered"], result["activated"]) == (False, False, None)


def test_autoloaded_plugin_that_fails_warns_once_and_the_others_still_load(tmp_path):
    make_distribution(
        tmp_path / "site",
        "sockserve-demo-plugin",
        "1.0",
        {"sockserve.plugins": {"demo": "sockserve_demo_plugin"}},
        {"sockserve_demo_plugin.py": DEMO_PLUGIN},
    )
    make_distribution(
        tmp_path / "site",
        "sockserve-broken-plugin",
        "0.3",
        {"sockserve.plugins": {"broken": "sockserve_missing_plugin_module"}},
    )
    result = run_autoload(tmp_path, None)
    assert (result["imported"], result["registered"], result["activated"]) == (True, True, True)
    assert {"broken", "demo"} <= set(result["names"])
    assert len(result["warnings"]) == 1
    category, message = result["warnings"][0]
    assert category == "PluginLoadWarning"
    lines = message.splitlines()
    assert "'broken'" in lines[0]
    assert lines[1:5] == [
        "  entry point: sockserve.plugins  broken = sockserve_missing_plugin_module",
        "  distribution: sockserve-broken-plugin 0.3",
        "  cause: ModuleNotFoundError: No module named 'sockserve_missing_plugin_module'",
        "  fix: install what it needs, or uninstall sockserve-broken-plugin so it is not discovered",
    ]


def test_the_relay_declares_one_attribute_per_hook_specification():
    """HookRelay's annotations (what type checkers see) list exactly the hooks of hookspecs."""
    from sockserve.core._hooks import HOOKS, HookRelay

    assert set(HookRelay.__annotations__) == set(HOOKS)
    assert set(HOOKS) >= {"request_prepared", "request_denied", "server_closed"}
