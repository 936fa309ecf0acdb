"""The ``access-log`` plugin (plugins/_accesslog.py): one line per request on logger
``sockserve.access``, written where the request ran, for every concurrency strategy."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from typing import Any

import pytest

import sockserve
from support import (
    UpperFailSlow,
    no_leaks,
    probe_autoload,
    read_to_eof,
    requires_af_unix,
    requires_fork,
    serving,
)

ACCESS_LOG = sockserve.registry.load("plugin", "access-log")
#: ``client duration outcome``, as the plugin's docstring shows it.
LINE = re.compile(
    r"^(?P<client>\S+) (?P<ms>\d+\.\d\d)ms (?P<outcome>ok|error (?P<exc>\w+): (?P<text>.*))$"
)
#: How long the handler sleeps for a b"slow" request: the logged duration includes it.
SLOW = 0.05


class Handler(UpperFailSlow):
    """Upper-case echo; b"fail" raises ValueError, b"slow" sleeps SLOW seconds first."""

    slow = SLOW


class Quiet:
    """Keep the expected handler error's traceback out of the test output."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


def request(address: Any, payload: bytes, family: int = socket.AF_INET) -> tuple[str, bytes]:
    """Send *payload*; return the client's own address as the log shows it, and the reply."""
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(address)
        if family == socket.AF_INET:
            host, port = client.getsockname()
            shown = f"{host}:{port}"
        else:
            shown = "-"  # an unbound Unix client has no address
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        reply = read_to_eof(client)
    return shown, reply


PAYLOADS = [b"hello", b"fail", b"slow", b"bye"]


def check_lines(lines: list[tuple[int, str]], clients: list[str]) -> None:
    """One line per request, in order: (level, message) against the clients that sent them."""
    assert len(lines) == len(PAYLOADS), lines
    for (level, message), client, payload in zip(lines, clients, PAYLOADS):
        match = LINE.match(message)
        assert match, message
        assert match["client"] == client
        if payload == b"fail":
            assert (level, match["exc"], match["text"]) == (logging.WARNING, "ValueError", "bad request")
        else:
            assert (level, match["outcome"]) == (logging.INFO, "ok")
        if payload == b"slow":
            assert float(match["ms"]) >= SLOW * 1000


@pytest.mark.parametrize("concurrency", ["sync", "threading"])
def test_one_line_per_request_with_client_duration_and_outcome(concurrency, caplog):
    cls = type("Server", (Quiet, sockserve.compose("tcp", concurrency, plugins=[ACCESS_LOG])), {})
    caplog.set_level(logging.INFO, logger="sockserve.access")
    with no_leaks():
        with serving(cls(("127.0.0.1", 0), Handler)) as server:
            serving_thread = None
            clients = []
            for payload in PAYLOADS:
                shown, reply = request(server.server_address, payload)
                clients.append(shown)
                assert reply == (b"" if payload == b"fail" else payload.upper())
            for thread in threading.enumerate():
                if thread.name.endswith("(serve_forever)"):
                    serving_thread = thread.ident
    records = [r for r in caplog.records if r.name == "sockserve.access"]
    check_lines([(r.levelno, r.getMessage()) for r in records], clients)
    # Written where the request ran: the serving thread for sync, a request thread otherwise.
    # (Thread ids of finished threads are reused, so distinct requests may share one.)
    assert serving_thread is not None
    threads = {r.thread for r in records}
    if concurrency == "sync":
        assert threads == {serving_thread}
    else:
        assert serving_thread not in threads


@pytest.mark.parametrize("denied_by", ["server", "plugin"])
def test_a_denied_request_gets_one_denied_line_and_no_handler_line(denied_by, caplog):
    """Refused by the server's verify_request or by another plugin: logged as denied."""
    refuse = {"on": False}

    class Refuser:
        @sockserve.hookimpl
        def sockserve_verify_request(self):
            return False if refuse["on"] else None

    class Server(Quiet, sockserve.compose("tcp", "threading", plugins=[ACCESS_LOG, Refuser()])):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            return not (refuse["on"] and denied_by == "server")

    caplog.set_level(logging.INFO, logger="sockserve.access")
    with no_leaks():
        with serving(Server(("127.0.0.1", 0), Handler)) as server:
            allowed, reply = request(server.server_address, b"hello")
            assert reply == b"HELLO"
            refuse["on"] = True
            with socket.create_connection(server.server_address, timeout=10) as client:
                host, port = client.getsockname()
                refused = f"{host}:{port}"
                assert read_to_eof(client) == b""  # closed unhandled
    messages = [r.getMessage() for r in caplog.records if r.name == "sockserve.access"]
    assert len(messages) == 2, messages
    assert LINE.match(messages[0])["client"] == allowed
    assert messages[1] == f"{refused} - denied"


@requires_af_unix
def test_a_unix_client_without_an_address_is_shown_as_a_dash(caplog, tmp_path):
    cls = type("Server", (Quiet, sockserve.compose("unix", "threading", plugins=[ACCESS_LOG])), {})
    caplog.set_level(logging.INFO, logger="sockserve.access")
    with serving(cls(str(tmp_path / "access.sock"), Handler)) as server:
        clients = [request(server.server_address, p, socket.AF_UNIX)[0] for p in PAYLOADS]
    records = [r for r in caplog.records if r.name == "sockserve.access"]
    check_lines([(r.levelno, r.getMessage()) for r in records], clients)
    assert clients == ["-"] * len(PAYLOADS)


@requires_fork
def test_forked_children_write_their_own_lines(tmp_path):
    """The line is written in the child that ran the request (a file handler sees it)."""
    path = tmp_path / "access.log"
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(process)d %(levelno)d %(message)s"))
    logger = logging.getLogger("sockserve.access")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        cls = type("Server", (Quiet, sockserve.compose("tcp", "forking", plugins=[ACCESS_LOG])), {})
        with serving(cls(("127.0.0.1", 0), Handler)) as server:
            clients = [request(server.server_address, p)[0] for p in PAYLOADS]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
    # serving() closed the server, which waited for every child: all lines are in.
    written = [line.split(" ", 2) for line in path.read_text(encoding="utf-8").splitlines()]
    check_lines([(int(level), message) for _, level, message in written], clients)
    pids = [int(pid) for pid, _, _ in written]
    assert os.getpid() not in pids and len(set(pids)) == len(PAYLOADS)


def test_only_the_class_composed_with_it_logs(caplog):
    caplog.set_level(logging.INFO, logger="sockserve.access")
    with serving(sockserve.ThreadingTCPServer(("127.0.0.1", 0), Handler)) as server:
        assert request(server.server_address, b"plain")[1] == b"PLAIN"
    assert not [r for r in caplog.records if r.name == "sockserve.access"]


def test_access_log_is_listed_but_not_registered_by_autoload(tmp_path):
    """Opt-in: autoload runs (a control plugin is registered) but leaves access-log out."""
    assert probe_autoload("access-log", tmp_path) == {
        "listed": True, "registered": False, "autoload_attribute": False, "control_registered": True,
    }
