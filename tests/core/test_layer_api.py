"""The parts of the layer API that the tls and proxy layers are built on (DESIGN.md section 6):
a ``LayerError`` raised from ``verify_request`` (an allow-list on the serving thread, before
anything is read), a layer that logs its refusals itself (``log=False``), and ``reload()``.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest

import sockserve
from sockserve import registry

from ..support import EchoUpper, no_leaks, read_to_eof, serving, tcp_client, wait_until

LOOPBACK = ("127.0.0.1", 0)
STRATEGIES = ["sync", "threading", "threadpool"]


class AllowNone:
    """Refuses every peer on the serving thread, as an allow-list refuses a stranger."""

    quiet = False

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.verified_on = "serving thread"
        raise sockserve.LayerError(
            "not-allowed", client_address, "not in the allow-list", log=not self.quiet
        )


class AllowNoneQuietly(AllowNone):
    quiet = True


class Reloads:
    reloads = 0

    def prepare_request(self, request: Any, client_address: Any) -> tuple[Any, Any]:
        return super().prepare_request(request, client_address)  # type: ignore[misc,no-any-return]

    def reload(self) -> bool:
        Reloads.reloads += 1
        return super().reload()  # type: ignore[misc,no-any-return]


def closed_unanswered(client: socket.socket) -> bool:
    """The server closed *client* without a byte of answer (a reset: it left data unread)."""
    try:
        return read_to_eof(client) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("concurrency", STRATEGIES)
def test_layer_error_from_verify_request_closes_without_reading_and_counts_the_reason(
    concurrency, caplog
):
    denied = []

    class Seen:
        @sockserve.hookimpl
        def sockserve_request_denied(self, server, request, client_address, reason):
            denied.append(reason)

    cls = registry.compose("tcp", concurrency, layers=[AllowNone], plugins=[Seen()])
    with no_leaks(), caplog.at_level(logging.WARNING, logger="sockserve"):
        with serving(cls(LOOPBACK, EchoUpper)) as server:
            with tcp_client(server) as client:
                client.sendall(b"never read\n")
                assert closed_unanswered(client)
            assert wait_until(lambda: server.requests_denied["not-allowed"] == 1)
    assert denied == ["not-allowed"]
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1 and "not-allowed: not in the allow-list" in lines[0], lines
    assert not [r for r in caplog.records if r.exc_info], "a refusal is no traceback"


def test_layer_error_with_log_false_writes_no_line_of_its_own(caplog):
    cls = registry.compose("tcp", "threading", layers=[AllowNoneQuietly])
    with caplog.at_level(logging.DEBUG, logger="sockserve"):
        with serving(cls(LOOPBACK, EchoUpper)) as server:
            for _ in range(3):
                with tcp_client(server) as client:
                    assert read_to_eof(client) == b""
            assert wait_until(lambda: server.requests_denied["not-allowed"] == 3)
    assert not [r for r in caplog.records if "refused" in r.getMessage()]


def test_layer_error_from_prepare_request_with_log_false_is_counted_not_logged(caplog):
    class Quiet:
        def prepare_request(self, request: Any, client_address: Any) -> tuple[Any, Any]:
            raise sockserve.LayerError("bad-header", client_address, "nope", log=False)

    cls = registry.compose("tcp", "threadpool", layers=[Quiet])
    with caplog.at_level(logging.DEBUG, logger="sockserve"):
        with serving(cls(LOOPBACK, EchoUpper)) as server:
            with tcp_client(server) as client:
                client.sendall(b"x")
                assert closed_unanswered(client)
            assert wait_until(lambda: server.requests_denied["bad-header"] == 1)
    assert not [r for r in caplog.records if "refused" in r.getMessage()]


def test_reload_chains_through_the_layers_and_the_default_does_nothing():
    plain = registry.compose("tcp", "sync")
    with plain(LOOPBACK, EchoUpper) as server:
        assert server.reload() is True
    cls = registry.compose("tcp", "sync", layers=[Reloads])
    with cls(LOOPBACK, EchoUpper) as server:
        server.reload()
        server.reload()
    assert Reloads.reloads == 2


def test_a_refused_peer_does_not_stop_the_next_one_from_being_served():
    class AllowOdd:
        def verify_request(self, request: socket.socket, client_address: Any) -> bool:
            if client_address[1] % 2:
                return super().verify_request(request, client_address)  # type: ignore[misc,no-any-return]
            raise sockserve.LayerError("not-allowed", client_address, log=False)

    cls = registry.compose("tcp", "threading", layers=[AllowOdd])
    answered = refused = 0
    with serving(cls(LOOPBACK, EchoUpper)) as server:
        for _ in range(10):
            with tcp_client(server) as client:
                if client.getsockname()[1] % 2:
                    client.sendall(b"hi\n")
                reply = read_to_eof(client)
                if client.getsockname()[1] % 2:
                    assert reply == b"HI\n"
                    answered += 1
                else:
                    assert reply == b""  # nothing sent: a clean close
                    refused += 1
        assert wait_until(lambda: server.requests_denied["not-allowed"] == refused)
    assert answered + refused == 10
