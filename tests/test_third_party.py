"""A third-party distribution end to end: examples/sockserve-processpool, installed with pip.

The example is installed into a virtual environment built for this test run (never into
the environment running the tests, where an auto-loaded plugin would change every other
test's behaviour), and driven through that environment's interpreter: `python -m
sockserve plugins`, `python -m sockserve serve`, and scripts composing its classes, all
over real sockets on 127.0.0.1 port 0, ::1 or Unix sockets in a temporary directory.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import sockserve
from support import (
    HAS_IPV6,
    ask_stream,
    child_pids,
    is_running,
    missing,
    read_banner,
    requires_af_unix,
    requires_fork,
    script_path,
    sockserve_process,
)

pytestmark = [requires_fork, requires_af_unix]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sockserve-processpool"
DISTRIBUTION = "sockserve-processpool 0.1.0"
#: Seconds for building the environment (pip builds a wheel of the example).
INSTALL_TIMEOUT = 240
#: Seconds a scripted scenario or a CLI process gets to start or to finish.
RUN_TIMEOUT = 60
SERVING = re.compile(r"sockserve: (\S+) serving on (\S+) with (\S+);")
COUNTED = re.compile(r"sockserve_processpool INFO process (\d+) handled (\d+) requests")
#: Scenarios the environment's interpreter runs (composing the example's classes), each
#: printing one JSON line.
SCENARIOS = script_path("processpool_scenarios.py")


# --------------------------------------------------------------------------- the environment


@attrs.frozen
class Venv:
    """A virtual environment with the example installed and the outer packages visible."""

    root: Path
    python: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "SOCKSERVE_DISABLE_PLUGIN_AUTOLOAD",
                         "SOCKSERVE_BLOCK_PLUGINS")
        }
        env.update(extra)
        return env

    def run(self, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.python), *args],
            cwd=cwd,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
        if check:
            assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def scenario(self, name: str, *args: str, cwd: Path) -> tuple[dict[str, Any], str]:
        """Run one scenario of SCENARIOS; return its JSON result and its stderr."""
        proc = self.run(SCENARIOS, name, *args, cwd=cwd)
        return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


def _setuptools_builds_wheels() -> bool:
    """Can the outer setuptools build a wheel by itself (no build isolation, no index)?"""
    if importlib.util.find_spec("setuptools") is None:
        return False
    if importlib.util.find_spec("wheel") is not None:
        return True
    # setuptools 70.1 took over bdist_wheel from the separate ``wheel`` package.
    version = importlib.metadata.version("setuptools")
    major, minor = (int(part) for part in re.findall(r"\d+", version)[:2])
    return (major, minor) >= (70, 1)


def _pip(python: Path, *args: str, cwd: Path) -> None:
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
         "--no-deps", *args],
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
    )
    assert proc.returncode == 0, f"pip install {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="session")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """Build the environment once per test run.

    ``python -m venv --without-pip``, then a ``.pth`` file that adds the outer
    environment's site directories (sockserve installed editable, pluggy, attrs, pip
    itself), then ``pip install --no-deps`` of a copy of the example (setuptools builds
    in the source tree, which must not be the repository's). Nothing comes from an index
    when the outer setuptools can build a wheel itself.
    """
    root = tmp_path_factory.mktemp("third-party")
    home = root / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(home)],
        check=True, capture_output=True, timeout=INSTALL_TIMEOUT,
    )
    python = home / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=RUN_TIMEOUT,
    ).stdout.strip()
    # site.addsitedir, not bare path lines: the outer directories' own .pth files must run
    # too, since that is how the editable sockserve install puts itself on sys.path.
    outer = [p for p in site.getsitepackages() if os.path.isdir(p)]
    (Path(purelib) / "_sockserve_outer_env.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in outer) + "\n",
        encoding="utf-8",
    )
    source = root / "sockserve-processpool"
    shutil.copytree(
        EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    if _setuptools_builds_wheels():
        _pip(python, "--no-build-isolation", "--no-index", str(source), cwd=root)
    elif importlib.util.find_spec("setuptools") is not None:
        # An old setuptools needs the separate ``wheel`` package for bdist_wheel: one small
        # package from the configured index, instead of an isolated build environment
        # (which downloads and installs setuptools as well, some twenty seconds).
        _pip(python, "wheel", cwd=root)
        _pip(python, "--no-build-isolation", "--no-index", str(source), cwd=root)
    else:
        _pip(python, str(source), cwd=root)
    made = Venv(root, python)
    # The example comes from the new environment, sockserve from the one running the tests.
    where = json.loads(made.run(
        "-c",
        "import json, sockserve, sockserve_processpool, importlib.metadata as m; "
        "print(json.dumps([sockserve.__file__, sockserve_processpool.__file__, "
        "m.version('sockserve-processpool')]))",
        cwd=root,
    ).stdout)
    assert where[0] == sockserve.__file__
    assert where[1].startswith(purelib)
    assert where[2] == "0.1.0"
    return made


# --------------------------------------------------------------------------- discovery


def test_plugins_lists_every_plugin_of_the_distribution_under_its_kind(venv, tmp_path):
    proc = venv.run("-m", "sockserve", "plugins", cwd=tmp_path)
    sections: dict[str, list[str]] = {}
    current = None
    for line in proc.stdout.splitlines():
        header = re.match(r"^\S.* \((sockserve\.\w+)\):$", line)
        if header:
            current = header.group(1)
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    expected = {
        "sockserve.concurrency": ("processpool", "sockserve_processpool.pool:ProcessPoolMixIn"),
        "sockserve.socket_types": ("seqpacket", "sockserve_processpool.seqpacket:SEQPACKET"),
        "sockserve.transports": ("unix-seqpacket", "sockserve_processpool.seqpacket:UNIX_SEQPACKET"),
        "sockserve.plugins": ("request-counter", "sockserve_processpool.counter:COUNTER"),
    }
    for group, (name, value) in expected.items():
        pattern = re.compile(
            rf"^\s+{re.escape(name)}\s+{re.escape(DISTRIBUTION)}\s+{re.escape(value)}$"
        )
        assert any(pattern.match(line) for line in sections[group]), (group, proc.stdout)
    # The built-ins are still there, from sockserve's own distribution.
    assert any(re.match(r"^\s+threading\s+sockserve 0\.1\.0\s", line) for line in sections["sockserve.concurrency"])
    assert "FAILED" not in proc.stdout
    assert "warning" not in proc.stdout


# --------------------------------------------------------------------------- the process pool


@pytest.fixture(scope="module")
def pool_run(venv: Venv, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Run the pool scenario for a transport once per module; return (result, stderr)."""
    runs: dict[str, tuple[dict[str, Any], str]] = {}

    def run(transport: str) -> tuple[dict[str, Any], str]:
        if transport not in runs:
            where = tmp_path_factory.mktemp(f"pool-{transport}")
            runs[transport] = venv.scenario("pool", transport, str(where), cwd=where)
        return runs[transport]

    return run


POOL_CLASS = {"tcp": "ProcessPoolTCPServer", "tcp6": "ProcessPoolTCP6Server",
              "unix": "ProcessPoolUnixStreamServer"}


@pytest.mark.parametrize("transport", ["tcp", "tcp6", "unix"])
def test_processpool_spreads_clients_over_workers_replaces_a_killed_one_and_reaps_all(
    pool_run, transport
):
    if transport == "tcp6" and not HAS_IPV6:
        missing("requires_ipv6: no IPv6 loopback")
    result, stderr = pool_run(transport)
    parent, pool = result["parent"], result["pool"]
    assert result["class"] == POOL_CLASS[transport]
    assert (result["workers"], result["backlog"]) == (3, 32)
    assert len(set(pool)) == 3 and parent not in pool
    assert result["pool_are_children"]
    # Three held clients went to three different workers; nobody was served by the parent.
    assert sorted(result["first_three"]) == sorted(pool)
    assert {pid for pid, _ in result["served"]} == set(pool)
    assert [reply for _, reply in result["served"]] == [f"HELLO {i}\n" for i in range(9)]
    # SIGKILL one worker: it is replaced, the others stay, and clients keep being served.
    victim, new_pool = result["victim"], result["new_pool"]
    assert victim == pool[0]
    assert len(set(new_pool)) == 3 and victim not in new_pool and parent not in new_pool
    assert set(pool[1:]) < set(new_pool)
    assert sorted(result["after_kill_first_three"]) == sorted(new_pool)
    assert [reply for _, reply in result["after_kill"]] == [f"AFTER {i}\n" for i in range(3)]
    assert [reply for _, reply in result["sequential"]] == [f"SEQ {i}\n" for i in range(4)]
    assert {pid for pid, _ in result["sequential"]} <= set(new_pool)
    assert f"worker 0 (pid {victim}) is replaced: it exited with status -9" in stderr
    # server_close() stopped and reaped every worker.
    assert result["children_after_close"] == []
    assert not result["serving_thread_alive"]
    assert not [pid for pid in {*pool, *new_pool} if is_running(pid)]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_processpool_counts_requests_cut_off_at_the_drain_deadline_not_workers(
    venv, transport, tmp_path
):
    result, stderr = venv.scenario("cutoff", transport, str(tmp_path), cwd=tmp_path)
    for name in ("stuck", "idle"):
        assert result[f"{name}_served"] == "DONE\n"
        assert result[f"{name}_children_after_close"] == []
    # Two workers, one request blocked in its handler: one request cut off, after ~0.5 s.
    assert result["stuck_cut_off"] == 1
    assert 0.4 < result["stuck_close_seconds"] < 0.5 + 1.0 + 2.0  # deadline + SIGTERM grace
    assert result["stuck_held_got"] == ""
    # No request in flight: closing without block_on_close cuts nothing off.
    assert result["idle_cut_off"] == 0
    assert "Traceback" not in stderr


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_request_counter_logs_each_workers_count_when_the_pool_closes(pool_run, transport):
    """The auto-loaded request-counter plugin: one line per process, counts as served."""
    result, stderr = pool_run(transport)
    assert result["counter_registered"]
    logged: dict[int, int] = {}
    for pid, count in COUNTED.findall(stderr):
        assert int(pid) not in logged, f"process {pid} reported twice:\n{stderr}"
        logged[int(pid)] = int(count)
    served_by: dict[int, int] = {}
    for pid, _ in result["served"] + result["after_kill"] + result["sequential"]:
        served_by[pid] = served_by.get(pid, 0) + 1
    # Each worker alive at close reports exactly what it served, and the parent (which
    # stops serving too) nothing; the SIGKILLed worker could not report.
    expected = {pid: served_by.get(pid, 0) for pid in result["new_pool"]}
    assert logged == {result["parent"]: 0, **expected}
    assert sum(expected.values()) == 16 - served_by[result["victim"]]


@pytest.mark.parametrize("concurrency", ["sync", "threading", "forking"])
def test_unix_seqpacket_keeps_message_boundaries(venv, concurrency, tmp_path):
    result, stderr = venv.scenario("seqpacket", concurrency, str(tmp_path), cwd=tmp_path)
    prefix = {"sync": "", "threading": "Threading", "forking": "Forking"}[concurrency]
    assert result["class"] == f"{prefix}UnixSeqpacketServer"
    assert "UnixSeqpacketServer" in result["mro"] and "TCPServer" in result["mro"]
    assert result["socket_type"] == socket.SOCK_SEQPACKET
    assert result["distribution"] == DISTRIBUTION
    # Two sends before any reply: a stream would let the handler read "onetwo" at once.
    assert result["conversations"] == [["1:ONE", "2:TWO", 3002, "3:", ""]] * 2
    assert result["children_after_close"] == []
    assert not result["socket_file_left"]
    assert "Traceback" not in stderr


# --------------------------------------------------------------------------- the command line


@contextlib.contextmanager
def cli_server(venv: Venv, *args: str, cwd: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start ``sockserve serve ARGS`` in the venv; yield it and its banner; kill it (by pid) on exit."""
    python = str(venv.python)
    with sockserve_process("serve", *args, python=python, cwd=cwd, env=venv.env(), timeout=RUN_TIMEOUT) as proc:
        yield proc, read_banner(proc, RUN_TIMEOUT).decode(errors="replace")


def test_serve_with_processpool_echoes_and_sigterm_stops_every_worker(venv, tmp_path):
    args = ("127.0.0.1:0", "--concurrency", "processpool", "--option", "workers=2")
    with cli_server(venv, *args, cwd=tmp_path) as (proc, banner):
        match = SERVING.search(banner)
        assert match, banner
        class_name, shown, handler = match.groups()
        assert (class_name, handler) == ("ProcessPoolTCPServer", "sockserve.core._demo.UpperCaseHandler")
        host, _, port = shown.rpartition(":")
        assert host == "127.0.0.1"
        deadline = time.monotonic() + RUN_TIMEOUT
        while len(workers := sorted(child_pids(proc.pid))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(workers) == 2, workers
        for i in range(6):
            assert ask_stream((host, int(port)), b"pool %d\n" % i) == b"POOL %d\n" % i
        assert sorted(child_pids(proc.pid)) == workers  # the same two served everything
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=RUN_TIMEOUT)
        assert proc.returncode == 0, err.decode(errors="replace")
    stderr = err.decode(errors="replace")
    assert stderr.rstrip().endswith("sockserve: stopped")
    assert "Traceback" not in stderr
    assert not any(is_running(pid) for pid in workers)
    counts = {int(pid): int(n) for pid, n in re.findall(r"process (\d+) handled (\d+) requests", stderr)}
    assert set(counts) == {proc.pid, *workers}
    assert counts[proc.pid] == 0
    assert sum(counts[pid] for pid in workers) == 6


@pytest.mark.parametrize(
    "value,message",
    [
        ("0", "bad value 0 for option 'workers': 'workers' must be an int >= 1 (got 0)"),
        ("x", "bad value 'x' for option 'workers': expected int"),
    ],
)
def test_serve_bad_worker_count_exits_2_naming_the_option(venv, value, message, tmp_path):
    proc = venv.run(
        "-m", "sockserve", "serve", "127.0.0.1:0", "--concurrency", "processpool",
        "--option", f"workers={value}", cwd=tmp_path, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"sockserve: error: {message}"]
    assert "serving on" not in proc.stderr
