"""The test classes a plugin's own tests subclass: ``StrategyTests``, ``TransportTests``,
``LayerTests``. Each names its plugin in class attributes and inherits the shared
scenarios as pytest test methods; the scenarios themselves are in ``_scenarios.py`` and
``_stage.py``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import pytest

from . import _scenarios as scenarios
from . import _stage as stage
from ._harness import (
    FEATURES,
    Subject,
    child_pids,
    is_stream_transport,
    kill_children,
    require,
    transport_needs,
)
from ._layer import KIT_ADDRESS, KitLayer
from ._recorder import Recorder

__all__ = ["LayerTests", "StrategyTests", "TransportTests"]

#: The transports sockserve ships, for strategies that serve them all.
ALL_TRANSPORTS = ("tcp", "tcp6", "udp", "udp6", "unix", "unix-dgram")
#: Requests in the many-requests scenarios.
MANY = 1000


class _KitBase:
    """Fixtures every kit class uses."""

    #: Options every server of the class gets (``compose(..., options=...)``).
    options: ClassVar[Mapping[str, Any]] = {}

    @pytest.fixture
    def recorder(self, tmp_path: Any) -> Recorder:
        """A ``Recorder`` writing to a file in this test's ``tmp_path``."""
        return Recorder(tmp_path / "hooks.jsonl")

    @pytest.fixture
    def kit_subject(self) -> Iterator[Callable[..., Subject]]:
        """A factory of ``Subject`` objects; their Unix-socket directories go afterwards."""
        made: list[Subject] = []

        def make(**parts: Any) -> Subject:
            subject = Subject(**parts)
            made.append(subject)
            subject.check_platform()
            return subject

        yield make
        for subject in made:
            subject.cleanup()

    @pytest.fixture(autouse=True)
    def _no_stray_children(self) -> Iterator[None]:
        """Fail, and kill by pid, any child process a scenario leaves running."""
        before = child_pids()
        yield
        stray = child_pids() - before
        kill_children(stray)
        assert not stray, f"child processes left running: {sorted(stray)}"


# --------------------------------------------------------------------------- strategies


class StrategyTests(_KitBase):
    """The shared scenarios for a concurrency strategy.

    Subclass it in a test module (the name must start with ``Test``) and name the
    strategy::

        from sockserve.testing import StrategyTests

        class TestProcessPool(StrategyTests):
            strategy = "processpool"            # or the mixin class itself
            options = {"workers": 2}
            transports = ("tcp", "tcp6", "unix")
            forks = True

    Scenarios: echo over each of ``transports``; ``shutdown()`` of an idle server within
    a second; the drain with ``drain_timeout=None`` (a request in flight completes) and
    with a deadline (a stuck handler is cut off, the client sees EOF or a reset);
    a handler that raises (``handle_error`` runs, serving goes on); ``connections``
    connections leaving no descriptor, thread or child behind; when ``forks``, a worker
    forked while serving holds none of its parent's serve-loop sockets; and the layer
    stage with ``KitLayer``: the handler, ``request_finish``, ``handle_error``, the
    access log and the drain's cut-off see its ``Wrapped`` socket and ``KIT_ADDRESS``,
    and a layer timeout denies the request without a traceback.
    """

    #: The strategy: a ``sockserve.concurrency`` plugin name or a mixin class.
    strategy: ClassVar[Any]
    #: Mixins composed after it (``[sockserve.ThreadpoolMixIn]`` inside prefork).
    mixins: ClassVar[tuple[type, ...]] = ()
    #: The transports the strategy serves; the drain and layer scenarios use the first
    #: stream transport among them.
    transports: ClassVar[tuple[str, ...]] = ALL_TRANSPORTS
    #: The strategy runs handlers in other processes (forking, prefork, a process pool).
    forks: ClassVar[bool] = False
    #: Connections in the many-connections scenario.
    connections: ClassVar[int] = MANY

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "kit_transport" in metafunc.fixturenames:
            metafunc.parametrize("kit_transport", list(self.transports))

    def _subject(self, kit_subject: Callable[..., Subject], transport: str | None = None) -> Subject:
        if self.forks:
            require("fork")
        if transport is None:
            transport = self._stream_transport()
        return kit_subject(transport=transport, strategy=self.strategy,
                           mixins=tuple(self.mixins), options=dict(self.options))

    def _stream_transport(self) -> str:
        """The first of ``transports`` that is a stream transport available here."""
        for transport in self.transports:
            if is_stream_transport(transport) and all(
                FEATURES[need] for need in transport_needs(transport)
            ):
                return transport
        pytest.skip("the strategy serves no stream transport available here")

    # -- the scenarios

    def test_echo_over_each_transport(self, kit_subject: Any, kit_transport: str,
                                      recorder: Recorder) -> None:
        scenarios.echo(self._subject(kit_subject, kit_transport), recorder, forks=self.forks)

    def test_shutdown_returns_promptly_when_idle(self, kit_subject: Any) -> None:
        scenarios.prompt_shutdown(self._subject(kit_subject))

    def test_drain_without_deadline_lets_the_request_in_flight_finish(
        self, kit_subject: Any, recorder: Recorder
    ) -> None:
        scenarios.drain_completes(self._subject(kit_subject), recorder)

    def test_drain_deadline_cuts_off_a_stuck_handler(self, kit_subject: Any,
                                                     recorder: Recorder) -> None:
        scenarios.drain_deadline(self._subject(kit_subject), recorder, forks=self.forks)

    def test_handler_exception_goes_to_handle_error_and_serving_goes_on(
        self, kit_subject: Any, recorder: Recorder
    ) -> None:
        scenarios.handler_error(self._subject(kit_subject), recorder)

    def test_many_connections_leave_nothing_behind(self, kit_subject: Any) -> None:
        scenarios.many_requests(self._subject(kit_subject), self.connections)

    def test_a_worker_forked_while_serving_holds_no_serve_loop_socket(
        self, kit_subject: Any, recorder: Recorder
    ) -> None:
        if not self.forks:
            pytest.skip("the strategy does not fork (forks = False)")
        scenarios.after_fork_hygiene(self._subject(kit_subject), recorder)

    # -- the layer stage, with KitLayer

    def _layered(self, kit_subject: Any) -> Subject:
        subject = self._subject(kit_subject)
        subject.layers = (KitLayer,)
        return subject

    def test_layer_result_is_what_handler_hooks_and_access_log_see(
        self, kit_subject: Any, recorder: Recorder, tmp_path: Any
    ) -> None:
        stage.layer_result_seen_everywhere(
            self._layered(kit_subject), recorder, tmp_path / "access.log",
            layer_options={"kit_recorder": recorder},
            expected_request="Wrapped", expected_client=KIT_ADDRESS,
        )
        # shutdown_request shut the Wrapped connection down, not the socket inside it.
        assert [e["how"] for e in recorder.events("wrapped_shutdown")] == ["SHUT_WR"] * 2

    def test_drain_cut_off_reaches_the_connection_a_layer_returned(
        self, kit_subject: Any, recorder: Recorder
    ) -> None:
        stage.layer_cut_off(self._layered(kit_subject), recorder,
                            layer_options={"kit_recorder": recorder}, forks=self.forks)
        shutdowns = [e["how"] for e in recorder.events("wrapped_shutdown")]
        assert "SHUT_RDWR" in shutdowns, (
            f"the drain's cut-off did not shut the Wrapped connection down: {shutdowns}"
        )

    def test_a_layer_timeout_denies_the_request_without_a_traceback(
        self, kit_subject: Any, recorder: Recorder, tmp_path: Any, capfd: Any
    ) -> None:
        stage.layer_denied(
            self._layered(kit_subject), recorder, tmp_path / "access.log", capfd,
            layer_options={"kit_recorder": recorder, "kit_timeout": 0.3},
            reason="timeout", act=_send_one_byte,
        )


# --------------------------------------------------------------------------- transports


class TransportTests(_KitBase):
    """The shared scenarios for a transport.

    ::

        class TestSeqpacket(TransportTests):
            transport = "unix-seqpacket"
            strategies = ("sync", "threading", "forking")

    Scenarios: echo under each of ``strategies``; ``shutdown()`` of an idle server within
    a second; a handler that raises; ``requests`` requests (connections, or datagrams)
    leaving nothing behind; a closed server refusing new clients (a datagram client is
    told by the kernel). Addresses are loopback port 0 for AF_INET/AF_INET6 and a fresh
    path for AF_UNIX.
    """

    #: The transport: a ``sockserve.transports`` plugin name (or a ``Transport``).
    transport: ClassVar[Any]
    #: The strategies the echo scenario runs under.
    strategies: ClassVar[tuple[Any, ...]] = ("sync", "threading")
    #: Requests in the many-requests scenario.
    requests: ClassVar[int] = MANY

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "kit_strategy" in metafunc.fixturenames:
            ids = [s if isinstance(s, str) else s.__name__ for s in self.strategies]
            metafunc.parametrize("kit_strategy", list(self.strategies), ids=ids)

    def _subject(self, kit_subject: Callable[..., Subject], strategy: Any = "sync") -> Subject:
        if strategy in ("forking", "prefork"):
            require("fork")
        return kit_subject(transport=self.transport, strategy=strategy, options=dict(self.options))

    def test_echo_under_each_strategy(self, kit_subject: Any, kit_strategy: Any,
                                      recorder: Recorder) -> None:
        forks = kit_strategy in ("forking", "prefork")
        scenarios.echo(self._subject(kit_subject, kit_strategy), recorder, forks=forks)

    def test_shutdown_returns_promptly_when_idle(self, kit_subject: Any) -> None:
        scenarios.prompt_shutdown(self._subject(kit_subject))

    def test_handler_exception_goes_to_handle_error_and_serving_goes_on(
        self, kit_subject: Any, recorder: Recorder
    ) -> None:
        scenarios.handler_error(self._subject(kit_subject), recorder)

    def test_many_requests_leave_nothing_behind(self, kit_subject: Any) -> None:
        scenarios.many_requests(self._subject(kit_subject, "threading"), self.requests)

    def test_a_closed_server_refuses_new_clients(self, kit_subject: Any) -> None:
        scenarios.closed_server_refuses(self._subject(kit_subject))


# --------------------------------------------------------------------------- layers


def _send_nothing(client: socket.socket) -> None:
    """A client that connects and then says nothing (the layer must time out)."""


def _send_one_byte(client: socket.socket) -> None:
    """A client that sends one byte of KitLayer's two-byte greeting, then stalls: it is
    readable, so every strategy hands it to a worker, where the layer times out."""
    client.sendall(b"k")


class LayerTests(_KitBase):
    """The shared scenarios for a per-connection layer (DESIGN.md section 6).

    ::

        class TestProxyLayer(LayerTests):
            layer = "proxy"
            options = {"proxy_timeout": 0.3}

            def client_session(self, sock):
                sock.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 80\\r\\n")
                return sock

            expected_client = ("203.0.113.7", 5555)

    Scenarios, under each of ``strategies``: a request and a failing request through the
    layer, where the handler, ``in_flight``, the worker-side hooks, ``handle_error`` and
    the access log all see what the layer returned (``expected_request``,
    ``expected_client`` when given); a handler stuck on the layer's connection cut off at
    the drain deadline; each client of ``failing_clients()`` denied with its reason, one
    line and no traceback. The layer must fail a silent client well within ten seconds
    (set its timeout in ``options``: a second or less keeps the tests quick). Under
    strategies that hand a connection over only once it is readable (``threadpool``,
    ``prefork``), a client that sends nothing never reaches the layer (it is closed at
    ``first_byte_timeout``): there, make ``failing_clients()`` send part of a greeting.
    """

    #: The layer: a ``sockserve.layers`` plugin name or the layer class.
    layer: ClassVar[Any]
    #: The transport to test it on (a stream transport).
    transport: ClassVar[Any] = "tcp"
    #: The strategies each scenario runs under.
    strategies: ClassVar[tuple[Any, ...]] = ("sync", "threading")
    #: The type name of the request the layer returns (``"SSLSocket"``), or None.
    expected_request: ClassVar[str | None] = None
    #: The client address the layer reports, or None.
    expected_client: ClassVar[Any] = None

    def client_session(self, sock: socket.socket) -> socket.socket:
        """The client's side of the layer on a connected socket; returns the socket to
        use (a TLS client wraps it). The default does nothing."""
        return sock

    def failing_clients(self) -> dict[str, Callable[[socket.socket], object]]:
        """Reason -> what a client does on its (raw) connection to make the layer fail
        with that reason. The default: a client that sends nothing, ``"timeout"``."""
        return {"timeout": _send_nothing}

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "kit_strategy" in metafunc.fixturenames:
            ids = [s if isinstance(s, str) else s.__name__ for s in self.strategies]
            metafunc.parametrize("kit_strategy", list(self.strategies), ids=ids)
        if "kit_failure" in metafunc.fixturenames:
            metafunc.parametrize("kit_failure", sorted(self.failing_clients()))

    def _subject(self, kit_subject: Callable[..., Subject], strategy: Any) -> Subject:
        if strategy in ("forking", "prefork"):
            require("fork")
        return kit_subject(transport=self.transport, strategy=strategy, layers=(self.layer,),
                           options=dict(self.options), session=self.client_session)

    def test_layer_result_is_what_handler_hooks_and_access_log_see(
        self, kit_subject: Any, kit_strategy: Any, recorder: Recorder, tmp_path: Any
    ) -> None:
        stage.layer_result_seen_everywhere(
            self._subject(kit_subject, kit_strategy), recorder, tmp_path / "access.log",
            layer_options={}, expected_request=self.expected_request,
            expected_client=self.expected_client,
        )

    def test_drain_cut_off_reaches_the_layer_connection(
        self, kit_subject: Any, kit_strategy: Any, recorder: Recorder
    ) -> None:
        forks = kit_strategy in ("forking", "prefork")
        stage.layer_cut_off(self._subject(kit_subject, kit_strategy), recorder,
                            layer_options={}, forks=forks)

    def test_a_failing_client_is_denied_without_a_traceback(
        self, kit_subject: Any, kit_strategy: Any, kit_failure: str, recorder: Recorder,
        tmp_path: Any, capfd: Any
    ) -> None:
        act = self.failing_clients()[kit_failure]
        stage.layer_denied(
            self._subject(kit_subject, kit_strategy), recorder,
            tmp_path / "access.log", capfd, layer_options={}, reason=kit_failure, act=act,
        )

