"""The plugin manager and the per-class hook relays the serve loop reads.

The serve loop never asks pluggy whether a hook has implementations: each server holds a
``HookRelay`` whose attributes are, per hook, one of:

- ``None``: nobody implements the hook, so the per-request path skips it with one
  attribute test;
- a ``SingleImplCaller``: exactly one implementation, a plain one (no wrapper, no
  defaulted arguments), and nobody monitors hook calls: it calls that function directly,
  without pluggy's per-call work (argument check, copy of the implementation list,
  ``_multicall``), and returns what pluggy would;
- otherwise pluggy's ``HookCaller``.

Relays are recomputed in place whenever a plugin is registered, unregistered or blocked, so a
running server sees plugins come and go, and whenever hook-call monitoring starts or stops
(``add_hookcall_monitoring``, ``enable_tracing``): while it is on, every relay holds pluggy's
callers, so that the monitor sees every call.

What belongs here: the manager, its automatic loading, the relays and how a hook is called
(``call_hook``, its ``HookError``). Not here: the hook specifications (``hookspecs``), the
registry of named plugins (``_registry``), and where the serve loop fires each hook
(``_server``).
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any, TypeAlias

import pluggy
from pluggy import HookCaller, HookImpl, Result

from . import hookspecs
from ._errors import HookError, PluginLoadError, PluginLoadWarning

__all__ = [
    "AUTOLOAD_ENV", "HookRelay", "SingleImplCaller", "block_plugins", "call_hook",
    "get_plugin_manager", "relay_for",
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


#: What ``add_hookcall_monitoring`` is given (pluggy's own signatures).
BeforeTrace: TypeAlias = Callable[[str, Sequence[HookImpl], Mapping[str, Any]], None]
AfterTrace: TypeAlias = Callable[[Result[Any], str, Sequence[HookImpl], Mapping[str, Any]], None]


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, telling every relay when the set of plugins changes, and when
    hook-call monitoring starts or stops."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self._relays: weakref.WeakSet[HookRelay] = weakref.WeakSet()
        self._relay_lock = threading.RLock()
        #: Monitors added and not yet undone (``enable_tracing`` may count twice: it adds
        #: one through ``add_hookcall_monitoring``).
        self._monitors = 0

    @property
    def monitored(self) -> bool:
        """Hook calls are being monitored: relays hold pluggy's callers, no fast path."""
        return self._monitors > 0

    def add_hookcall_monitoring(self, before: BeforeTrace, after: AfterTrace) -> Callable[[], None]:
        add = super().add_hookcall_monitoring
        return self._monitoring(lambda: add(before, after))

    def enable_tracing(self) -> Callable[[], None]:
        # pluggy's goes through add_hookcall_monitoring (counted there too); this one
        # holds should a pluggy release trace some other way.
        return self._monitoring(super().enable_tracing)

    def _monitoring(self, start: Callable[[], Callable[[], None]]) -> Callable[[], None]:
        """Start pluggy's monitoring with *start*; relays go through pluggy until undone."""
        with self._relay_lock:
            undo_pluggy = start()
            self._monitors += 1
            self._refresh()
        undone = False

        def undo() -> None:
            nonlocal undone
            with self._relay_lock:
                undo_pluggy()
                if not undone:  # an undo called twice stops one monitor, once
                    undone = True
                    self._monitors -= 1
                    self._refresh()

        return undo

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


def _values(names: tuple[str, ...]) -> Callable[[Mapping[str, object]], tuple[object, ...]]:
    """A function returning the values of *names* in a mapping, as a tuple (``KeyError``
    when one is missing). ``itemgetter`` for two or more: a tenth of a list comprehension's
    cost on CPython 3.11; it returns a bare value for one name."""
    if len(names) > 1:
        return itemgetter(*names)
    if names:
        name = names[0]
        return lambda kwargs: (kwargs[name],)
    return lambda kwargs: ()


class SingleImplCaller:
    """A hook with one plain implementation, called directly rather than through pluggy.

    It passes the implementation exactly the arguments it declares, as pluggy's
    ``_multicall`` does, and returns what pluggy's ``HookCaller`` would: for a
    ``firstresult`` hook the result (``None`` included), otherwise ``[result]``, or ``[]``
    for ``None``. A call that lacks an argument of the hook specification goes to the
    ``HookCaller`` (*hook_caller*), for pluggy's warning and, when the implementation needs
    that argument, its ``HookCallError``. ``name``, ``spec`` and ``get_hookimpls()`` are
    the ``HookCaller``'s.
    """

    __slots__ = ("name", "spec", "hook_caller", "_impl", "_function", "_args", "_check",
                 "_firstresult")

    def __init__(self, caller: HookCaller, impl: HookImpl) -> None:
        #: The hook's name (``sockserve_request_start``).
        self.name = caller.name
        #: The hook's specification.
        self.spec = caller.spec
        #: pluggy's caller of the same hook, for everything else.
        self.hook_caller = caller
        self._impl = impl
        self._function = impl.function
        spec_names = caller.spec.argnames if caller.spec is not None else ()
        self._args = _values(impl.argnames)
        # Values of every argument of the spec, only to see that none is missing: not
        # needed when the implementation takes them all, in the same order.
        self._check = None if impl.argnames == spec_names else _values(spec_names)
        self._firstresult = bool(caller.spec is not None and caller.spec.opts.get("firstresult"))

    @staticmethod
    def handles(caller: HookCaller, impls: Sequence[HookImpl]) -> bool:
        """Whether *caller*, whose implementations are *impls*, can be called directly."""
        spec = caller.spec
        # Defaults of the spec's own arguments are pluggy's to fill in (pluggy >= 1.6).
        if spec is None or getattr(spec, "kwargdefaults", None) or caller.is_historic():
            return False
        if len(impls) != 1:
            return False
        impl = impls[0]
        # Wrappers need _multicall; defaulted arguments are passed only when given.
        return not (impl.wrapper or impl.hookwrapper or impl.kwargnames)

    def get_hookimpls(self) -> list[HookImpl]:
        """The one implementation, in a new list (as ``HookCaller.get_hookimpls``)."""
        return [self._impl]

    def __call__(self, **kwargs: object) -> Any:
        """Call the hook as pluggy's ``HookCaller`` is called: keyword arguments only."""
        return self.call(kwargs)

    def call(self, kwargs: dict[str, object]) -> Any:
        """Call the hook with the arguments *kwargs* (not copied: ``call_hook``'s own)."""
        try:
            if self._check is not None:
                self._check(kwargs)
            args = self._args(kwargs)
        except KeyError:
            return self.hook_caller(**kwargs)
        result = self._function(*args)
        if self._firstresult:
            return result
        return [] if result is None else [result]

    def __repr__(self) -> str:
        return f"<SingleImplCaller {self.name!r} {self._impl.plugin_name!r}>"


#: What a relay attribute holds when the hook has implementations.
Caller: TypeAlias = HookCaller | SingleImplCaller


def _relay_caller(caller: HookCaller, direct: bool) -> Caller | None:
    """What a relay holds for *caller*: None, a ``SingleImplCaller`` when *direct* allows
    one, or *caller*."""
    impls = caller.get_hookimpls()
    if not impls:
        return None
    if direct and SingleImplCaller.handles(caller, impls):
        return SingleImplCaller(caller, impls[0])
    return caller


class HookRelay:
    """What one server class calls: each hook as a caller, or ``None`` when unimplemented."""

    __slots__ = ("_manager", "_class_plugins", "__weakref__", *HOOKS)
    # One per hook of hookspecs (tests/core/test_hooks.py keeps the two lists equal).
    accept_error: Caller | None
    handle_error: Caller | None
    post_fork: Caller | None
    pre_fork: Caller | None
    request_denied: Caller | None
    request_finish: Caller | None
    request_prepared: Caller | None
    request_start: Caller | None
    serve_start: Caller | None
    serve_stop: Caller | None
    server_activate: Caller | None
    server_close: Caller | None
    server_closed: Caller | None
    service_actions: Caller | None
    verify_request: Caller | None
    worker_abort: Caller | None
    worker_exit: Caller | None
    worker_ready: Caller | None

    def __init__(self, manager: PluginManager, class_plugins: tuple[object, ...]) -> None:
        self._manager = manager
        self._class_plugins = class_plugins
        self.refresh()

    def refresh(self) -> None:
        """Recompute which hooks have implementations, and how each is called."""
        # A private manager is not monitored itself, but follows the global one's rule.
        direct = not self._manager.monitored
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
            setattr(self, short, _relay_caller(getattr(manager.hook, name), direct))


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


def _plugin_name(caller: Caller, exc: BaseException) -> str:
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


def call_hook(server: Any, caller: Caller, **kwargs: Any) -> Any:
    """Call *caller*; an implementation that raises goes to ``server.handle_error``.

    The error handler sees a ``HookError`` naming the plugin, chained to the plugin's
    own exception, and the serve loop goes on; the call then returns ``None``.
    """
    try:
        if type(caller) is SingleImplCaller:
            # This call's own dict of arguments, handed on rather than unpacked again.
            kwargs["server"] = server
            return caller.call(kwargs)
        return caller(server=server, **kwargs)
    except Exception as exc:
        try:
            raise HookError(caller.name, _plugin_name(caller, exc)) from exc
        except HookError:
            server.handle_error(kwargs.get("request"), kwargs.get("client_address"))
        return None
