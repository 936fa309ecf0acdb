"""The registry: discovery, loading, composing, and the errors it gives (core/_registry.py)."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import tomllib
import warnings
from pathlib import Path

import pytest

import sockserve
from sockserve.core._registry import BUILTIN_ENTRY_POINTS
from support import (
    BUILTIN_CONCURRENCY,
    EchoUpper,
    address_for,
    exchange,
    make_distribution,
    no_leaks,
    requires_af_unix,
    script_path,
    serving,
)

PACKAGE_DIR = Path(sockserve.__file__).resolve().parent
SUBPROCESS_TIMEOUT = 60

BUILTIN_NAMES = {
    "family": ["inet", "inet6", "unix"],
    "socket_type": ["dgram", "stream"],
    "transport": ["tcp", "tcp6", "udp", "udp6", "unix", "unix-dgram"],
    "concurrency": list(BUILTIN_CONCURRENCY),
}

#: The documented concrete classes and the composition each one is.
STANDARD_COMPOSITIONS = {
    "TCPServer": ("tcp", "sync"),
    "UDPServer": ("udp", "sync"),
    "UnixStreamServer": ("unix", "sync"),
    "UnixDatagramServer": ("unix-dgram", "sync"),
    "ForkingTCPServer": ("tcp", "forking"),
    "ForkingUDPServer": ("udp", "forking"),
    "ForkingUnixStreamServer": ("unix", "forking"),
    "ForkingUnixDatagramServer": ("unix-dgram", "forking"),
    "ThreadingTCPServer": ("tcp", "threading"),
    "ThreadingUDPServer": ("udp", "threading"),
    "ThreadingUnixStreamServer": ("unix", "threading"),
    "ThreadingUnixDatagramServer": ("unix-dgram", "threading"),
}


def runtime_import_names(distribution: str) -> set[str]:
    """The top-level import names of *distribution* and everything it needs at run time."""
    top_levels: dict[str, set[str]] = {}
    for import_name, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            top_levels.setdefault(canonical(dist), set()).add(import_name)
    names: set[str] = set()
    todo, seen = [distribution], set()
    while todo:
        dist = canonical(todo.pop())
        if dist in seen:
            continue
        seen.add(dist)
        names |= {n for n in top_levels.get(dist, ()) if not n.startswith("_")}
        for requirement in importlib.metadata.requires(dist) or ():
            if "extra ==" in requirement.partition(";")[2]:
                continue
            required = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
            try:
                importlib.metadata.distribution(required)
            except importlib.metadata.PackageNotFoundError:
                continue  # excluded by its environment marker on this interpreter
            todo.append(required)
    return names


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run_python(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run the venv's interpreter; return stdout, failing the test with stderr on error."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


# --------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("kind", sorted(BUILTIN_NAMES))
def test_names_of_each_kind_list_the_builtins(kind):
    assert sockserve.registry.names(kind) == BUILTIN_NAMES[kind]


@pytest.mark.parametrize(
    "kind,name", [(kind, name) for kind, names in BUILTIN_NAMES.items() for name in names]
)
def test_info_names_the_sockserve_distribution_and_its_version(kind, name):
    info = sockserve.registry.info(kind, name)
    assert info.kind == kind
    assert info.name == name
    assert info.distribution == "sockserve"
    assert info.version == importlib.metadata.version("sockserve")
    assert info.value.startswith("sockserve.") and ":" in info.value
    assert info.describe_distribution() == f"sockserve {info.version}"


def test_builtin_entry_point_copy_equals_the_tables_in_pyproject():
    """The vendored fallback in core/_registry.py declares exactly what pyproject.toml does."""
    with open(PACKAGE_DIR / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["project"]["entry-points"]
    ours = {group: table for group, table in declared.items() if group.startswith("sockserve.")}
    copied = {group: table for group, table in BUILTIN_ENTRY_POINTS.items() if table}
    assert copied == ours
    assert set(BUILTIN_ENTRY_POINTS) == set(sockserve.core._registry.KINDS.values())


# --------------------------------------------------------------------------- loading


def test_load_returns_the_same_object_every_time():
    for kind, names in BUILTIN_NAMES.items():
        for name in names:
            assert sockserve.registry.load(kind, name) is sockserve.registry.load(kind, name)


def test_load_imports_an_entry_point_only_once(tmp_path, monkeypatch):
    """A plugin attribute that is new on every access is still loaded once and cached."""
    (tmp_path / "sockserve_fresh_plugin.py").write_text(
        textwrap.dedent(
            """
            calls = 0

            def __getattr__(name):
                global calls
                if name != "FreshMixIn":
                    raise AttributeError(name)
                calls += 1
                return type("FreshMixIn", (), {})
            """
        ),
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = sockserve.Registry(
        builtins={"sockserve.concurrency": {"fresh": "sockserve_fresh_plugin:FreshMixIn"}}
    )
    try:
        first = registry.load("concurrency", "fresh")
        second = registry.load("concurrency", "fresh")
        module = sys.modules["sockserve_fresh_plugin"]
    finally:
        sys.modules.pop("sockserve_fresh_plugin", None)
    assert first is second
    assert module.calls == 1


def test_standard_mixins_are_the_concurrency_plugins():
    assert sockserve.ThreadingMixIn is sockserve.registry.load("concurrency", "threading")
    assert sockserve.ForkingMixIn is sockserve.registry.load("concurrency", "forking")


# --------------------------------------------------------------------------- composing


def test_compose_gives_the_same_class_for_the_same_arguments():
    class TagMixIn:
        pass

    plugin = object()
    assert sockserve.compose("tcp", "threading") is sockserve.compose("tcp", "threading")
    assert sockserve.compose("udp", "forking", mixins=(TagMixIn,)) is sockserve.compose(
        "udp", "forking", mixins=[TagMixIn]
    )
    assert sockserve.compose("tcp", plugins=[plugin]) is sockserve.compose("tcp", plugins=(plugin,))


def test_compose_default_transport_is_tcp():
    """``compose(transport="tcp", ...)`` is the signature: leaving it out means tcp."""
    assert sockserve.compose() is sockserve.TCPServer
    assert sockserve.compose(concurrency="threading") is sockserve.compose("tcp", "threading")


def test_threading_udp_server_is_compose_udp_threading():
    assert sockserve.ThreadingUDPServer is sockserve.compose("udp", "threading")


@pytest.mark.parametrize("name", sorted(STANDARD_COMPOSITIONS))
def test_every_standard_class_is_its_composition(name):
    cls = getattr(sockserve, name)
    assert cls is sockserve.compose(*STANDARD_COMPOSITIONS[name])
    assert cls.__name__ == name
    assert cls.__qualname__ == name
    assert cls.__module__ == "sockserve"
    assert repr(cls) == f"<class 'sockserve.{name}'>"


def test_documented_inheritance_holds():
    s = sockserve
    assert issubclass(s.UDPServer, s.TCPServer)
    assert issubclass(s.UnixStreamServer, s.TCPServer)
    assert issubclass(s.UnixDatagramServer, s.UDPServer)
    for name in STANDARD_COMPOSITIONS:
        assert issubclass(getattr(s, name), s.BaseServer)
    for name, (transport, concurrency) in STANDARD_COMPOSITIONS.items():
        if concurrency == "sync":
            continue
        mixin = s.ThreadingMixIn if concurrency == "threading" else s.ForkingMixIn
        base = s.compose(transport, "sync")
        mro = getattr(s, name).__mro__
        assert mro[1] is mixin, f"{name}: the mixin must come first in the MRO"
        assert mro[2] is base


def test_compose_by_family_and_socket_type_gives_the_standard_class():
    cls = sockserve.compose(family="inet", socket_type="dgram", concurrency="threading")
    assert cls is sockserve.ThreadingUDPServer


@requires_af_unix
def test_compose_by_family_and_socket_type_serves(tmp_path):
    cls = sockserve.compose(family="unix", socket_type="stream", concurrency="threading")
    assert issubclass(cls, sockserve.UnixStreamServer)
    with no_leaks():
        with serving(cls(address_for("unix", tmp_path), EchoUpper)) as server:
            assert exchange(server, b"by family") == b"BY FAMILY"


def test_transport_together_with_family_is_refused():
    with pytest.raises(TypeError, match="give either transport or family/socket_type, not both"):
        sockserve.compose("tcp", family="inet")


def test_mixins_go_after_the_concurrency_mixin_and_before_the_transport_class(tmp_path):
    finished = []

    class CountingMixIn:
        def finish_request(self, request, client_address):
            finished.append(client_address)
            super().finish_request(request, client_address)

    class TaggedMixIn:
        tag = "tagged"

    cls = sockserve.compose("tcp", "threading", mixins=(CountingMixIn, TaggedMixIn))
    assert cls.__mro__[:5] == (
        cls,
        sockserve.ThreadingMixIn,
        CountingMixIn,
        TaggedMixIn,
        sockserve.TCPServer,
    )
    assert cls.__module__ == "sockserve"
    assert cls.__qualname__ == cls.__name__
    assert cls.__name__.startswith("Threading") and cls.__name__.endswith("TCPServer")
    with no_leaks():
        with serving(cls(address_for("tcp", tmp_path), EchoUpper)) as server:
            assert exchange(server, b"mixed") == b"MIXED"
            assert exchange(server, b"in") == b"IN"
            assert server.tag == "tagged"
    assert len(finished) == 2


class _RequestLog:
    """A lifecycle plugin remembering the client addresses it saw start."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    @sockserve.hookimpl
    def sockserve_request_start(self, client_address):
        self.seen.append(client_address)


def test_plugins_apply_only_to_the_class_composed_with_them(tmp_path):
    log = _RequestLog()
    with_plugin = sockserve.compose("tcp", "threading", plugins=[log])
    assert with_plugin is not sockserve.ThreadingTCPServer
    assert issubclass(with_plugin, sockserve.TCPServer)
    with no_leaks():
        with serving(with_plugin(address_for("tcp", tmp_path), EchoUpper)) as server:
            assert exchange(server, b"one") == b"ONE"
        assert len(log.seen) == 1
        for plain in (sockserve.ThreadingTCPServer, sockserve.TCPServer):
            with serving(plain(address_for("tcp", tmp_path), EchoUpper)) as server:
                assert exchange(server, b"two") == b"TWO"
    assert len(log.seen) == 1


def test_concurrency_given_as_a_class(tmp_path):
    class DaemonThreadingMixIn(sockserve.ThreadingMixIn):
        daemon_threads = True

    seen = []

    class Report(EchoUpper):
        def handle(self):
            thread = threading.current_thread()
            seen.append((thread is threading.main_thread(), thread.daemon))
            super().handle()

    cls = sockserve.compose("tcp", DaemonThreadingMixIn)
    assert cls is sockserve.compose("tcp", DaemonThreadingMixIn)
    assert cls.__mro__[1] is DaemonThreadingMixIn
    assert cls.__name__ == "DaemonThreadingTCPServer"
    with no_leaks():
        with serving(cls(address_for("tcp", tmp_path), Report)) as server:
            assert exchange(server, b"daemon") == b"DAEMON"
    assert seen == [(False, True)]


# --------------------------------------------------------------------------- unknown names


def test_unknown_transport_lists_installed_names():
    with pytest.raises(sockserve.UnknownPluginError) as caught:
        sockserve.compose("carrier-pigeon", "threading")
    error = caught.value
    assert isinstance(error, LookupError)
    assert str(error) == (
        "no transport plugin named 'carrier-pigeon'; "
        "installed transport plugins: tcp, tcp6, udp, udp6, unix, unix-dgram"
    )
    assert error.kind == "transport"
    assert error.plugin_name == "carrier-pigeon"
    assert error.installed == ("tcp", "tcp6", "udp", "udp6", "unix", "unix-dgram")


def test_unknown_concurrency_lists_installed_names():
    with pytest.raises(sockserve.UnknownPluginError) as caught:
        sockserve.compose("tcp", "gevent")
    error = caught.value
    assert str(error) == (
        "no concurrency plugin named 'gevent'; installed concurrency plugins: "
        + ", ".join(BUILTIN_CONCURRENCY)
    )
    assert (error.kind, error.plugin_name, error.installed) == (
        "concurrency",
        "gevent",
        BUILTIN_CONCURRENCY,
    )


def test_unknown_family_and_socket_type_list_installed_names():
    with pytest.raises(sockserve.UnknownPluginError) as caught:
        sockserve.compose(family="bluetooth", socket_type="stream")
    assert str(caught.value) == (
        "no address family plugin named 'bluetooth'; "
            "installed address family plugins: inet, inet6, unix"
    )
    with pytest.raises(sockserve.UnknownPluginError) as caught:
        sockserve.registry.load("socket_type", "seqpacket")
    assert str(caught.value) == (
        "no socket type plugin named 'seqpacket'; installed socket type plugins: dgram, stream"
    )
    assert caught.value.installed == ("dgram", "stream")


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(sockserve.UnknownPluginError) as caught:
        sockserve.registry.names("codec")
    assert caught.value.plugin_name == "codec"
    assert caught.value.installed == (
        "concurrency", "family", "layer", "plugin", "socket_type", "transport"
    )
    assert "'codec'" in str(caught.value)
    assert "concurrency, family, layer, plugin, socket_type, transport" in str(caught.value)


# --------------------------------------------------------------------------- broken plugins


@pytest.mark.parametrize(
    "value,cause_type,cause_text",
    [
        (
            "sockserve_no_such_module:XMixIn",
            ModuleNotFoundError,
            "No module named 'sockserve_no_such_module'",
        ),
        ("json:NoSuchAttr", AttributeError, "module 'json' has no attribute 'NoSuchAttr'"),
        ("json:dumps", TypeError, "is not a mixin class"),
    ],
)
def test_failing_plugin_names_entry_point_cause_and_installed_names(
    value, cause_type, cause_text, tmp_path
):
    registry = sockserve.Registry(builtins={"sockserve.concurrency": {"broken": value}})
    assert registry.names("concurrency") == ["broken", *BUILTIN_CONCURRENCY]
    with pytest.raises(sockserve.PluginLoadError) as caught:
        registry.compose("tcp", "broken")
    error = caught.value
    assert isinstance(error, ImportError)
    assert error.kind == "concurrency"
    assert error.plugin_name == "broken"
    assert error.entry_point == f"sockserve.concurrency  broken = {value}"
    assert error.distribution is None
    assert isinstance(error.cause, cause_type)
    assert cause_text in str(error.cause)
    assert error.__cause__ is error.cause
    assert error.installed == BUILTIN_CONCURRENCY
    lines = str(error).splitlines()
    assert lines[0] == "cannot load concurrency plugin 'broken'"
    assert lines[1] == f"  entry point: sockserve.concurrency  broken = {value}"
    assert lines[2] == "  distribution: (no installed distribution)"
    assert lines[3].startswith(f"  cause: {cause_type.__name__}: ") and cause_text in lines[3]
    assert lines[4] == "  fix: fix the module the entry point names"
    assert lines[5] == "  installed concurrency plugins: " + ", ".join(BUILTIN_CONCURRENCY)

    # Asking again gives the same report, without importing again.
    with pytest.raises(sockserve.PluginLoadError) as again:
        registry.load("concurrency", "broken")
    assert again.value is error
    # Everything else still loads, composes and serves.
    assert list(registry.failures()) == [("concurrency", "broken")]
    cls = registry.compose("tcp", "threading")
    with no_leaks():
        with serving(cls(address_for("tcp", tmp_path), EchoUpper)) as server:
            assert exchange(server, b"still here") == b"STILL HERE"


def test_failing_plugin_of_a_distribution_names_it_and_how_to_fix(tmp_path, monkeypatch):
    make_distribution(
        tmp_path,
        "sockserve-gevent",
        "0.2.0",
        {"sockserve.concurrency": {"gevent": "sockserve_gevent_missing.mixin:GeventMixIn"}},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = sockserve.Registry()
    info = registry.info("concurrency", "gevent")
    assert (info.distribution, info.version) == ("sockserve-gevent", "0.2.0")
    with pytest.raises(sockserve.PluginLoadError) as caught:
        registry.load("concurrency", "gevent")
    error = caught.value
    assert error.distribution == "sockserve-gevent 0.2.0"
    assert str(error).splitlines() == [
        "cannot load concurrency plugin 'gevent'",
        "  entry point: sockserve.concurrency  gevent = sockserve_gevent_missing.mixin:GeventMixIn",
        "  distribution: sockserve-gevent 0.2.0",
        "  cause: ModuleNotFoundError: No module named 'sockserve_gevent_missing'",
        "  fix: install what it needs, or uninstall sockserve-gevent so it is not discovered",
        "  installed concurrency plugins: " + ", ".join(BUILTIN_CONCURRENCY),
    ]
    assert registry.compose("udp", "threading").__name__ == "ThreadingUDPServer"


# --------------------------------------------------------------------------- name clashes


def test_name_clash_between_distributions_warns_and_the_builtin_wins(tmp_path, monkeypatch):
    make_distribution(
        tmp_path,
        "fake-threads",
        "1.0",
        {"sockserve.concurrency": {"threading": "sockserve_fake_threads:ThreadingMixIn"}},
        {"sockserve_fake_threads.py": "raise RuntimeError('the losing plugin was imported')\n"},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = sockserve.Registry()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = registry.names("concurrency")
        registry.names("concurrency")  # discovery happens once, so does the warning
    version = importlib.metadata.version("sockserve")
    expected = (
        "concurrency plugin name 'threading' is registered more than once; using "
        f"sockserve {version} (sockserve.concurrency._threading:ThreadingMixIn), ignoring "
        "fake-threads 1.0 (sockserve_fake_threads:ThreadingMixIn). "
        "Rename one of the entry points in group sockserve.concurrency."
    )
    clash_warnings = [w for w in caught if issubclass(w.category, sockserve.PluginClashWarning)]
    assert [str(w.message) for w in clash_warnings] == [expected]
    assert registry.clashes == [expected]
    assert names == list(BUILTIN_CONCURRENCY)
    assert registry.info("concurrency", "threading").distribution == "sockserve"
    assert registry.load("concurrency", "threading") is sockserve.ThreadingMixIn
    assert "sockserve_fake_threads" not in sys.modules


# --------------------------------------------------------------------------- adding in code


def test_add_then_remove_a_plugin(tmp_path):
    handled = []

    class InlineMixIn:
        """Runs requests in the serving thread, but is a mixin of its own."""

        def process_request(self, request, client_address):
            handled.append(client_address)
            super().process_request(request, client_address)

    registry = sockserve.registry
    registry.add("concurrency", "test-inline", InlineMixIn)
    try:
        assert registry.names("concurrency") == sorted([*BUILTIN_CONCURRENCY, "test-inline"])
        info = registry.info("concurrency", "test-inline")
        assert (info.value, info.distribution, info.version) == ("<added>", None, None)
        assert registry.load("concurrency", "test-inline") is InlineMixIn
        cls = registry.compose("tcp", "test-inline")
        assert cls.__name__ == "InlineTCPServer"
        with no_leaks():
            with serving(cls(address_for("tcp", tmp_path), EchoUpper)) as server:
                assert exchange(server, b"added") == b"ADDED"
        assert len(handled) == 1
        with pytest.raises(ValueError, match="a concurrency plugin named 'test-inline' is already installed"):
            registry.add("concurrency", "test-inline", InlineMixIn)
    finally:
        registry.remove("concurrency", "test-inline")
    assert registry.names("concurrency") == list(BUILTIN_CONCURRENCY)
    with pytest.raises(sockserve.UnknownPluginError) as caught:
        registry.load("concurrency", "test-inline")
    assert caught.value.installed == BUILTIN_CONCURRENCY


def test_add_refuses_an_installed_name_and_a_plugin_of_the_wrong_shape():
    registry = sockserve.Registry()
    with pytest.raises(ValueError) as caught:
        registry.add("concurrency", "threading", type("Other", (), {}))
    assert str(caught.value) == "a concurrency plugin named 'threading' is already installed"
    with pytest.raises(TypeError, match="is not a mixin class"):
        registry.add("concurrency", "not-a-class", object())
    with pytest.raises(TypeError, match=r"is not a transport \(see sockserve.Transport\)"):
        registry.add("transport", "half", object())
    assert registry.names("concurrency") == list(BUILTIN_CONCURRENCY)


def test_a_removed_name_added_again_composes_with_the_new_plugin():
    """After remove(), compose() must not hand out a class built from the removed plugin."""

    class FirstMixIn:
        block_on_close = True

    class SecondMixIn:
        block_on_close = True

    registry = sockserve.Registry()
    registry.add("concurrency", "swap", FirstMixIn)
    first = registry.compose("tcp", "swap")
    assert FirstMixIn in first.__mro__
    registry.remove("concurrency", "swap")
    with pytest.raises(sockserve.UnknownPluginError):
        registry.load("concurrency", "swap")
    registry.add("concurrency", "swap", SecondMixIn)
    second = registry.compose("tcp", "swap")
    assert SecondMixIn in second.__mro__
    assert FirstMixIn not in second.__mro__


# --------------------------------------------------------------------------- in a fresh interpreter


def test_builtins_work_without_installed_metadata(tmp_path):
    """Vendored: a fresh interpreter without site-packages finds sockserve through a symlink."""
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    (vendor / "sockserve").symlink_to(PACKAGE_DIR, target_is_directory=True)
    for name in runtime_import_names("sockserve") - {"sockserve"}:
        module = importlib.import_module(name)
        source = Path(module.__file__).resolve()
        if source.name == "__init__.py":
            source = source.parent
        (vendor / source.name).symlink_to(source)
    out = run_python(["-I", "-S", script_path("vendored_sockserve.py"), str(vendor)], cwd=tmp_path)
    result = json.loads(out)
    assert "sockserve" not in [d.lower() for d in result["dists"]]
    assert result["file"] == str(vendor / "sockserve" / "__init__.py")
    assert result["reply"] == "VENDORED\n"
    assert result["class"] == "ThreadingTCPServer"
    assert (result["distribution"], result["version"]) == (None, None)
    assert result["names"] == {
        "transport": BUILTIN_NAMES["transport"],
        "concurrency": BUILTIN_NAMES["concurrency"],
    }
    assert result["stopped"]


def test_asking_for_tcp_imports_only_what_tcp_needs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    after_import, after_compose = json.loads(run_python([script_path("lazy_imports.py")], tmp_path, env))
    assert not [m for m in after_import if m.startswith(("sockserve.transports.", "sockserve.concurrency."))]
    for needed in ("sockserve.transports._pairs", "sockserve.transports._inet", "sockserve.transports._stream"):
        assert needed in after_compose
    for unneeded in (
        "sockserve.concurrency._forking",
        "sockserve.concurrency._threading",
        "sockserve.transports._unix",
        "sockserve.transports._dgram",
    ):
        assert unneeded not in after_compose
