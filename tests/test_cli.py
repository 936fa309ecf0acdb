"""The command line (DESIGN.md section 5): ``sockserve serve``, ``sockserve plugins``,
``sockserve --version``, run as real processes; and the address parser (core/_cli.py)."""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import re
import shutil
import signal
import platform
import socket
import time
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sockserve
from sockserve.core._cli import UsageError, parse_address
from support import (
    BUILTIN_CONCURRENCY,
    SCRIPTS,
    ask_stream,
    clean_env,
    make_distribution,
    read_banner,
    requires_af_unix,
    requires_fork,
    requires_ipv6,
    sockserve_process,
)

#: Seconds a CLI process gets to start serving or to finish: generous for a loaded CI box.
START_TIMEOUT = 30
FINISH_TIMEOUT = 30
SERVING = re.compile(r"sockserve: (\S+) serving on (\S+) with (\S+);")
VERSION = importlib.metadata.version("sockserve")


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sockserve ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "sockserve", *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=FINISH_TIMEOUT,
    )


class Running:
    """A ``sockserve serve`` process that announced its address."""

    def __init__(self, proc: subprocess.Popen[bytes], banner: str) -> None:
        self.proc = proc
        self.banner = banner
        match = SERVING.search(banner)
        assert match, banner
        self.class_name, self.shown_address, self.handler = match.groups()
        self.stderr_rest = b""

    @property
    def address(self) -> Any:
        shown = self.shown_address
        if shown.startswith("unix:"):
            return shown[len("unix:"):]
        host, _, port = shown.rpartition(":")
        return host.strip("[]"), int(port)

    def stop(self, sig: int) -> tuple[int, str]:
        """Send *sig*; return the exit status and the rest of stderr."""
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=FINISH_TIMEOUT)
        return self.proc.returncode, (self.stderr_rest + err).decode(errors="replace")


@contextlib.contextmanager
def cli_server(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Iterator[Running]:
    """Start ``python -m sockserve serve ARGS``; wait for its banner; kill it (by pid) on exit."""
    with sockserve_process("serve", *args, cwd=cwd, env=env or clean_env(), timeout=FINISH_TIMEOUT) as proc:
        yield Running(proc, read_banner(proc, START_TIMEOUT).decode(errors="replace"))


# --------------------------------------------------------------------------- serve


def test_serve_default_handler_upper_cases_and_sigterm_exits_cleanly(tmp_path):
    with cli_server("127.0.0.1:0", cwd=tmp_path) as server:
        assert server.class_name == "ThreadingTCPServer"
        host, port = server.address
        assert host == "127.0.0.1" and port != 0
        assert ask_stream(server.address, b"hello, world\n") == b"HELLO, WORLD\n"
        assert ask_stream(server.address, b"again\n") == b"AGAIN\n"
        status, rest = server.stop(signal.SIGTERM)
    assert status == 0
    assert rest.rstrip().endswith("sockserve: stopped")


def test_serve_sigint_exits_cleanly_with_status_zero(tmp_path):
    with cli_server("127.0.0.1:0", cwd=tmp_path) as server:
        assert ask_stream(server.address, b"ctrl-c\n") == b"CTRL-C\n"
        status, rest = server.stop(signal.SIGINT)
    assert status == 0
    assert "Traceback" not in rest
    assert rest.rstrip().endswith("sockserve: stopped")


def test_serve_port_only_address_listens_on_localhost(tmp_path):
    with cli_server("0", cwd=tmp_path) as server:
        host, port = server.address
        assert host == "127.0.0.1"  # localhost, as bound
        assert ask_stream(("127.0.0.1", port), b"port only\n") == b"PORT ONLY\n"
        assert server.stop(signal.SIGTERM)[0] == 0


def test_serve_udp_transport(tmp_path):
    with cli_server("127.0.0.1:0", "--transport", "udp", cwd=tmp_path) as server:
        assert server.class_name == "ThreadingUDPServer"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            client.sendto(b"datagram\n", server.address)
            reply, sender = client.recvfrom(65536)
        assert reply == b"DATAGRAM\n"
        assert sender == server.address
        assert server.stop(signal.SIGTERM)[0] == 0


@requires_ipv6
def test_serve_bracketed_ipv6_address(tmp_path):
    with cli_server("[::1]:0", cwd=tmp_path) as server:
        host, port = server.address
        assert server.shown_address.startswith("[::1]:")
        assert ask_stream(("::1", port), b"six\n", socket.AF_INET6) == b"SIX\n"
        assert server.stop(signal.SIGTERM)[0] == 0


@requires_af_unix
def test_serve_unix_address_and_the_socket_file_is_removed_on_exit(tmp_path):
    path = tmp_path / "cli.sock"
    with cli_server(f"unix:{path}", cwd=tmp_path) as server:
        assert server.class_name == "ThreadingUnixStreamServer"
        assert server.address == str(path)
        assert ask_stream(str(path), b"over unix\n", socket.AF_UNIX) == b"OVER UNIX\n"
        assert server.stop(signal.SIGTERM)[0] == 0
    assert not path.exists()


@requires_fork
def test_serve_forking_concurrency(tmp_path):
    with cli_server("127.0.0.1:0", "--concurrency", "forking", cwd=tmp_path) as server:
        assert server.class_name == "ForkingTCPServer"
        for i in range(3):
            assert ask_stream(server.address, b"fork %d\n" % i) == b"FORK %d\n" % i
        assert server.stop(signal.SIGTERM)[0] == 0


def test_serve_handler_given_as_module_and_class(tmp_path):
    env = clean_env(PYTHONPATH=str(SCRIPTS))  # tests/scripts/cli_handlers.py
    with cli_server("127.0.0.1:0", "cli_handlers:Report", cwd=tmp_path, env=env) as server:
        assert server.handler == "cli_handlers.Report"
        reply = ask_stream(server.address, b"?\n").decode()
        assert reply.startswith("ThreadingTCPServer ")
        assert server.stop(signal.SIGTERM)[0] == 0


def test_serve_options_set_server_settings(tmp_path):
    env = clean_env(PYTHONPATH=str(SCRIPTS))  # tests/scripts/cli_handlers.py
    args = (
        "127.0.0.1:0",
        "cli_handlers:Report",
        "--option",
        "drain_timeout=1",
        "-o",
        "daemon_threads=true",
        "-o",
        "request_queue_size=7",
    )
    with cli_server(*args, cwd=tmp_path, env=env) as server:
        reply = ask_stream(server.address, b"?\n").decode()
        assert reply == (
            "ThreadingTCPServer drain_timeout=1.0 daemon_threads=True request_queue_size=7"
        )
        assert server.stop(signal.SIGTERM)[0] == 0


def test_serve_unknown_option_exits_2_listing_known_options(tmp_path):
    result = run_cli("serve", "127.0.0.1:0", "--option", "bogus=1", cwd=tmp_path)
    assert result.returncode == 2
    message = result.stderr.strip()
    assert message.startswith("sockserve: error: unknown option 'bogus'")
    known = message.partition("known options: ")[2].split(", ")
    for option in ("drain_timeout", "timeout", "daemon_threads", "block_on_close", "request_queue_size"):
        assert option in known
    assert "serving on" not in result.stderr


def test_serve_option_of_the_wrong_type_exits_2_naming_it(tmp_path):
    result = run_cli("serve", "127.0.0.1:0", "--option", "daemon_threads=maybe", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("sockserve: error: ")
    assert "daemon_threads" in result.stderr and "'maybe'" in result.stderr
    assert "serving on" not in result.stderr


@pytest.mark.parametrize(
    "address,detail",
    [
        ("localhost:http", "port 'http' is not a number"),
        ("unix:", "has an empty path"),
    ],
)
def test_serve_bad_address_exits_2_naming_accepted_shapes(address, detail, tmp_path):
    result = run_cli("serve", address, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"sockserve: error: address {address!r}")
    assert detail in result.stderr
    assert "HOST:PORT, [IPV6]:PORT, PORT or unix:PATH" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_port_out_of_range_exits_2_naming_the_range(tmp_path):
    result = run_cli("serve", "127.0.0.1:70000", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "sockserve: error: address '127.0.0.1:70000': port 70000 is out of range 0-65535"
    )


def test_serve_unknown_transport_exits_2_listing_installed(tmp_path):
    result = run_cli("serve", "127.0.0.1:0", "--transport", "carrier-pigeon", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "sockserve: error: no transport plugin named 'carrier-pigeon'; "
        "installed transport plugins: tcp, tcp6, udp, udp6, unix, unix-dgram"
    )


def test_serve_unknown_concurrency_exits_2_listing_installed(tmp_path):
    result = run_cli("serve", "127.0.0.1:0", "-c", "gevent", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "sockserve: error: no concurrency plugin named 'gevent'; "
        f"installed concurrency plugins: {', '.join(BUILTIN_CONCURRENCY)}"
    )


def test_serve_busy_port_exits_2_naming_the_address(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", f"127.0.0.1:{port}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"sockserve: error: [Errno {errno.EADDRINUSE}] ")
    assert f"('127.0.0.1', {port})" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_bad_handler_exits_2(tmp_path):
    result = run_cli("serve", "127.0.0.1:0", "no_such_module_for_cli:Handler", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "sockserve: error: handler 'no_such_module_for_cli:Handler': cannot import 'no_such_module_for_cli'"
    )


def test_serve_help_documents_the_demo_defaults(tmp_path):
    result = run_cli("serve", "--help", cwd=tmp_path)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "(default localhost:9999)" in text
    assert "upper-casing echo" in text


# --------------------------------------------------------------------------- plugins, --version


def test_plugins_lists_every_builtin_with_its_distribution(tmp_path):
    script = shutil.which("sockserve", path=str(Path(sys.executable).parent))
    assert script, "the sockserve console script is not installed next to the interpreter"
    result = subprocess.run(
        [script, "plugins"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
        timeout=FINISH_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for kind, group in sockserve.core._registry.KINDS.items():
        assert any(line.endswith(f"({group}):") for line in lines), group
        for name in sockserve.registry.names(kind):
            info = sockserve.registry.info(kind, name)
            if info.distribution != "sockserve":
                continue
            pattern = re.compile(rf"^\s+{re.escape(name)}\s+sockserve {re.escape(VERSION)}\s+{re.escape(info.value)}$")
            assert any(pattern.match(line) for line in lines), f"{kind} {name} not listed:\n{result.stdout}"
    for builtin in ("tcp", "unix-dgram", "forking", "threading", "inet6", "dgram"):
        assert any(re.match(rf"^\s+{builtin}\s+sockserve {re.escape(VERSION)}\s", line) for line in lines)
    assert "FAILED" not in result.stdout


def test_plugins_marks_one_that_fails_to_load_with_the_reason(tmp_path):
    make_distribution(
        tmp_path,
        "sockserve-broken-cli",
        "0.1",
        {"sockserve.concurrency": {"gevent": "sockserve_broken_cli_missing:GeventMixIn"}},
    )
    result = run_cli("plugins", cwd=tmp_path, env=clean_env(PYTHONPATH=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.strip().startswith("gevent ")]
    assert "sockserve-broken-cli 0.1" in line
    assert line.endswith(
        "[FAILED: ModuleNotFoundError: No module named 'sockserve_broken_cli_missing']"
    )
    assert re.search(r"^\s+threading\s+sockserve ", result.stdout, re.M)


def test_version_prints_the_distribution_version(tmp_path):
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0
    # With the Python version since issue 10 (it was "sockserve VERSION" alone).
    assert result.stdout.strip() == f"sockserve {VERSION} (Python {platform.python_version()})"
    assert VERSION == sockserve.__version__


def test_no_command_prints_help_and_exits_2(tmp_path):
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 2
    assert "serve" in result.stdout and "plugins" in result.stdout


# --------------------------------------------------------------------------- parse_address


@pytest.mark.parametrize(
    "text,expected",
    [
        ("127.0.0.1:8000", (("127.0.0.1", 8000), None)),
        ("localhost:0", (("localhost", 0), None)),
        ("example.org:65535", (("example.org", 65535), None)),
        ("[::1]:9999", (("::1", 9999), None)),
        ("[fe80::1%lo]:80", (("fe80::1%lo", 80), None)),
        ("8000", (("localhost", 8000), None)),
        ("0", (("localhost", 0), None)),
        ("unix:/run/app.sock", ("/run/app.sock", "unix")),
        ("unix:relative.sock", ("relative.sock", "unix")),
        ("unix:\0abstract", ("\0abstract", "unix")),
    ],
)
def test_parse_address_accepts_every_documented_shape(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text,message",
    [
        ("unix:", "address 'unix:' has an empty path; expected HOST:PORT, [IPV6]:PORT, PORT or unix:PATH"),
        ("[::1]9999", "address '[::1]9999': expected [IPV6]:PORT, e.g. [::1]:9999"),
        ("[::1]", "address '[::1]': expected [IPV6]:PORT, e.g. [::1]:9999"),
        ("::1:80", "address '::1:80': put an IPv6 host in brackets, e.g. [::1]:9999"),
        (
            "localhost:http",
            "address 'localhost:http': port 'http' is not a number; "
            "expected HOST:PORT, [IPV6]:PORT, PORT or unix:PATH",
        ),
        ("", "address '': port '' is not a number; expected HOST:PORT, [IPV6]:PORT, PORT or unix:PATH"),
        ("65536", "address '65536': port 65536 is out of range 0-65535"),
        ("host:-1", "address 'host:-1': port -1 is out of range 0-65535"),
    ],
)
def test_parse_address_rejects_other_shapes_saying_what_is_accepted(text, message):
    with pytest.raises(UsageError) as caught:
        parse_address(text)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, sockserve.SockserveError)


# --------------------------------------------------------------------------- limits


def test_serve_turns_limits_on_and_prints_them_and_what_runs_at_once(tmp_path):
    with cli_server("127.0.0.1:0", "-c", "threadpool", "-o", "threads=3", cwd=tmp_path) as server:
        assert ask_stream(server.address, b"limits\n") == b"LIMITS\n"
        status, rest = server.stop(signal.SIGTERM)
    assert status == 0
    said = server.banner + rest
    line = next(text for text in said.splitlines() if text.startswith("sockserve: limits: "))
    for shown in ("first_byte_timeout=10s", "idle_timeout=60s", "request_timeout=300s",
                  "max_connections=1024", "max_connections_per_ip=256",
                  "at most 3 handlers at once: keep-alive clients beyond that wait"):
        assert shown in line, line


def test_serve_limit_turned_off_with_none_and_idle_clients_are_closed_at_idle_timeout(tmp_path):
    args = ("127.0.0.1:0", "-o", "max_connections=none", "-o", "idle_timeout=0.5")
    with cli_server(*args, cwd=tmp_path) as server:
        with socket.create_connection(server.address, timeout=5) as client:
            client.sendall(b"no newline yet")
            start = time.monotonic()
            assert client.recv(100) == b""
            took = time.monotonic() - start
        status, rest = server.stop(signal.SIGTERM)
    assert status == 0
    assert 0.3 < took < 3, took
    said = server.banner + rest
    assert "max_connections=none" in said and "idle_timeout=0.5s" in said
    assert "Traceback" not in said


# --------------------------------------------------------------------------- containers (issue 10, item 3, first part)


def test_check_config_builds_and_binds_then_exits_0_without_serving(tmp_path):
    with socket.socket() as probe:  # a free port, then taken by the check and given back
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_cli("serve", f"127.0.0.1:{port}", "-c", "threadpool", "-o", "threads=3",
                     "--check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"configuration OK: ThreadpoolTCPServer on 127.0.0.1:{port}" in result.stderr
    assert "at most 3 handlers at once" in result.stderr
    assert "serving on" not in result.stderr
    with socket.socket() as again:  # released: nothing kept it
        again.bind(("127.0.0.1", port))


def test_check_config_reports_a_bad_option_with_exit_2(tmp_path):
    result = run_cli("serve", "127.0.0.1:0", "-o", "drain_timeout=-1", "--check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert "drain_timeout" in result.stderr and "Traceback" not in result.stderr


def test_every_flag_also_from_a_sockserve_variable_and_the_command_line_wins(tmp_path):
    env = clean_env(SOCKSERVE_CONCURRENCY="threadpool", SOCKSERVE_OPTION="threads=4 drain_timeout=3",
                    SOCKSERVE_CHECK_CONFIG="1", SOCKSERVE_LOG_LEVEL="warning")
    result = run_cli("serve", "127.0.0.1:0", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "ThreadpoolTCPServer" in result.stderr and "drain_timeout=3s" in result.stderr
    assert "at most 4 handlers" in result.stderr
    result = run_cli("serve", "127.0.0.1:0", "-c", "threading", "-o", "drain_timeout=1",
                     cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "ThreadingTCPServer" in result.stderr and "drain_timeout=1s" in result.stderr


def test_workers_from_w_or_web_concurrency(tmp_path):
    result = run_cli("serve", "127.0.0.1:0", "-c", "prefork", "-w", "3", "--check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "at most 3 handlers at once, one per worker" in result.stderr
    env = clean_env(WEB_CONCURRENCY="2")
    result = run_cli("serve", "127.0.0.1:0", "-c", "prefork", "--check-config", cwd=tmp_path, env=env)
    assert "at most 2 handlers at once, one per worker" in result.stderr, result.stderr
    # A strategy without workers ignores WEB_CONCURRENCY, and refuses -w with a hint.
    result = run_cli("serve", "127.0.0.1:0", "--check-config", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    result = run_cli("serve", "127.0.0.1:0", "-w", "2", "--check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown option 'workers'" in result.stderr and "--concurrency prefork" in result.stderr


@pytest.mark.parametrize("env,args,says", [
    ({"SOCKSERVE_WORKERS": "abc"}, ("-c", "prefork"), "environment variable SOCKSERVE_WORKERS='abc'"),
    ({"SOCKSERVE_CHECK_CONFIG": "maybe"}, (), "environment variable SOCKSERVE_CHECK_CONFIG='maybe'"),
    ({"SOCKSERVE_LOG_LEVEL": "loud"}, (), "environment variable SOCKSERVE_LOG_LEVEL='loud'"),
    ({}, ("-c", "prefork", "-w", "-1"), "at least 1"),
    ({"WEB_CONCURRENCY": "many"}, ("-c", "prefork"), "WEB_CONCURRENCY"),
    ({"SOCKSERVE_WORKRS": "8"}, ("-c", "prefork"),
     "environment variable SOCKSERVE_WORKRS is not a sockserve setting (did you mean SOCKSERVE_WORKERS?)"),
    ({"SOCKSERVE_THREADS": "8"}, (),
     "not a sockserve setting (an option goes in SOCKSERVE_OPTION: SOCKSERVE_OPTION='threads=...')"),
])
def test_bad_values_from_the_environment_or_the_command_line_exit_2_naming_them(tmp_path, env, args, says):
    check = () if "SOCKSERVE_CHECK_CONFIG" in env else ("--check-config",)  # never serve
    result = run_cli("serve", "127.0.0.1:0", *args, *check, cwd=tmp_path, env=clean_env(**env))
    assert result.returncode == 2
    assert says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_the_librarys_own_variables_are_settings_too(tmp_path):
    env = clean_env(SOCKSERVE_DISABLE_PLUGIN_AUTOLOAD="1", SOCKSERVE_BLOCK_PLUGINS="accesslog")
    result = run_cli("serve", "127.0.0.1:0", "--check-config", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    # ...and the error for one that is not names them, so the user sees what there is.
    env["SOCKSERVE_BLOCK_PLUGIN"] = "accesslog"
    result = run_cli("serve", "127.0.0.1:0", "--check-config", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "SOCKSERVE_BLOCK_PLUGIN is not a sockserve setting (did you mean SOCKSERVE_BLOCK_PLUGINS?)" in result.stderr
    assert "SOCKSERVE_DISABLE_PLUGIN_AUTOLOAD" in result.stderr and "Traceback" not in result.stderr
