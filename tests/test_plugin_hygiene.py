"""Plugin hygiene: turning plugins off, and third-party plugins that are broken.

Distributions are written to disk (a ``*.dist-info`` directory with METADATA and
entry_points.txt, next to their modules) and put on the PYTHONPATH of a subprocess, so the
real entry-point discovery and loader are what is tested. Each plugin module records its
import and its hook calls in a log file, so the test sees what was imported and what ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sockserve
from support import ask_stream, clean_env, make_distribution, read_banner, script_path, sockserve_process

#: Seconds a subprocess gets to start serving or to finish.
RUN_TIMEOUT = 60
VERSION = sockserve.__version__
SERVING = re.compile(r"serving on (\S+):(\d+) with")


# --------------------------------------------------------------------------- distributions on disk


RECORDING_PLUGIN = """
import os

import sockserve


def record(text):
    with open(os.environ["HYGIENE_LOG"], "a", encoding="utf-8") as log:
        log.write(text + "\\n")


record("import {name}")


@sockserve.hookimpl
def sockserve_request_finish(server, client_address, exc):
    record("{name} finished " + type(server).__name__)
"""

GOOD_EXTRAS = """

class TaggedMixIn:
    '''The tcp-alt transport's behaviour: every reply starts with "alt:".'''

    def finish_request(self, request, client_address):
        request.sendall(b"alt:")
        super().finish_request(request, client_address)


TCP_ALT = sockserve.Transport("tcp-alt", "inet", "stream", "TcpAlt", mixin=TaggedMixIn)
NOT_A_CLASS = 42
"""

CRASHING_MODULE = """
import os

with open(os.environ["HYGIENE_LOG"], "a", encoding="utf-8") as log:
    log.write("import crashy\\n")
raise RuntimeError("boom at import")
"""

CLASHING_MODULE = """
import os

with open(os.environ["HYGIENE_LOG"], "a", encoding="utf-8") as log:
    log.write("import evil\\n")

TCP = object()
ThreadingMixIn = object
"""


def install_good(site: Path) -> None:
    """Two auto-loaded lifecycle plugins and a working transport."""
    make_distribution(
        site, "sockserve-good-plugins", "1.0",
        {
            "sockserve.plugins": {"good": "hygiene_good", "other": "hygiene_other"},
            "sockserve.transports": {"tcp-alt": "hygiene_good:TCP_ALT"},
        },
        {
            "hygiene_good.py": RECORDING_PLUGIN.replace("{name}", "good") + GOOD_EXTRAS,
            "hygiene_other.py": RECORDING_PLUGIN.replace("{name}", "other"),
        },
    )


def install_broken(site: Path) -> None:
    """A module raising on import, missing objects, a wrong kind, and clashing names."""
    make_distribution(
        site, "sockserve-broken-import", "0.3",
        {
            "sockserve.plugins": {"crashy": "hygiene_crashy"},
            "sockserve.transports": {"crashy-tls": "hygiene_crashy:TLS"},
        },
        {"hygiene_crashy.py": CRASHING_MODULE},
    )
    make_distribution(
        site, "sockserve-broken-missing", "0.4",
        {"sockserve.concurrency": {"gevent": "hygiene_good:NoSuchMixIn",
                                   "notaclass": "hygiene_good:NOT_A_CLASS"}},
    )
    make_distribution(
        site, "sockserve-evil", "2.0",
        {
            "sockserve.transports": {"tcp": "hygiene_evil:TCP"},
            "sockserve.concurrency": {"threading": "hygiene_evil:ThreadingMixIn"},
        },
        {"hygiene_evil.py": CLASHING_MODULE},
    )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    install_good(root)
    return root


def environment(tmp_path: Path, site: Path, **extra: str) -> dict[str, str]:
    return clean_env(PYTHONPATH=str(site), HYGIENE_LOG=str(tmp_path / "hygiene.log"), **extra)


def log_lines(tmp_path: Path) -> list[str]:
    path = tmp_path / "hygiene.log"
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


#: The scenarios run_script runs, each in a fresh interpreter (see its docstring).
SCENARIOS = script_path("hygiene_scenarios.py")


def run_script(scenario: str, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run one scenario of SCENARIOS in a subprocess; return the JSON it printed last, and its stderr."""
    proc = subprocess.run(
        [sys.executable, SCENARIOS, scenario],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(proc.stdout.splitlines()[-1])
    result["stderr"] = proc.stderr
    return result


# --------------------------------------------------------------------------- the command line


@contextlib.contextmanager
def cli_server(*args: str, env: dict[str, str], cwd: Path) -> Iterator[tuple[subprocess.Popen[bytes], tuple[str, int]]]:
    """Start ``python -m sockserve serve ARGS``; yield it and its address; kill it (by pid) on exit."""
    with sockserve_process("serve", *args, cwd=cwd, env=env, timeout=RUN_TIMEOUT) as proc:
        seen = read_banner(
            proc, RUN_TIMEOUT, until=lambda so_far: SERVING.search(so_far.decode(errors="replace"))
        )
        match = SERVING.search(seen.decode(errors="replace"))
        proc.banner = seen  # type: ignore[attr-defined]
        yield proc, (match.group(1), int(match.group(2)))


def stop(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM; assert a clean exit; return all of stderr."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=RUN_TIMEOUT)
    stderr = (proc.banner + err).decode(errors="replace")  # type: ignore[attr-defined]
    assert proc.returncode == 0, stderr
    return stderr


# --------------------------------------------------------------------------- turning plugins off


def test_disable_autoload_stops_autoloading_but_a_plugin_asked_for_by_name_still_loads(site, tmp_path):
    env = environment(tmp_path, site, SOCKSERVE_DISABLE_PLUGIN_AUTOLOAD="1")
    result = run_script("autoload-off", env, tmp_path)
    assert (result["plain"], result["named"]) == ("PLAIN", "NAMED")
    assert result["imported_before"] is False
    assert result["registered"] == []
    # Only the plugin asked for was imported, and it ran for its class only.
    assert log_lines(tmp_path) == ["import good", "good finished ThreadingTCPServerWithHygieneGood"]


def test_disable_autoload_still_lets_serve_enable_a_plugin_by_name(site, tmp_path):
    env = environment(tmp_path, site, SOCKSERVE_DISABLE_PLUGIN_AUTOLOAD="1")
    with cli_server("127.0.0.1:0", "--plugin", "good", env=env, cwd=tmp_path) as (proc, address):
        assert ask_stream(address, b"by name\n") == b"BY NAME\n"
        stop(proc)
    assert log_lines(tmp_path) == ["import good", "good finished ThreadingTCPServerWithHygieneGood"]


@pytest.mark.parametrize("blocked", ["good", " good ,", "good,nonexistent"])
def test_block_plugins_keeps_one_autoloaded_plugin_out_without_importing_it(site, tmp_path, blocked):
    env = environment(tmp_path, site, SOCKSERVE_BLOCK_PLUGINS=blocked)
    result = run_script("block-one", env, tmp_path)
    assert result["reply"] == "ECHO"
    assert (result["good_imported"], result["other_imported"]) == (False, True)
    assert result["registered"] == ["other"] and result["blocked"] is True
    assert log_lines(tmp_path) == ["import other", "other finished ThreadingTCPServer"]


def test_block_plugins_can_block_every_autoloaded_plugin(site, tmp_path):
    env = environment(tmp_path, site, SOCKSERVE_BLOCK_PLUGINS="other,good")
    result = run_script("block-all", env, tmp_path)
    assert (result["reply"], result["plugins"]) == ("ECHO", 0)
    assert log_lines(tmp_path) == []


def test_serve_plugin_no_name_keeps_an_autoloaded_plugin_out_for_one_run(site, tmp_path):
    env = environment(tmp_path, site)
    with cli_server("127.0.0.1:0", "--plugin", "no:good", env=env, cwd=tmp_path) as (proc, address):
        assert ask_stream(address, b"one run\n") == b"ONE RUN\n"
        stop(proc)
    lines = log_lines(tmp_path)
    assert "other finished ThreadingTCPServer" in lines
    assert not [line for line in lines if line.startswith("good ")]
    # "the same" as SOCKSERVE_BLOCK_PLUGINS (docs/plugins.md): not even imported.
    assert lines == ["import other", "other finished ThreadingTCPServer"]
    # The next run without it has the plugin back.
    (tmp_path / "hygiene.log").unlink()
    with cli_server("127.0.0.1:0", env=env, cwd=tmp_path) as (proc, address):
        assert ask_stream(address, b"next run\n") == b"NEXT RUN\n"
        stop(proc)
    assert sorted(log_lines(tmp_path)) == [
        "good finished ThreadingTCPServer", "import good", "import other",
        "other finished ThreadingTCPServer",
    ]


# --------------------------------------------------------------------------- broken plugins

@pytest.fixture
def broken_site(site: Path) -> Path:
    install_broken(site)
    return site


def test_broken_plugins_give_one_clear_message_each_and_everything_else_works(broken_site, tmp_path):
    result = run_script("broken", environment(tmp_path, broken_site), tmp_path)
    # The working plugins were auto-loaded; the one raising on import was not.
    assert result["registered"] == ["good", "other"]
    errors = result["errors"]
    assert set(errors) == {"crashy-tls", "gevent", "notaclass", "crashy"}
    expected = {
        "crashy-tls": ("transport", "sockserve.transports  crashy-tls = hygiene_crashy:TLS",
                       "sockserve-broken-import 0.3", "RuntimeError: boom at import"),
        "gevent": ("concurrency", "sockserve.concurrency  gevent = hygiene_good:NoSuchMixIn",
                   "sockserve-broken-missing 0.4",
                   "AttributeError: module 'hygiene_good' has no attribute 'NoSuchMixIn'"),
        "notaclass": ("concurrency", "sockserve.concurrency  notaclass = hygiene_good:NOT_A_CLASS",
                      "sockserve-broken-missing 0.4", "TypeError: 42 is not a mixin class"),
        "crashy": ("lifecycle", "sockserve.plugins  crashy = hygiene_crashy",
                   "sockserve-broken-import 0.3", "RuntimeError: boom at import"),
    }
    for name, (kind, entry_point, distribution, cause) in expected.items():
        error = errors[name]
        assert error["type"] == "PluginLoadError" and error["import_error"] and error["chained"]
        assert (error["kind"], error["plugin_name"], error["entry_point"], error["distribution"],
                error["cause"]) == (kind, name, entry_point, distribution, cause)
        lines = error["message"].splitlines()
        assert lines[:5] == [
            f"cannot load {kind} plugin '{name}'",
            f"  entry point: {entry_point}",
            f"  distribution: {distribution}",
            f"  cause: {cause}",
            f"  fix: install what it needs, or uninstall {distribution.split()[0]} so it is "
            "not discovered",
        ]
        # Asked for again: the same error, not a second attempt with a second message.
        assert error["same_again"]
    assert result["compose_errors"] == ["crashy-tls", "gevent"]
    assert result["failures"] == [
        "concurrency gevent", "concurrency notaclass", "plugin crashy", "transport crashy-tls",
    ]
    # Clashing names: sockserve's own built-ins win, the impostor is never imported.
    assert (result["tcp_from"], result["threading_from"]) == (f"sockserve {VERSION}",) * 2
    assert result["evil_imported"] is False
    # Every other plugin and server keeps working, in the same process.
    assert result["replies"] == {
        "threading": "ECHO", "forking": "ECHO", "sync": "ECHO", "tcp-alt": "alt:ECHO",
    }
    assert result["tcp_alt_class"] == "ThreadingTcpAltServer"
    # One message per problem: a warning for the auto-loaded plugin, one per clash.
    clash = (
        "{kind} plugin name '{name}' is registered more than once; using sockserve {version} "
        "({builtin}), ignoring sockserve-evil 2.0 ({impostor}). Rename one of the entry points "
        "in group {group}."
    )
    clashes = [
        clash.format(kind="transport", name="tcp", version=VERSION, builtin="sockserve.transports._pairs:TCP",
                     impostor="hygiene_evil:TCP", group="sockserve.transports"),
        clash.format(kind="concurrency", name="threading", version=VERSION,
                     builtin="sockserve.concurrency._threading:ThreadingMixIn",
                     impostor="hygiene_evil:ThreadingMixIn", group="sockserve.concurrency"),
    ]
    assert result["clashes"] == clashes
    warnings = result["warnings"]
    assert sorted(w for w in warnings if w[0] == "PluginClashWarning") == sorted(
        ["PluginClashWarning", c] for c in clashes
    )
    [load_warning] = [w for w in warnings if w[0] == "PluginLoadWarning"]
    assert load_warning[1] == errors["crashy"]["message"]
    assert len(warnings) == 3
    assert log_lines(tmp_path).count("import crashy") >= 1
    assert "good finished ThreadingTCPServer" in log_lines(tmp_path)


def test_plugins_listing_marks_the_broken_ones_failed_and_lists_the_rest(broken_site, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sockserve", "plugins"],
        cwd=tmp_path, env=environment(tmp_path, broken_site), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "PluginClashWarning" not in proc.stderr  # reported once, in the listing
    lines = proc.stdout.splitlines()

    def row(name: str, distribution: str, value: str) -> re.Pattern[str]:
        return re.compile(rf"^  {re.escape(name)}\s+{re.escape(distribution)}\s+{re.escape(value)}$")

    failed = {
        "crashy-tls": ("sockserve-broken-import 0.3", "hygiene_crashy:TLS  [FAILED: RuntimeError: boom at import]"),
        "crashy": ("sockserve-broken-import 0.3", "hygiene_crashy  [FAILED: RuntimeError: boom at import]"),
        "gevent": ("sockserve-broken-missing 0.4",
                   "hygiene_good:NoSuchMixIn  [FAILED: AttributeError: module 'hygiene_good' has no "
                   "attribute 'NoSuchMixIn']"),
        "notaclass": ("sockserve-broken-missing 0.4",
                      "hygiene_good:NOT_A_CLASS  [FAILED: TypeError: 42 is not a mixin class]"),
    }
    working = {
        "good": ("sockserve-good-plugins 1.0", "hygiene_good"),
        "other": ("sockserve-good-plugins 1.0", "hygiene_other"),
        "tcp-alt": ("sockserve-good-plugins 1.0", "hygiene_good:TCP_ALT"),
        "tcp": (f"sockserve {VERSION}", "sockserve.transports._pairs:TCP"),
        "threading": (f"sockserve {VERSION}", "sockserve.concurrency._threading:ThreadingMixIn"),
        "stats": (f"sockserve {VERSION}", "sockserve.plugins._stats:STATS"),
        "unix-dgram": (f"sockserve {VERSION}", "sockserve.transports._pairs:UNIX_DGRAM"),
    }
    for name, (distribution, value) in {**failed, **working}.items():
        pattern = row(name, distribution, value)
        assert sum(bool(pattern.match(line)) for line in lines) == 1, f"{name}:\n{proc.stdout}"
    assert sum("FAILED" in line for line in lines) == len(failed)
    # The clashes are shown once each, and the impostor's entries are not listed as plugins.
    assert sum(line.startswith("warning: transport plugin name 'tcp' is registered more than once")
               for line in lines) == 1
    assert sum(line.startswith("warning: concurrency plugin name 'threading' is registered more than once")
               for line in lines) == 1
    assert not [line for line in lines if line.startswith("  ") and "sockserve-evil" in line]
    for builtin in sockserve.registry.names("transport"):
        if sockserve.registry.info("transport", builtin).distribution == "sockserve":
            assert any(re.match(rf"^  {re.escape(builtin)}\s+sockserve ", line) for line in lines)
    assert "import evil" not in log_lines(tmp_path)


def test_serve_with_a_broken_plugin_installed_warns_once_and_serves(broken_site, tmp_path):
    env = environment(tmp_path, broken_site)
    with cli_server("127.0.0.1:0", env=env, cwd=tmp_path) as (proc, address):
        assert ask_stream(address, b"still here\n") == b"STILL HERE\n"
        stderr = stop(proc)
    assert stderr.count("cannot load lifecycle plugin 'crashy'") == 1
    assert "  distribution: sockserve-broken-import 0.3" in stderr
    assert "Traceback" not in stderr
    assert "good finished ThreadingTCPServer" in log_lines(tmp_path)


def test_serve_plugin_no_name_silences_a_broken_autoloaded_plugin(broken_site, tmp_path):
    env = environment(tmp_path, broken_site)
    with cli_server("127.0.0.1:0", "--plugin", "no:crashy", env=env, cwd=tmp_path) as (proc, address):
        assert ask_stream(address, b"quiet\n") == b"QUIET\n"
        stderr = stop(proc)
    assert "crashy" not in stderr
    assert "import crashy" not in log_lines(tmp_path)
    assert "good finished ThreadingTCPServer" in log_lines(tmp_path)


def test_a_name_two_third_parties_register_goes_to_sys_path_order_then_distribution_name(tmp_path):
    """Which one wins does not depend on the order the file system lists a directory in."""
    early, late = tmp_path / "early", tmp_path / "late"
    for name, where in [("zzz-late", late), ("mmm-late", late), ("aaa-late", late),
                        ("zzz-early", early), ("mmm-early", early)]:
        where.mkdir(exist_ok=True)
        make_distribution(where, name, "1.0", {"sockserve.transports": {
            "dup": f"{name.replace('-', '_')}:T",
            f"dup-{where.name}": f"{name.replace('-', '_')}:T",
        }})
    proc = subprocess.run(
        [sys.executable, SCENARIOS, "clash-order"], cwd=tmp_path, stdin=subprocess.DEVNULL,
        env=clean_env(PYTHONPATH=os.pathsep.join([str(early), str(late)])),
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    # dup: the earlier directory wins, then the name; dup-late: all in one directory.
    # Three clashes: dup, dup-early, dup-late.
    assert json.loads(proc.stdout) == ["mmm-early", "aaa-late", 3]
