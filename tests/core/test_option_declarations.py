"""Declaring options as a plugin author does (issue 8 item 9): the public field factories,
required options and checks across fields, defaults declared once, Python-only options,
one declaration per name, options of lifecycle plugins registered for every server, the
command line's hint for an option another plugin declares, renamed options."""

from __future__ import annotations

import ssl
import subprocess
import sys
import warnings
from typing import Any

import attrs
import pytest

import sockserve
from sockserve.core._options import parse_command_line_options
from support import EchoUpper, clean_env, exchange, no_leaks, serving


@attrs.define
class GateOptions:
    """A TLS-like layer's options: a file pair, or a ready context, not both."""

    certfile: str | None = sockserve.text(optional=True, default=None)
    keyfile: str | None = sockserve.text(optional=True, default=None)
    context: ssl.SSLContext | None = sockserve.python_object(ssl.SSLContext)
    greeting: str = sockserve.text(required=True)
    low: int = sockserve.count(0, default=1)
    high: int = sockserve.count(0, default=5)
    sockserve_checks = (
        sockserve.requires("keyfile", "certfile"),
        sockserve.exclusive("certfile", "context"),
        sockserve.option_check("low", "high", test=lambda low, high: low <= high,
                               message="option low ({low}) must not exceed option high ({high})"),
    )


@sockserve.declare_options(GateOptions)
class GateMixIn:
    """Prefixes every answer with its greeting: shows the options reach the server."""

    greeting: str
    low: int

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.sendall(self.greeting.encode() + b"|")
        super().finish_request(request, client_address)  # type: ignore[misc]


def gate_class(**options: Any) -> type:
    base = type("GateTCPServer", (GateMixIn, sockserve.ThreadingTCPServer), {})
    return sockserve.with_options(base, options)


def test_declared_defaults_are_class_attributes_at_import_and_serve():
    # Declared once, on the options class: the mixin has them before any server class.
    assert (GateMixIn.low, GateMixIn.high, GateMixIn.certfile, GateMixIn.context) == (1, 5, None, None)
    assert sockserve.ThreadpoolMixIn.threads >= 5 and sockserve.ThreadpoolMixIn.backlog == 64
    assert sockserve.TCPServer.request_queue_size == 5  # the standard module's value
    with no_leaks(), serving(gate_class(greeting="hello")(("127.0.0.1", 0), EchoUpper)) as server:
        assert exchange(server, b"hi") == b"hello|HI"


def test_a_required_option_not_set_fails_at_construction_naming_it_and_binds_nothing():
    cls = type("GateTCPServer", (GateMixIn, sockserve.ThreadingTCPServer), {})
    with no_leaks():
        with pytest.raises(sockserve.OptionError) as caught:
            cls(("127.0.0.1", 0), EchoUpper)
    assert str(caught.value) == "option greeting is required"
    with pytest.raises(sockserve.OptionError) as caught:
        gate_class(greeting=None)
    assert str(caught.value) == "option greeting is required"


@pytest.mark.parametrize(("options", "message"), [
    ({"keyfile": "k.pem"}, "option keyfile requires option certfile"),
    ({"certfile": "c.pem", "context": ssl.create_default_context()},
     "options certfile and context exclude each other; set one of them"),
    ({"low": 9}, "option low (9) must not exceed option high (5)"),
])
def test_checks_across_fields_fail_with_their_message(options, message):
    with pytest.raises(sockserve.OptionError) as caught:
        gate_class(greeting="x", **options)
    assert str(caught.value) == message


def test_checks_across_fields_also_run_on_a_subclass_before_it_binds():
    cls = type("Bad", (gate_class(greeting="x"),), {"low": 7, "high": 2})
    with no_leaks():
        with pytest.raises(sockserve.OptionError, match=r"option low \(7\) must not exceed"):
            cls(("127.0.0.1", 0), EchoUpper)


def test_any_of_names_the_alternatives():
    check = sockserve.any_of("certfile", "context")
    assert check.problem({"certfile": None, "context": None}) == (
        "one of options certfile or context is required")
    assert check.problem({"certfile": "c.pem", "context": None}) is None


def test_python_only_option_is_set_from_python_and_refused_as_text():
    context = ssl.create_default_context()
    assert gate_class(greeting="x", context=context).context is context
    base = gate_class(greeting="x")
    with pytest.raises(sockserve.OptionError) as caught:
        parse_command_line_options(base, ["context=anything"])
    assert "takes a Python object; set it from Python, not as text" in str(caught.value)
    with pytest.raises(sockserve.OptionError) as caught:
        parse_command_line_options(base, ["contexts=1"])
    assert "context" not in caught.value.known and "greeting" in caught.value.known


def test_a_default_given_twice_differently_is_an_error_naming_both():
    @attrs.define
    class Opts:
        size: int = sockserve.count(1, default=4)

    with pytest.raises(sockserve.OptionError) as caught:
        @sockserve.declare_options(Opts)
        class Twice:
            size = 8
    assert "option 'size' has two defaults" in str(caught.value)
    assert "Opts.size = 4" in str(caught.value) and "Twice.size = 8" in str(caught.value)


def test_two_different_declarations_of_one_name_are_an_error_not_the_later_one_wins():
    @attrs.define
    class A:
        threads: str = sockserve.text(default="many")

    @sockserve.declare_options(A)
    class ThreadsAsText:
        pass

    # Found when the server class is made, not when a server binds.
    with pytest.raises(sockserve.OptionError) as caught:
        type("Clash", (ThreadsAsText, sockserve.ThreadpoolMixIn, sockserve.TCPServer), {})
    text = str(caught.value)
    assert "option 'threads' is declared twice" in text
    assert "(ThreadpoolOptions)" in text and "<locals>.A)" in text


def test_equal_declarations_of_one_name_by_two_strategies_are_one_option():
    # threading and forking both declare block_on_close the same way.
    cls = type("Both", (sockserve.ThreadingMixIn, sockserve.ForkingMixIn, sockserve.TCPServer), {})
    derived = sockserve.with_options(cls, {"block_on_close": False})
    assert derived.block_on_close is False


class GlobalLimits:
    """A lifecycle plugin registered for every server, declaring an option."""

    @attrs.define
    class sockserve_options:  # noqa: N801 - the attribute name sockserve looks for
        max_greeting: int = sockserve.count(1, default=3)

    def __init__(self) -> None:
        self.read: list[int] = []

    @sockserve.hookimpl
    def sockserve_server_activate(self, server: Any) -> None:
        self.read.append(sockserve.read_options(server, self.sockserve_options).max_greeting)


def test_a_globally_registered_plugin_declares_options_for_every_server():
    plugin = GlobalLimits()
    manager = sockserve.get_plugin_manager()
    manager.register(plugin, name="global-limits")
    try:
        cls = sockserve.compose("tcp", "threadpool", options={"max_greeting": 7})
        with no_leaks(), serving(cls(("127.0.0.1", 0), EchoUpper)) as server:
            assert exchange(server, b"a") == b"A"
        with serving(sockserve.ThreadingTCPServer(("127.0.0.1", 0), EchoUpper)):
            pass
        assert plugin.read == [7, 3]  # the value set, then the declared default
        with pytest.raises(sockserve.OptionError) as caught:
            sockserve.compose("tcp", "sync", options={"max_greeting": 0})
        assert "'max_greeting' must be an int >= 1 (got 0)" in str(caught.value)
    finally:
        manager.unregister(plugin)
    with pytest.raises(sockserve.OptionError):
        sockserve.compose("tcp", "sync", options={"max_greeting": 7})


def test_threadpool_old_name_workers_still_sets_threads_with_a_warning():
    with pytest.warns(DeprecationWarning, match="option 'workers' of sockserve.ThreadpoolMixIn "
                      "is now called 'threads'") as caught:
        cls = sockserve.compose("tcp", "threadpool", options={"workers": 3})
    assert caught[0].filename == __file__  # points at the caller, not at sockserve
    assert cls.threads == 3
    with pytest.warns(DeprecationWarning, match="is now called 'threads'"):
        Old = type("Old", (sockserve.ThreadpoolMixIn, sockserve.TCPServer), {"workers": 2})
    assert Old.threads == 2
    with no_leaks(), serving(cls(("127.0.0.1", 0), EchoUpper)) as server:
        assert exchange(server, b"x") == b"X"
    # In prefork, ``workers`` is prefork's own option: no warning, threads untouched.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre = sockserve.compose("tcp", "prefork", mixins=[sockserve.ThreadpoolMixIn],
                                options={"workers": 2})
    assert (pre.workers, pre.threads) == (2, sockserve.ThreadpoolMixIn.threads)


@pytest.mark.parametrize(("option", "hint"), [
    ("threads=4", "it is declared by --concurrency threadpool: add that to the command line"),
    ("max_packet_size=512", "--transport udp"),
])
def test_cli_unknown_option_says_which_plugin_declares_it(tmp_path, option, hint):
    result = subprocess.run(
        [sys.executable, "-m", "sockserve", "serve", "127.0.0.1:0", "-o", option],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert f"unknown option '{option.partition('=')[0]}' for ThreadingTCPServer; " in result.stderr
    assert hint in result.stderr
    assert "Traceback" not in result.stderr
