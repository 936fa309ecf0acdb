"""The plugin manager and the per-class hook relays the serve loop reads.

The serve loop never asks pluggy whether a hook has implementations: each server holds a
``HookRelay`` whose attributes are either ``None`` (nobody implements the hook, so the
per-request path skips it with one attribute test) or the pluggy ``HookCaller``. Relays are
recomputed in place whenever a plugin is registered, unregistered or blocked, so a running
server sees plugins come and go.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import pluggy
from pluggy import HookCaller

from . import hookspecs
from ._errors import HookError, PluginLoadError, PluginLoadWarning

__all__ = [
    "AUTOLOAD_ENV", "HookRelay", "block_plugins", "call_hook", "get_plugin_manager", "relay_for",
    "set_autoload_source",
]

#: Environment variable that stops automatic loading of the ``sockserve.plugins`` group.
AUTOLOAD_ENV = "SOCKSERVE_DISABLE_PLUGIN_AUTOLOAD"
#: Environment variable naming auto-loaded plugins to block (comma-separated).
BLOCK_ENV = "SOCKSERVE_BLOCK_PLUGINS"

#: Short attribute name on a relay -> hook name.
HOOKS: dict[str, str] = {
    name[len("sockserve_"):]: name
    for name in dir(hookspecs)
    if name.startswith("sockserve_")
}


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, telling every relay when the set of plugins changes."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self._relays: weakref.WeakSet[HookRelay] = weakref.WeakSet()
        self._relay_lock = threading.RLock()

    def register(self, plugin: object, name: str | None = None) -> str | None:
        result = super().register(plugin, name)
        self._refresh()
        return result

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        result = super().unregister(plugin, name)
        self._refresh()
        return result

    def set_blocked(self, name: str) -> None:
        super().set_blocked(name)
        self._refresh()

    def _refresh(self) -> None:
        with self._relay_lock:
            for relay in list(self._relays):
                relay.refresh()


class HookRelay:
    """What one server class calls: each hook as a caller, or ``None`` when unimplemented."""

    __slots__ = ("_manager", "_class_plugins", "__weakref__", *HOOKS)
    # One per hook of hookspecs (tests/core/test_hooks.py keeps the two lists equal).
    accept_error: HookCaller | None
    handle_error: HookCaller | None
    post_fork: HookCaller | None
    pre_fork: HookCaller | None
    request_denied: HookCaller | None
    request_finish: HookCaller | None
    request_prepared: HookCaller | None
    request_start: HookCaller | None
    serve_start: HookCaller | None
    serve_stop: HookCaller | None
    server_activate: HookCaller | None
    server_close: HookCaller | None
    server_closed: HookCaller | None
    service_actions: HookCaller | None
    verify_request: HookCaller | None
    worker_abort: HookCaller | None
    worker_exit: HookCaller | None
    worker_ready: HookCaller | None

    def __init__(self, manager: PluginManager, class_plugins: tuple[object, ...]) -> None:
        self._manager = manager
        self._class_plugins = class_plugins
        self.refresh()

    def refresh(self) -> None:
        """Recompute which hooks have implementations."""
        manager: pluggy.PluginManager = self._manager
        if self._class_plugins:
            # A private manager holding the global plugins plus this class's own; rebuilt
            # on every change of the global set (rare), never consulted per request.
            manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
            manager.add_hookspecs(hookspecs)
            for plugin in self._manager.get_plugins():
                manager.register(plugin, self._manager.get_name(plugin))
            for plugin in self._class_plugins:
                if not manager.is_registered(plugin):
                    manager.register(plugin)
        for short, name in HOOKS.items():
            caller = getattr(manager.hook, name)
            setattr(self, short, caller if caller.get_hookimpls() else None)


_manager: PluginManager | None = None
_manager_lock = threading.Lock()
#: Names given to block_plugins() (added to those in SOCKSERVE_BLOCK_PLUGINS).
_blocked: set[str] = set()


def block_plugins(names: Iterable[str]) -> None:
    """Keep the auto-loaded plugins *names* out of this process.

    Called before the plugin manager is first used, they are not even imported.
    """
    names = set(names)
    with _manager_lock:
        _blocked.update(names)
        manager = _manager
    if manager is not None:
        for name in names:
            manager.set_blocked(name)
#: Where auto-loaded plugins come from: the default registry, which sets itself here when
#: its module is imported (``set_autoload_source``), so that this module imports no
#: registry (core's modules import each other in no circle).
_source: Any = None
#: The relay of the classes that add no plugins of their own.
_global_relay: HookRelay | None = None


def set_autoload_source(source: Any) -> None:
    """Auto-load ``sockserve.plugins`` from *source*: an object with ``names(kind)`` and
    ``load(kind, name)`` (a ``Registry``)."""
    global _source
    _source = source


def get_plugin_manager() -> PluginManager:
    """Return the global plugin manager, loading ``sockserve.plugins`` on first use.

    Automatic loading is skipped when ``SOCKSERVE_DISABLE_PLUGIN_AUTOLOAD`` is set to a
    non-empty value other than ``0``. A plugin that fails to load is reported with a
    ``PluginLoadWarning`` naming its entry point and distribution; the others still load.
    """
    global _manager
    if _manager is not None:
        return _manager
    with _manager_lock:
        if _manager is None:
            manager = PluginManager()
            if os.environ.get(AUTOLOAD_ENV, "") in ("", "0"):
                _autoload(manager)
            _manager = manager
    return _manager


def _autoload(manager: PluginManager) -> None:
    """Register every ``sockserve.plugins`` entry point that wants to be auto-loaded.

    Skipped: names listed in ``SOCKSERVE_BLOCK_PLUGINS`` (not even imported), and plugins
    whose object says ``sockserve_autoload = False`` (opt-in by name, like the shipped
    ``access-log`` and ``stats``).
    """
    registry = _source
    if registry is None:
        return
    blocked = {n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()} | _blocked
    for name in blocked:
        manager.set_blocked(name)
    for name in registry.names("plugin"):
        if name in blocked:
            continue
        try:
            plugin = registry.load("plugin", name)
        except PluginLoadError as exc:
            warnings.warn(str(exc), PluginLoadWarning, stacklevel=3)
            continue
        if getattr(plugin, "sockserve_autoload", True) is False:
            continue
        if manager.get_plugin(name) is None and not manager.is_blocked(name):
            manager.register(plugin, name)


def relay_for(server_class: type) -> HookRelay:
    """Return the relay for servers of *server_class* (its ``_sockserve_plugins`` added).

    Classes without plugins of their own share one relay. A class with some keeps its own,
    on the class: it goes when the class goes.
    """
    global _global_relay
    plugins: tuple[object, ...] = tuple(getattr(server_class, "_sockserve_plugins", ()))
    relay = _global_relay if not plugins else vars(server_class).get("_sockserve_relay")
    if relay is not None and relay._class_plugins == plugins:
        return relay
    manager = get_plugin_manager()
    with manager._relay_lock:
        relay = _global_relay if not plugins else vars(server_class).get("_sockserve_relay")
        if relay is None or relay._class_plugins != plugins:
            relay = HookRelay(manager, plugins)
            manager._relays.add(relay)
            if plugins:
                type.__setattr__(server_class, "_sockserve_relay", relay)
            else:
                _global_relay = relay
    return relay


def _plugin_name(caller: pluggy.HookCaller, exc: BaseException) -> str:
    """Name the plugin whose implementation raised *exc*, from the traceback."""
    codes = {}
    for impl in caller.get_hookimpls():
        code = getattr(impl.function, "__code__", None)
        if code is not None:
            codes[code] = impl.plugin_name
    tb = exc.__traceback__
    found = "(unknown plugin)"
    while tb is not None:
        name = codes.get(tb.tb_frame.f_code)
        if name is not None:
            found = name  # keep the innermost hook implementation frame
        tb = tb.tb_next
    return found


def call_hook(server: Any, caller: pluggy.HookCaller, **kwargs: Any) -> Any:
    """Call *caller*; an implementation that raises goes to ``server.handle_error``.

    The error handler sees a ``HookError`` naming the plugin, chained to the plugin's
    own exception, and the serve loop goes on; the call then returns ``None``.
    """
    try:
        return caller(server=server, **kwargs)
    except Exception as exc:
        try:
            raise HookError(caller.name, _plugin_name(caller, exc)) from exc
        except HookError:
            server.handle_error(kwargs.get("request"), kwargs.get("client_address"))
        return None
