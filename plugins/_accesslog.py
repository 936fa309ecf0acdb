"""The ``access-log`` plugin: one line per request through the standard ``logging`` module.

Opt-in: ``sockserve serve --plugin access-log`` or
``compose(..., plugins=[sockserve.registry.load("plugin", "access-log")])``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ..core.hookspecs import hookimpl

__all__ = ["AccessLog", "ACCESS_LOG"]


class AccessLog:
    """Log ``client duration outcome`` for every request on logger ``sockserve.access``.

    The line is written where the request ran (its thread or child process), at INFO for a
    request that succeeded and WARNING for one whose handler raised; a request refused
    after it was accepted (by ``verify_request``, a plugin or a layer, or dropped unrun at
    close) gets an INFO line where it was refused, with no duration since no handler ran,
    and the reason when it is not ``verify_request``. The client is the one the layers
    report (the client behind a PROXY-protocol proxy)::

        127.0.0.1:53122 1.42ms ok
        127.0.0.1:53124 0.31ms error ValueError: bad request
        127.0.0.1:53126 - denied
        127.0.0.1:53128 - denied timeout
    """

    #: Listed by ``sockserve plugins`` but only registered when asked for by name.
    sockserve_autoload = False

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("sockserve.access")
        # Start times per thread: a request starts and finishes in the same thread (or
        # child process), and a thread runs one request at a time.
        self._local = threading.local()

    @hookimpl
    def sockserve_request_denied(self, client_address: Any, reason: str) -> None:
        client = _show_client(client_address)
        if reason == "verify_request":
            self.logger.info("%s - denied", client)
        else:
            self.logger.info("%s - denied %s", client, reason)

    @hookimpl
    def sockserve_request_start(self) -> None:
        self._local.started = time.perf_counter()

    @hookimpl
    def sockserve_request_finish(self, client_address: Any, exc: BaseException | None) -> None:
        started = getattr(self._local, "started", None)
        duration = "-" if started is None else f"{(time.perf_counter() - started) * 1000:.2f}ms"
        client = _show_client(client_address)
        if exc is None:
            self.logger.info("%s %s ok", client, duration)
        else:
            self.logger.warning("%s %s error %s: %s", client, duration, type(exc).__name__, exc)


def _show_client(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in str(host) else f"{host}:{address[1]}"
    return repr(address) if address else "-"


#: The instance the ``access-log`` entry point names.
ACCESS_LOG = AccessLog()
