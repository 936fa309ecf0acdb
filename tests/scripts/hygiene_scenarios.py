"""Run by tests/test_plugin_hygiene.py: runs the scenario named in argv[1], prints its result as one JSON line.

Usage: ``python hygiene_scenarios.py SCENARIO``, SCENARIO one of ``autoload-off``,
``block-one``, ``block-all``, ``broken`` and ``clash-order``. The plugin distributions
come from PYTHONPATH; most scenarios echo over a composed server in this process (``echo``).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import warnings
from typing import Any

import sockserve


class Upper(sockserve.BaseRequestHandler):
    def handle(self) -> None:
        chunks = []
        while chunk := self.request.recv(65536):
            chunks.append(chunk)
        self.request.sendall(b"".join(chunks).upper())


def echo(cls: Any, payload: bytes = b"echo") -> str:
    """Serve *cls* on 127.0.0.1, send *payload* and return the reply."""
    server = cls(("127.0.0.1", 0), Upper)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,))
    thread.start()
    try:
        with socket.create_connection(server.server_address, timeout=10) as client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := client.recv(65536):
                reply += chunk
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
    return reply.decode()


def autoload_off() -> None:
    """Autoload is off: a plain server, then one with the plugin asked for by name."""
    manager = sockserve.get_plugin_manager()
    plain = echo(sockserve.ThreadingTCPServer, b"plain")
    imported_before = "hygiene_good" in sys.modules
    good = sockserve.registry.load("plugin", "good")
    named = echo(sockserve.compose("tcp", "threading", plugins=[good]), b"named")
    print(json.dumps({
        "plain": plain, "named": named, "imported_before": imported_before,
        "registered": [manager.get_name(p) for p in manager.get_plugins()],
    }))


def block_one() -> None:
    """SOCKSERVE_BLOCK_PLUGINS names ``good``: what got imported and registered."""
    manager = sockserve.get_plugin_manager()
    reply = echo(sockserve.ThreadingTCPServer)
    print(json.dumps({
        "reply": reply,
        "good_imported": "hygiene_good" in sys.modules,
        "other_imported": "hygiene_other" in sys.modules,
        "registered": [manager.get_name(p) for p in manager.get_plugins()],
        "blocked": manager.is_blocked("good"),
    }))


def block_all() -> None:
    """SOCKSERVE_BLOCK_PLUGINS names every plugin: the echo and how many got registered."""
    reply = echo(sockserve.ThreadingTCPServer)
    print(json.dumps({"reply": reply, "plugins": len(sockserve.get_plugin_manager().get_plugins())}))


def pinned(error: Any) -> dict[str, Any]:
    return {
        "type": type(error).__name__, "message": str(error), "kind": error.kind,
        "plugin_name": error.plugin_name, "entry_point": error.entry_point,
        "distribution": error.distribution, "cause": f"{type(error.cause).__name__}: {error.cause}",
        "chained": error.__cause__ is error.cause, "import_error": isinstance(error, ImportError),
    }


def broken() -> None:
    """Broken plugins installed: their errors, warnings and clashes, and that the rest serves."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manager = sockserve.get_plugin_manager()
        result: dict[str, Any] = {"registered": sorted(manager.get_name(p) for p in manager.get_plugins())}
        errors = {}
        for kind, name in [("transport", "crashy-tls"), ("concurrency", "gevent"),
                           ("concurrency", "notaclass"), ("plugin", "crashy")]:
            try:
                sockserve.registry.load(kind, name)
            except sockserve.PluginLoadError as exc:
                again = None
                try:
                    sockserve.registry.load(kind, name)
                except sockserve.PluginLoadError as second:
                    again = second
                errors[name] = {**pinned(exc), "same_again": again is exc}
        result["errors"] = errors
        compose_errors = []
        for args in [("crashy-tls", "sync"), ("tcp", "gevent")]:
            try:
                sockserve.compose(*args)
            except sockserve.PluginLoadError as exc:
                compose_errors.append(exc.plugin_name)
        result["compose_errors"] = compose_errors
        result["failures"] = sorted(f"{k} {n}" for k, n in sockserve.registry.failures())
        result["tcp_from"] = sockserve.registry.info("transport", "tcp").describe_distribution()
        result["threading_from"] = sockserve.registry.info("concurrency", "threading").describe_distribution()
        result["replies"] = {
            "threading": echo(sockserve.compose("tcp", "threading")),
            "forking": echo(sockserve.compose("tcp", "forking")),
            "sync": echo(sockserve.TCPServer),
            "tcp-alt": echo(sockserve.compose("tcp-alt", "threading")),
        }
        result["tcp_alt_class"] = sockserve.compose("tcp-alt", "threading").__name__
        result["clashes"] = sockserve.registry.clashes
    result["warnings"] = [[w.category.__name__, str(w.message)] for w in caught]
    result["evil_imported"] = "hygiene_evil" in sys.modules
    print(json.dumps(result))


def clash_order() -> None:
    """Transports ``dup`` and ``dup-late`` registered twice: the distribution each goes to,
    then how many clashes there were."""
    warnings.simplefilter("ignore")
    r = sockserve.registry
    print(json.dumps([r.info("transport", n).distribution for n in ("dup", "dup-late")] + [len(r.clashes)]))


SCENARIOS = {
    "autoload-off": autoload_off,
    "block-one": block_one,
    "block-all": block_all,
    "broken": broken,
    "clash-order": clash_order,
}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]]()
