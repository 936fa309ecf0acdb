"""The ``systemd`` plugin: tell the service manager how the server is doing (``sd_notify``).

Opt-in by name (``sockserve serve`` turns it on when ``NOTIFY_SOCKET`` is set). Without a
notify socket it does nothing. Only the process that built the server notifies: under
``prefork`` the supervisor, never a worker (systemd takes notifications from the main
process only, ``NotifyAccess=main``).

- ``READY=1`` and ``STATUS=serving on <address>`` once ``serve_forever`` runs
  (``sockserve_serve_start``);
- ``STOPPING=1`` when the server starts stopping: the serve loop ended
  (``sockserve_serve_stop``; prefork's parent stops its workers right after) or
  ``server_close()`` started (``sockserve_server_close``), whichever comes first;
- ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2`` from the serve loop
  (``sockserve_service_actions``) when ``WATCHDOG_USEC`` asks for it (and
  ``WATCHDOG_PID``, if set, is this process): a ping says the loop still turns. The loop
  turns at least every poll interval (``sockserve serve``: 0.5 s), so ``WatchdogSec=``
  must be at least twice that; a few seconds is usual.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from ..core import hookimpl, plugin_state
from ..transports._systemd import notify, watchdog_interval

__all__ = ["SystemdNotify", "SYSTEMD", "describe_address"]


def describe_address(address: Any) -> str:
    """``127.0.0.1:8000``, ``[::1]:8000``, ``unix:/run/app.sock``, for ``STATUS=``."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in str(host) else f"{host}:{address[1]}"
    if isinstance(address, bytes):
        address = address.decode("utf-8", "backslashreplace")
    text = str(address)
    return f"unix:@{text[1:]}" if text.startswith("\0") else f"unix:{text}"


class _State:
    """One server's notification state, in the process that built it."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.ready = False
        self.stopping = False
        self.interval: float | None = None
        self.last_ping = 0.0


class SystemdNotify:
    """Send ``sd_notify`` messages for a server's lifecycle; see the module docstring."""

    sockserve_autoload = False
    description = "sd_notify: READY, STOPPING and WATCHDOG to systemd when NOTIFY_SOCKET is set"

    def _state(self, server: Any) -> _State | None:
        """The server's state, or None in a process that must not notify (a worker)."""
        state = plugin_state(server, self, _State)
        if state.pid != os.getpid() or getattr(server, "worker_id", None) is not None:
            return None
        return state

    @hookimpl
    def sockserve_server_activate(self, server: Any) -> None:
        plugin_state(server, self, _State)  # made here, before any worker is forked

    @hookimpl
    def sockserve_serve_start(self, server: Any) -> None:
        state = self._state(server)
        if state is None:
            return
        with state.lock:
            if state.ready:
                return
            state.ready = True
            state.interval = watchdog_interval()
            state.last_ping = time.monotonic()
        notify(f"READY=1\nSTATUS=serving on {describe_address(server.server_address)}")

    @hookimpl
    def sockserve_service_actions(self, server: Any) -> None:
        state = self._state(server)
        if state is None or state.interval is None or state.stopping:
            return
        now = time.monotonic()
        if now - state.last_ping >= state.interval:
            state.last_ping = now
            notify("WATCHDOG=1")

    def _stopping(self, server: Any) -> None:
        state = self._state(server)
        if state is None:
            return
        with state.lock:
            if state.stopping or not state.ready:
                return
            state.stopping = True
        notify("STOPPING=1\nSTATUS=stopping: finishing the requests in flight")

    @hookimpl
    def sockserve_serve_stop(self, server: Any) -> None:
        self._stopping(server)

    @hookimpl
    def sockserve_server_close(self, server: Any) -> None:
        self._stopping(server)


#: The instance the ``systemd`` entry point names.
SYSTEMD = SystemdNotify()
