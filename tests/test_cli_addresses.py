"""``sockserve serve ADDRESS... [HANDLER]`` (DESIGN.md section 5): several addresses served
by one server, which token is the HANDLER, the startup lines, and bad input that exits 2
leaving nothing bound or running. Real processes in their own session, torn down by pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sockserve.core._cli import UsageError, split_targets
from support import (
    SCRIPTS,
    ask_stream,
    child_pids,
    clean_env,
    read_banner,
    requirement,
    requires_af_unix,
    requires_fork,
    requires_ipv6,
    wait_until,
)

#: Seconds a CLI process gets to start serving or to finish: generous for a loaded CI box.
START_TIMEOUT = 30
FINISH_TIMEOUT = 30
SERVING = re.compile(r"sockserve: (\S+) serving on (\S+) with (\S+);(?: also on ([^;]+);)?")
DEMO = "sockserve.core._demo:UpperCaseHandler"


@contextlib.contextmanager
def serve_process(*args: str, cwd: Path, env: dict[str, str] | None = None
                  ) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m sockserve serve ARGS`` in its own session; on exit its process group
    (it and any worker) is killed by its pid if it still runs, and it is reaped."""
    proc = subprocess.Popen([sys.executable, "-m", "sockserve", "serve", *args], cwd=cwd,
                            env=env or clean_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(FINISH_TIMEOUT)
        assert proc.stderr is not None
        proc.stderr.close()


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sockserve", *args], cwd=cwd, env=env or clean_env(),
                          capture_output=True, text=True, timeout=FINISH_TIMEOUT, start_new_session=True)


def addresses_of(banner: str) -> list[str]:
    """Every address the ``serving on`` line names, the first one first."""
    match = SERVING.search(banner)
    assert match, banner
    also = match.group(4)
    return [match.group(2), *([] if also is None else also.split(", "))]


def inet(shown: str) -> tuple[str, int]:
    host, _, port = shown.rpartition(":")
    return host.strip("[]"), int(port)


def stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=FINISH_TIMEOUT)
    return proc.returncode, err.decode(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_bindable(address: tuple[str, int], family: int = socket.AF_INET) -> None:
    """Nothing listens on *address* (SO_REUSEADDR: its closed connections may linger in
    TIME_WAIT, but a listening socket still makes the bind fail)."""
    with socket.socket(family) as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(address)


# --------------------------------------------------------------------------- which token is which


@pytest.mark.parametrize("tokens,addresses,handler", [
    ([], ["localhost:9999"], DEMO),
    (["8000"], ["8000"], DEMO),
    (["mymod:Handler"], ["localhost:9999"], "mymod:Handler"),
    (["0.0.0.0:8000", "[::]:8000", "pkg.mod:Echo"], ["0.0.0.0:8000", "[::]:8000"], "pkg.mod:Echo"),
    (["127.0.0.1:8000", "unix:/tmp/x.sock"], ["127.0.0.1:8000", "unix:/tmp/x.sock"], DEMO),
    (["unix:Handler"], ["unix:Handler"], DEMO),  # unix: always begins an address
    (["systemd:Web", "fd://3"], ["systemd:Web", "fd://3"], DEMO),
    (["localhost:http"], ["localhost:http"], DEMO),  # a lower-case name: an address (a bad one)
])
def test_the_last_token_is_the_handler_when_it_has_the_module_class_shape(tokens, addresses, handler):
    assert split_targets(tokens) == (addresses, handler)


def test_a_handler_before_an_address_is_a_usage_error_naming_both_shapes():
    with pytest.raises(UsageError) as caught:
        split_targets(["mymod:Handler", "127.0.0.1:8000"])
    message = str(caught.value)
    assert message.startswith("'mymod:Handler' is a HANDLER (module:Class")
    assert "HOST:PORT, [IPV6]:PORT, PORT or unix:PATH" in message and "then at most one HANDLER" in message


def test_a_lower_case_handler_is_read_as_an_address_and_the_error_says_both_shapes(tmp_path):
    result = run_cli("serve", "127.0.0.1:0", "mymod:handler", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("sockserve: error: address 'mymod:handler': port 'handler' "
                                    "is not a number")
    assert "a HANDLER is module:Class" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- several addresses


@pytest.mark.parametrize("concurrency", ["threading", pytest.param("prefork", marks=requires_fork)])
def test_two_addresses_one_server_and_the_startup_lines_list_them(concurrency, tmp_path):
    args = ["127.0.0.1:0", "127.0.0.1:0", "-c", concurrency, "--plugin", "access-log"]
    if concurrency == "prefork":
        args += ["-w", "2"]
    with serve_process(*args, cwd=tmp_path) as proc:
        banner = read_banner(proc, START_TIMEOUT).decode()
        first, second = (inet(shown) for shown in addresses_of(banner))
        assert first != second and 0 not in (first[1], second[1])  # the real ports
        if concurrency == "prefork":
            assert wait_until(lambda: len(child_pids(proc.pid)) == 2, timeout=START_TIMEOUT)
        for _ in range(4):
            assert ask_stream(first, b"one\n") == b"ONE\n"
            assert ask_stream(second, b"two\n") == b"TWO\n"
        if concurrency == "prefork":
            assert len(child_pids(proc.pid)) == 2, "-w 2: two workers serve both addresses"
        status, rest = stop(proc)
    assert status == 0, rest
    said = banner + rest
    setup = next(line for line in said.splitlines() if line.startswith("sockserve: strategy: "))
    if concurrency == "prefork":
        assert setup.startswith("sockserve: strategy: prefork (2 workers, inner sync); ")
    else:
        assert setup.startswith("sockserve: strategy: threading; ")
    assert "transport: tcp; layers: none; plugins: access-log" in setup
    assert any(line.startswith("sockserve: limits: idle_timeout") or line.startswith("sockserve: limits: ")
               for line in said.splitlines())
    assert_bindable(first)
    assert_bindable(second)


@requires_ipv6
def test_ipv4_and_ipv6_wildcards_on_the_same_port(tmp_path):
    for _ in range(5):  # a free port may be taken between probing and binding
        port = free_port()
        with serve_process(f"0.0.0.0:{port}", f"[::]:{port}", cwd=tmp_path) as proc:
            try:
                banner = read_banner(proc, START_TIMEOUT).decode()
            except AssertionError:
                continue
            assert addresses_of(banner) == [f"0.0.0.0:{port}", f"[::]:{port}"]
            assert ask_stream(("127.0.0.1", port), b"four\n") == b"FOUR\n"
            assert ask_stream(("::1", port), b"six\n", socket.AF_INET6) == b"SIX\n"
            assert stop(proc)[0] == 0
        return
    pytest.fail("no free port after 5 tries")


@requires_af_unix
def test_tcp_and_unix_with_a_handler_and_the_socket_file_is_removed(tmp_path):
    path = tmp_path / "second.sock"
    env = clean_env(PYTHONPATH=str(SCRIPTS))  # tests/scripts/cli_handlers.py
    with serve_process("127.0.0.1:0", f"unix:{path}", "cli_handlers:Report", cwd=tmp_path, env=env) as proc:
        banner = read_banner(proc, START_TIMEOUT).decode()
        shown = addresses_of(banner)
        assert shown[1] == f"unix:{path}"
        assert "with cli_handlers.Report;" in banner
        assert ask_stream(inet(shown[0]), b"?").startswith(b"ThreadingTCPServer ")
        assert ask_stream(str(path), b"?", socket.AF_UNIX).startswith(b"ThreadingTCPServer ")
        assert stop(proc)[0] == 0
    assert not path.exists()


def test_check_config_binds_every_address_and_lists_them(tmp_path):
    first, second = free_port(), free_port()
    result = run_cli("serve", f"127.0.0.1:{first}", f"127.0.0.1:{second}", "--check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"configuration OK: ThreadingTCPServer on 127.0.0.1:{first}, 127.0.0.1:{second} with" in result.stderr
    assert_bindable(("127.0.0.1", first))
    assert_bindable(("127.0.0.1", second))


def test_udp_on_two_addresses(tmp_path):
    with serve_process("127.0.0.1:0", "127.0.0.1:0", "--transport", "udp", cwd=tmp_path) as proc:
        for shown in addresses_of(read_banner(proc, START_TIMEOUT).decode()):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(10)
                client.sendto(b"dgram\n", inet(shown))
                assert client.recvfrom(100) == (b"DGRAM\n", inet(shown))
        assert stop(proc)[0] == 0


HAS_SOCKET_ACTIVATE = shutil.which("systemd-socket-activate") is not None


@requirement(HAS_SOCKET_ACTIVATE, "requires_socket_activate: systemd-socket-activate (Debian package systemd)")
def test_systemd_serves_every_socket_it_passed(tmp_path):
    ports = [free_port(), free_port()]
    listen = [arg for port in ports for arg in ("-l", f"127.0.0.1:{port}")]
    proc = subprocess.Popen(["systemd-socket-activate", *listen, sys.executable, "-m", "sockserve",
                             "serve", "systemd"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        for port in ports:  # listening before sockserve starts: the first client starts it
            while time.monotonic() < deadline:
                try:
                    assert ask_stream(("127.0.0.1", port), b"passed %d\n" % port) == b"PASSED %d\n" % port
                    break
                except (ConnectionError, TimeoutError):
                    time.sleep(0.1)
            else:
                pytest.fail(f"port {port} not answered")
        banner = read_banner(proc, START_TIMEOUT).decode()
        assert sorted(addresses_of(banner)) == sorted(f"127.0.0.1:{port}" for port in ports)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(FINISH_TIMEOUT) == 0
        assert proc.stderr is not None
        proc.stderr.close()


# --------------------------------------------------------------------------- bad input: exit 2, nothing left


def assert_nothing_left(result: subprocess.CompletedProcess[str], *ports: int) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "serving on" not in result.stderr
    for port in ports:
        assert_bindable(("127.0.0.1", port))


def test_a_busy_second_address_exits_2_naming_it_and_releases_the_first(tmp_path):
    first = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        result = run_cli("serve", f"127.0.0.1:{first}", f"127.0.0.1:{taken}", cwd=tmp_path)
    assert result.stderr.startswith(f"sockserve: error: address '127.0.0.1:{taken}': [Errno ")
    assert "in use" in result.stderr
    assert_nothing_left(result, first)


@requires_fork
def test_a_malformed_second_address_exits_2_before_anything_is_bound_or_forked(tmp_path):
    first = free_port()
    result = run_cli("serve", f"127.0.0.1:{first}", "[::1]8000", "-c", "prefork", "-w", "2", cwd=tmp_path)
    assert result.stderr.strip() == ("sockserve: error: address '[::1]8000': expected [IPV6]:PORT, "
                                     "e.g. [::1]:9999")
    assert_nothing_left(result, first)


@pytest.mark.parametrize("args,env,says", [
    (("-w", "-1"), {}, "-1 workers: at least 1"),
    (("-w", "0"), {}, "0 workers: at least 1"),
    ((), {"SOCKSERVE_WORKERS": "-1"}, "environment variable SOCKSERVE_WORKERS='-1'"),
    ((), {"WEB_CONCURRENCY": "-3"}, "WEB_CONCURRENCY: -3 workers: at least 1"),
    ((), {"SOCKSERVE_CONCURRENCY": "gevent"}, "no concurrency plugin named 'gevent'"),
    ((), {"SOCKSERVE_LOG_FILE": "/nonexistent-dir/x.log"}, "--log-file '/nonexistent-dir/x.log'"),
])
@requires_fork
def test_bad_worker_counts_and_variables_exit_2_with_nothing_bound_or_forked(tmp_path, args, env, says):
    port = free_port()
    base = () if "SOCKSERVE_CONCURRENCY" in env else ("-c", "prefork")
    result = run_cli("serve", f"127.0.0.1:{port}", *base, *args, cwd=tmp_path, env=clean_env(**env))
    assert says in result.stderr, result.stderr
    assert_nothing_left(result, port)


def test_reuse_port_with_several_addresses_is_refused(tmp_path):
    first, second = free_port(), free_port()
    result = run_cli("serve", f"127.0.0.1:{first}", f"127.0.0.1:{second}", "-c", "prefork",
                     "-o", "reuse_port=true", cwd=tmp_path)
    assert "reuse_port binds one socket per worker" in result.stderr
    assert_nothing_left(result, first, second)
