"""``sockserve serve`` in operation: each prefork worker imports the handler afresh (so a
SIGHUP picks up new code), an error that ends serving exits 1 in one line, ``--log-file``
and its reopening on SIGUSR1 (logrotate). Real processes in their own session, torn down
by pid; handler modules written to a temporary directory.
"""

from __future__ import annotations

import os
import signal
import socket
import textwrap
import time
from pathlib import Path

import pytest

from support import ask_stream, child_pids, clean_env, read_banner, requires_fork, wait_until
from test_cli_addresses import (
    FINISH_TIMEOUT,
    START_TIMEOUT,
    addresses_of,
    assert_bindable,
    inet,
    serve_process,
    stop,
)

#: How long a change (new code, a new log file) may take to show: bounded polling.
SHOWS_WITHIN = 20.0


def write_handler(directory: Path, reply: str) -> None:
    """``versioned:Handler`` in *directory*: answers a line with *reply*. Each version has
    a length of its own, so that a cached bytecode file is never taken for the new source
    (its check is the source's size and mtime in whole seconds)."""
    (directory / "versioned.py").write_text(textwrap.dedent(f"""
        import sockserve

        class Handler(sockserve.StreamRequestHandler):
            def handle(self):
                self.rfile.readline()
                self.wfile.write({reply!r}.encode() + b"\\n")
    """), encoding="utf-8")


def ask_line(address: tuple[str, int]) -> bytes:
    return ask_stream(address, b"which?\n").strip()


@requires_fork
def test_a_prefork_worker_forked_after_the_handler_changed_serves_the_new_code(tmp_path):
    write_handler(tmp_path, "v1")
    env = clean_env(PYTHONPATH=str(tmp_path))
    with serve_process("127.0.0.1:0", "versioned:Handler", "-c", "prefork", "-w", "1",
                       cwd=tmp_path, env=env) as proc:
        address = inet(addresses_of(read_banner(proc, START_TIMEOUT).decode())[0])
        assert ask_line(address) == b"v1"
        write_handler(tmp_path, "version two")
        assert ask_line(address) == b"v1", "the running worker keeps the code it imported"
        os.kill(proc.pid, signal.SIGHUP)  # the supervisor forks a new worker
        assert wait_until(lambda: ask_line(address) == b"version two", timeout=SHOWS_WITHIN, interval=0.2)
        status, rest = stop(proc)
    assert status == 0, rest


@requires_fork
def test_forking_children_run_the_handler_the_server_imported(tmp_path):
    """A child per request is forked from the server: it must not import anew."""
    write_handler(tmp_path, "v1")
    env = clean_env(PYTHONPATH=str(tmp_path))
    with serve_process("127.0.0.1:0", "versioned:Handler", "-c", "forking", cwd=tmp_path, env=env) as proc:
        address = inet(addresses_of(read_banner(proc, START_TIMEOUT).decode())[0])
        assert ask_line(address) == b"v1"
        write_handler(tmp_path, "version two")
        assert [ask_line(address) for _ in range(3)] == [b"v1"] * 3
        assert stop(proc)[0] == 0


@requires_fork
def test_workers_that_cannot_import_the_handler_end_the_cli_with_one_error_line_and_status_1(tmp_path):
    # Imports in the process that first imported it (the parent), raises in any other.
    (tmp_path / "parent_only.py").write_text(textwrap.dedent("""
        import os
        import sockserve

        first = os.environ.setdefault("PARENT_ONLY_PID", str(os.getpid()))
        if first != str(os.getpid()):
            raise RuntimeError("parent_only imports only in its first process")

        class Handler(sockserve.StreamRequestHandler):
            def handle(self):
                self.wfile.write(b"served\\n")
    """), encoding="utf-8")
    env = clean_env(PYTHONPATH=str(tmp_path))
    with serve_process("127.0.0.1:0", "parent_only:Handler", "-c", "prefork", "-w", "2",
                       cwd=tmp_path, env=env) as proc:
        banner = read_banner(proc, START_TIMEOUT).decode()
        address = inet(addresses_of(banner)[0])
        _, err = proc.communicate(timeout=FINISH_TIMEOUT)
        said = banner + err.decode(errors="replace")
        assert proc.returncode == 1, said
    assert "parent_only imports only in its first process" in said  # the worker says why
    errors = [line for line in said.splitlines() if line.startswith("sockserve: error: ")]
    assert len(errors) == 1, said
    assert said.rstrip().endswith(errors[0]) and "stopped" not in said
    assert not child_pids(proc.pid)
    assert_bindable(address)


# --------------------------------------------------------------------------- --log-file, SIGUSR1


def lines_of(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []


def served_and_logged(address: tuple[str, int], log: Path, count: int) -> bool:
    """Ask once; True once *log* holds more than *count* access lines."""
    ask_stream(address, b"log me\n")
    return access_lines(log) > count


@pytest.mark.parametrize("concurrency", ["threading", pytest.param("prefork", marks=requires_fork)])
def test_log_file_holds_the_log_and_sigusr1_reopens_it_after_rotation(concurrency, tmp_path):
    log = tmp_path / "sockserve.log"
    args = ["127.0.0.1:0", "--plugin", "access-log", "--log-file", str(log), "-c", concurrency]
    if concurrency == "prefork":
        args += ["-w", "1"]
    with serve_process(*args, cwd=tmp_path) as proc:
        address = inet(addresses_of(read_banner(proc, START_TIMEOUT).decode())[0])
        assert ask_stream(address, b"first\n") == b"FIRST\n"
        assert wait_until(lambda: any("FIRST" not in line and " ok" in line for line in lines_of(log)),
                          timeout=SHOWS_WITHIN)
        assert any("serving on 127.0.0.1:" in line for line in lines_of(log)), "the startup line"
        rotated = tmp_path / "sockserve.log.1"
        log.rename(rotated)
        # The process holding the file: the CLI, or (prefork) the worker, which inherited
        # the CLI's handler (the supervisor also sends it on to its workers).
        if concurrency == "prefork":
            [target] = child_pids(proc.pid)
        else:
            target = proc.pid
        os.kill(target, signal.SIGUSR1)
        assert wait_until(lambda: served_and_logged(address, log, 0), timeout=SHOWS_WITHIN, interval=0.2)
        before = access_lines(rotated)
        ask_stream(address, b"more\n")
        time.sleep(0.2)
        assert access_lines(rotated) == before, "no more requests logged to the rotated file"
        if concurrency == "prefork":
            os.kill(proc.pid, signal.SIGUSR1)  # the supervisor reopens its own, sends it on
            time.sleep(0.3)
        status, rest = stop(proc)
    assert status == 0, rest
    assert "Traceback" not in rest
    assert lines_of(log)[-1].endswith("INFO stopped"), lines_of(log)[-1]
    assert not any(line.endswith("INFO stopped") for line in lines_of(rotated))


def access_lines(path: Path) -> int:
    return sum(" ok" in line for line in lines_of(path))


def test_sigusr1_without_a_log_file_does_not_end_the_process(tmp_path):
    with serve_process("127.0.0.1:0", cwd=tmp_path) as proc:
        address = inet(addresses_of(read_banner(proc, START_TIMEOUT).decode())[0])
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.2)
        assert ask_stream(address, b"still here\n") == b"STILL HERE\n"
        assert stop(proc)[0] == 0


def test_a_handler_error_goes_to_the_log_file_not_stderr(tmp_path):
    (tmp_path / "failing.py").write_text(textwrap.dedent("""
        import sockserve

        class Handler(sockserve.BaseRequestHandler):
            def handle(self):
                raise ValueError("broken handler")
    """), encoding="utf-8")
    log = tmp_path / "sockserve.log"
    env = clean_env(PYTHONPATH=str(tmp_path))
    with serve_process("127.0.0.1:0", "failing:Handler", "--log-file", str(log), cwd=tmp_path, env=env) as proc:
        address = inet(addresses_of(read_banner(proc, START_TIMEOUT).decode())[0])
        with socket.create_connection(address, timeout=10) as client:
            client.sendall(b"x")
            assert client.recv(10) == b""
        assert wait_until(lambda: any("ValueError: broken handler" in line for line in lines_of(log)),
                          timeout=SHOWS_WITHIN)
        status, rest = stop(proc)
    assert status == 0
    assert "broken handler" not in rest and "Traceback" not in rest
