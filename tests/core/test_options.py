"""Options (core/_options.py): typed, validated server settings.

``sockserve.with_options``, ``compose(..., options=...)`` and ``OptionError``: unknown names
list the known ones, bad values name the option, command-line text is converted to each
option's declared type, and the class that comes out has the values and serves with them.
"""

from __future__ import annotations

import pickle
import socket
import threading

import attrs
import pytest

import sockserve
from sockserve.core._options import parse_option_value
from support import EchoUpper, exchange, no_leaks, serving

#: The options every stream server has (BaseServer's and the stream socket type's).
STREAM_OPTIONS = [
    "allow_reuse_address", "allow_reuse_port", "drain_timeout", "first_byte_timeout",
    "idle_timeout", "ipv6_only", "max_connections", "max_connections_per_ip",
    "request_queue_size", "request_timeout", "timeout",
]


class Settings(sockserve.BaseRequestHandler):
    """Reply with the settings the serving server has."""

    def handle(self) -> None:
        server = self.server
        self.request.recv(1024)
        names = ("daemon_threads", "request_queue_size", "drain_timeout", "greeting")
        text = " ".join(f"{n}={getattr(server, n, '-')!r}" for n in names)
        self.request.sendall(text.encode())


# --------------------------------------------------------------------------- unknown names


@pytest.mark.parametrize(
    "transport,concurrency,extra",
    [
        ("tcp", "sync", []),
        ("tcp", "threading", ["block_on_close", "daemon_threads"]),
        ("tcp", "forking", ["block_on_close", "max_children"]),
        ("udp", "sync", ["max_packet_size"]),
    ],
)
def test_unknown_option_lists_the_known_ones_of_that_class(transport, concurrency, extra):
    known = sorted(STREAM_OPTIONS + extra)
    with pytest.raises(sockserve.OptionError) as caught:
        sockserve.compose(transport, concurrency, options={"bogus": 1})
    error = caught.value
    assert str(error) == f"unknown option 'bogus'; known options: {', '.join(known)}"
    assert (error.key, error.value, error.known) == ("bogus", 1, tuple(known))
    assert isinstance(error, ValueError) and isinstance(error, sockserve.SockserveError)


def test_an_option_of_another_strategy_is_unknown():
    with pytest.raises(sockserve.OptionError) as caught:
        sockserve.compose("tcp", "sync", options={"daemon_threads": True})
    assert caught.value.key == "daemon_threads"
    assert "daemon_threads" not in caught.value.known
    assert str(caught.value).startswith("unknown option 'daemon_threads'; known options: ")


def test_dashes_in_names_are_read_as_underscores():
    cls = sockserve.with_options(
        sockserve.ThreadingTCPServer, {"daemon-threads": True, "request-queue-size": 3}
    )
    assert (cls.daemon_threads, cls.request_queue_size) == (True, 3)
    with pytest.raises(sockserve.OptionError) as caught:
        sockserve.with_options(sockserve.TCPServer, {"no-such-thing": 1})
    assert caught.value.key == "no_such_thing"
    assert str(caught.value).startswith("unknown option 'no_such_thing'; ")


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    "concurrency,options,message",
    [
        ("sync", {"request_queue_size": -1},
         "bad value -1 for option 'request_queue_size': 'request_queue_size' must be an int >= 0 (got -1)"),
        ("sync", {"drain_timeout": -0.5},
         "bad value -0.5 for option 'drain_timeout': 'drain_timeout' must be >= 0 (got -0.5)"),
        ("forking", {"max_children": 0},
         "bad value 0 for option 'max_children': 'max_children' must be an int >= 1 (got 0)"),
        # A bool is an int to Python, but not a count to sockserve.
        ("forking", {"max_children": True},
         "bad value True for option 'max_children': 'max_children' must be an int >= 1 (got True)"),
    ],
)
def test_value_out_of_range_names_the_option_and_the_range(concurrency, options, message):
    with pytest.raises(sockserve.OptionError) as caught:
        sockserve.compose("tcp", concurrency, options=options)
    [(key, value)] = options.items()
    assert str(caught.value) == message
    assert (caught.value.key, caught.value.value, caught.value.known) == (key, value, ())
    assert isinstance(caught.value.__cause__, ValueError)


def test_udp_max_packet_size_must_be_positive():
    with pytest.raises(sockserve.OptionError) as caught:
        sockserve.compose("udp", "sync", options={"max_packet_size": 0})
    assert str(caught.value) == (
        "bad value 0 for option 'max_packet_size': 'max_packet_size' must be an int >= 1 (got 0)"
    )


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("daemon_threads", "yes", "<class 'bool'>"),
        ("request_queue_size", 2.5, "<class 'int'>"),
        ("ipv6_only", "no", "<class 'bool'>"),
        ("timeout", "3", "(<class 'int'>, <class 'float'>)"),
    ],
)
def test_value_of_the_wrong_type_names_the_option_in_one_readable_line(key, value, expected):
    with pytest.raises(sockserve.OptionError) as caught:
        sockserve.compose("tcp", "threading", options={key: value})
    message = str(caught.value)
    assert message.startswith(f"bad value {value!r} for option {key!r}: {key!r} must be {expected}")
    assert (caught.value.key, caught.value.value) == (key, value)
    assert isinstance(caught.value.__cause__, TypeError)
    # The validator's own words, not the repr of its arguments (attrs passes the field too).
    assert "Attribute(" not in message
    assert "\n" not in message


def test_bad_value_leaves_the_class_untouched():
    base = sockserve.compose("tcp", "threading")
    with pytest.raises(sockserve.OptionError):
        sockserve.compose("tcp", "threading", options={"daemon_threads": True, "request_queue_size": -1})
    assert base.daemon_threads is False and base.request_queue_size == 5


# --------------------------------------------------------------------------- text from the command line


@pytest.mark.parametrize(
    "key,text,value",
    [
        *[("daemon_threads", t, True) for t in ("1", "true", "True", "yes", "on", " ON ")],
        *[("daemon_threads", t, False) for t in ("0", "false", "no", "off", "OFF")],
        ("request_queue_size", "7", 7),
        ("request_queue_size", " 12 ", 12),
        ("drain_timeout", "1.5", 1.5),
        ("drain_timeout", "2", 2.0),
        ("drain_timeout", "none", None),
        ("drain_timeout", "null", None),
        ("drain_timeout", "", None),
        ("ipv6_only", "None", None),
        ("ipv6_only", "on", True),
    ],
)
def test_text_is_converted_to_the_declared_type(key, text, value):
    cls = sockserve.with_options(sockserve.ThreadingTCPServer, {key: text}, from_text=True)
    assert getattr(cls, key) == value
    assert type(getattr(cls, key)) is type(value)


@pytest.mark.parametrize(
    "key,text,expected",
    [
        ("daemon_threads", "maybe", "bool"),
        ("request_queue_size", "7.5", "int"),
        ("request_queue_size", "seven", "int"),
        ("drain_timeout", "soon", "float or none"),
        ("ipv6_only", "2", "bool or none"),
    ],
)
def test_text_that_is_not_of_the_type_names_the_option_and_the_type(key, text, expected):
    with pytest.raises(sockserve.OptionError) as caught:
        sockserve.with_options(sockserve.ThreadingTCPServer, {key: text}, from_text=True)
    assert str(caught.value) == f"bad value {text!r} for option {key!r}: expected {expected}"
    assert (caught.value.key, caught.value.value) == (key, text)


def test_converted_text_is_still_checked_against_the_range():
    with pytest.raises(sockserve.OptionError) as caught:
        sockserve.with_options(sockserve.TCPServer, {"request_queue_size": "-3"}, from_text=True)
    assert str(caught.value) == (
        "bad value -3 for option 'request_queue_size': 'request_queue_size' must be an int >= 0 (got -3)"
    )


def test_str_options_are_taken_as_written_less_surrounding_space():
    assert parse_option_value("name", "  a b  ", str) == "a b"
    assert parse_option_value("name", "none", str | None) is None
    assert parse_option_value("name", "nobody", str | None) == "nobody"


def test_values_that_are_not_text_pass_through_from_text_unchanged():
    cls = sockserve.with_options(sockserve.TCPServer, {"request_queue_size": 9}, from_text=True)
    assert cls.request_queue_size == 9


# --------------------------------------------------------------------------- the resulting class


def test_compose_with_options_gives_a_subclass_with_the_values_that_serves_with_them():
    base = sockserve.compose("tcp", "threading")
    cls = sockserve.compose(
        "tcp", "threading", options={"daemon_threads": True, "request_queue_size": 7, "drain_timeout": 2.5}
    )
    assert cls is not base and issubclass(cls, base)
    assert (cls.__name__, cls.__module__) == ("ThreadingTCPServer", "sockserve")
    # A name of its own in sockserve, so that it pickles.
    assert cls.__qualname__.startswith("ThreadingTCPServer_")
    assert getattr(sockserve, cls.__qualname__) is cls
    assert pickle.loads(pickle.dumps(cls)) is cls
    assert (base.daemon_threads, base.request_queue_size, base.drain_timeout) == (False, 5, None)
    with no_leaks():
        with serving(cls(("127.0.0.1", 0), Settings)) as server:
            assert exchange(server, b"?") == (
                b"daemon_threads=True request_queue_size=7 drain_timeout=2.5 greeting='-'"
            )
    # The standard name is untouched.
    assert sockserve.ThreadingTCPServer.daemon_threads is False


def test_with_options_on_a_user_subclass_keeps_its_own_attributes(tmp_path):
    class Mine(sockserve.ThreadingUnixStreamServer):
        marker = "mine"

    cls = sockserve.with_options(Mine, {"daemon_threads": True})
    assert issubclass(cls, Mine) and cls.__name__ == "Mine" and cls.marker == "mine"
    with serving(cls(str(tmp_path / "opts.sock"), Settings)) as server:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(server.server_address)
            client.sendall(b"?")
            client.shutdown(socket.SHUT_WR)
            reply = client.recv(65536)
    assert reply.startswith(b"daemon_threads=True ")


# --------------------------------------------------------------------------- declared by others


def _nonempty(instance: object, attribute: attrs.Attribute, value: str) -> None:
    if not value:
        raise ValueError(f"'{attribute.name}' must not be empty")


@attrs.define
class GreetingOptions:
    """What the Greeter plugin reads from the server class."""

    greeting: str = attrs.field(validator=[attrs.validators.instance_of(str), _nonempty])
    greet_times: int = attrs.field(validator=attrs.validators.instance_of(int))


class Greeter:
    """A lifecycle plugin with options: greets each client before the handler runs."""

    sockserve_options = GreetingOptions

    @sockserve.hookimpl
    def sockserve_request_start(self, server: sockserve.BaseServer, request: socket.socket) -> None:
        times = getattr(server, "greet_times", 1)
        request.sendall(getattr(server, "greeting", "hello").encode() * times + b"|")


def test_options_declared_by_a_class_plugin_are_known_checked_and_used():
    greeter = Greeter()
    cls = sockserve.compose(
        "tcp", "threading", plugins=[greeter], options={"greeting": "howdy", "greet_times": 2}
    )
    assert (cls.greeting, cls.greet_times) == ("howdy", 2)
    with serving(cls(("127.0.0.1", 0), EchoUpper)) as server:
        assert exchange(server, b"hi") == b"howdyhowdy|HI"
    # Known to the class composed with the plugin, listed with the others ...
    with pytest.raises(sockserve.OptionError) as caught:
        sockserve.compose("tcp", "threading", plugins=[greeter], options={"greetings": "x"})
    assert {"greeting", "greet_times", "daemon_threads"} <= set(caught.value.known)
    # ... checked with the plugin's own validators, also from text ...
    with pytest.raises(sockserve.OptionError) as caught:
        sockserve.compose("tcp", "threading", plugins=[greeter], options={"greeting": ""})
    assert str(caught.value) == "bad value '' for option 'greeting': 'greeting' must not be empty"
    base = sockserve.compose("tcp", "threading", plugins=[greeter])
    assert sockserve.with_options(base, {"greet_times": "3"}, from_text=True).greet_times == 3
    with pytest.raises(sockserve.OptionError) as caught:
        sockserve.with_options(base, {"greet_times": "many"}, from_text=True)
    assert str(caught.value) == "bad value 'many' for option 'greet_times': expected int"
    # ... and unknown to a class composed without it.
    with pytest.raises(sockserve.OptionError) as caught:
        sockserve.compose("tcp", "threading", options={"greeting": "howdy"})
    assert "greeting" not in caught.value.known


def test_options_declared_by_a_user_server_class():
    @attrs.define
    class LimitOptions:
        limit: int = attrs.field(validator=attrs.validators.instance_of(int))

    class Limited(sockserve.ThreadingTCPServer):
        sockserve_options = LimitOptions
        limit = 10

    cls = sockserve.with_options(Limited, {"limit": "4", "daemon_threads": "yes"}, from_text=True)
    assert (cls.limit, cls.daemon_threads) == (4, True)
    with pytest.raises(sockserve.OptionError) as caught:
        sockserve.with_options(Limited, {"limt": 3})
    assert "limit" in caught.value.known and "daemon_threads" in caught.value.known


class WhichThread(sockserve.BaseRequestHandler):
    """Reply whether the thread running the request is a daemon thread."""

    def handle(self) -> None:
        self.request.recv(1024)
        self.request.sendall(b"daemon=%r" % threading.current_thread().daemon)


def test_options_are_class_attributes_shared_by_every_server_of_the_class():
    cls = sockserve.compose("tcp", "threading", options={"daemon_threads": True})
    first, second = cls(("127.0.0.1", 0), WhichThread), cls(("127.0.0.1", 0), WhichThread)
    plain = sockserve.ThreadingTCPServer(("127.0.0.1", 0), WhichThread)
    assert first.daemon_threads is second.daemon_threads is True
    with serving(first), serving(second), serving(plain):
        assert exchange(first, b"?") == exchange(second, b"?") == b"daemon=True"
        assert exchange(plain, b"?") == b"daemon=False"
