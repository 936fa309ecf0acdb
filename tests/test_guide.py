"""The plugin guide's examples (docs/plugins.md, blocks marked ``# guide: NAME``) work as
written, with public names only: a third-party strategy and a layer, over real sockets."""

from __future__ import annotations

import re
import socket
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

import sockserve
from sockserve.testing import LayerTests, StrategyTests
from support import no_leaks, serving, wait_until

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def guide_block(name: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S)
    found = [b for b in blocks if b.startswith(f"# guide: {name}\n")]
    assert len(found) == 1, f"docs/plugins.md has {len(found)} blocks marked '# guide: {name}'"
    return found[0]


def load_guide_module(name: str) -> types.ModuleType:
    """Run a guide block as the module ``guide_<name>``, as a plugin author's file would be."""
    source = guide_block(name)
    assert "_sockserve" not in source and "sockserve.core" not in source, "private names in the guide"
    module = types.ModuleType(f"guide_{name}")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{GUIDE}:{name}", "exec"), module.__dict__)  # noqa: S102
    return module


@pytest.fixture
def guide_strategy() -> Any:
    yield load_guide_module("strategy")
    sys.modules.pop("guide_strategy", None)


@pytest.fixture
def guide_layer() -> Any:
    yield load_guide_module("layer")
    sys.modules.pop("guide_layer", None)


class Gate(sockserve.BaseRequestHandler):
    """Answers once the test opens the gate; counts how many run at once."""

    gate = threading.Event()
    lock = threading.Lock()
    running = 0
    most = 0

    def handle(self) -> None:
        cls = type(self)
        with cls.lock:
            cls.running += 1
            cls.most = max(cls.most, cls.running)
        try:
            self.request.recv(16)
            cls.gate.wait(10)
            self.request.sendall(b"done")
        finally:
            with cls.lock:
                cls.running -= 1


def test_guide_strategy_bounds_concurrent_handlers_and_answers_everyone(guide_strategy):
    cls = sockserve.compose("tcp", guide_strategy.BoundedThreadsMixIn, options={"max_threads": 2})
    assert cls.__name__ == "BoundedThreadsTCPServer"
    Gate.gate.clear()
    Gate.running = Gate.most = 0
    with no_leaks(), serving(cls(("127.0.0.1", 0), Gate)) as server:
        clients = [socket.create_connection(server.server_address, timeout=10) for _ in range(4)]
        try:
            for client in clients:
                client.sendall(b"go")
            assert wait_until(lambda: Gate.running == 2)
            time.sleep(0.3)  # the other two wait in the listen backlog, not in handlers
            assert Gate.running == 2
            Gate.gate.set()
            assert [c.recv(16) for c in clients] == [b"done"] * 4
        finally:
            for client in clients:
                client.close()
    assert Gate.most == 2


class Where(sockserve.BaseRequestHandler):
    def handle(self) -> None:
        payload = self.request.recv(64)
        self.request.sendall(f"{self.client_address[0]}:{self.client_address[1]}|".encode() + payload)


class Seen:
    """Records where the worker-side hooks saw each request come from."""

    def __init__(self) -> None:
        self.finished: list[Any] = []
        self.denied: list[tuple[Any, str]] = []

    @sockserve.hookimpl
    def sockserve_request_finish(self, client_address: Any) -> None:
        self.finished.append(client_address)

    @sockserve.hookimpl
    def sockserve_request_denied(self, client_address: Any, reason: str) -> None:
        self.denied.append((client_address, reason))


def test_guide_layer_replaces_the_address_for_handler_and_hooks(guide_layer):
    seen = Seen()
    cls = sockserve.compose("tcp", "threadpool", layers=[guide_layer.SourceLineLayer], plugins=[seen])
    assert cls.__name__.startswith("ThreadpoolSourceLineTCPServer")
    with no_leaks(), serving(cls(("127.0.0.1", 0), Where)) as server:
        with socket.create_connection(server.server_address, timeout=10) as client:
            client.sendall(b"FROM 192.0.2.7 4242\nhello")
            assert client.recv(64) == b"192.0.2.7:4242|hello"  # the header was not read past
        assert wait_until(lambda: seen.finished)
    assert seen.finished == [("192.0.2.7", 4242)]


def test_guide_layer_timeout_denies_the_request_in_one_line_without_a_traceback(guide_layer, caplog, capsys):
    seen = Seen()
    cls = sockserve.compose("tcp", "threading", layers=[guide_layer.SourceLineLayer], plugins=[seen],
                            options={"header_timeout": 0.2})
    with no_leaks(), serving(cls(("127.0.0.1", 0), Where)) as server:
        with socket.create_connection(server.server_address, timeout=10) as client:
            assert client.recv(64) == b""  # closed after the header timeout, no answer
        assert wait_until(lambda: seen.denied)
        assert server.requests_denied["timeout"] == 1
    assert [reason for _, reason in seen.denied] == ["timeout"]
    assert seen.finished == []
    assert "Traceback" not in capsys.readouterr().err
    assert not any(record.exc_info for record in caplog.records)


def test_guide_layer_option_is_checked_like_every_other(guide_layer):
    with pytest.raises(sockserve.OptionError, match="header_timeout"):
        sockserve.compose("tcp", "sync", layers=[guide_layer.SourceLineLayer],
                          options={"header_timeout": -1})


# The same examples through the conformance kit, as their author's own tests would run them.
_strategy_module = load_guide_module("strategy")
_layer_module = load_guide_module("layer")


class TestGuideStrategyConforms(StrategyTests):
    strategy = _strategy_module.BoundedThreadsMixIn
    options = {"max_threads": 4}
    transports = ("tcp", "unix")


def _bad_header(sock: socket.socket) -> None:
    sock.sendall(b"HELLO\n")


class TestGuideLayerConforms(LayerTests):
    layer = _layer_module.SourceLineLayer
    options = {"header_timeout": 0.3}
    strategies = ("sync", "threading", "threadpool")
    expected_client = ("192.0.2.9", 77)

    def client_session(self, sock: socket.socket) -> socket.socket:
        sock.sendall(b"FROM 192.0.2.9 77\n")
        return sock

    def failing_clients(self) -> dict[str, Any]:
        # Part of a header, then nothing: under threadpool a client that sends nothing
        # at all is closed by first_byte_timeout before the layer runs.
        return {"timeout": lambda sock: sock.sendall(b"FROM 192"), "bad-header": _bad_header}
