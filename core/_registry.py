"""The registry: discovers plugins through entry points and composes server classes.

Discovery reads entry-point metadata only; a plugin's module is imported the first time
that plugin is asked for, so asking for ``tcp`` imports only what ``tcp`` needs. Composed
classes are cached: the same arguments give the same class object.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import importlib_metadata

from ._errors import PluginClashWarning, PluginLoadError, UnknownPluginError
from ._options import with_options
from ._plugin_types import AddressFamily, Transport

__all__ = ["Registry", "PluginInfo", "registry", "compose", "KINDS"]

#: Plugin kind -> entry-point group (DESIGN.md section 3).
KINDS: dict[str, str] = {
    "family": "sockserve.families",
    "socket_type": "sockserve.socket_types",
    "transport": "sockserve.transports",
    "concurrency": "sockserve.concurrency",
    "plugin": "sockserve.plugins",
}

#: Our own distribution's name; its plugins win a name clash.
DISTRIBUTION = "sockserve"

#: A copy of the entry points in our pyproject.toml, used only when sockserve runs
#: without installed metadata (vendored). tests/core/test_registry.py keeps them equal.
BUILTIN_ENTRY_POINTS: dict[str, dict[str, str]] = {
    "sockserve.families": {
        "inet": "sockserve.transports._inet:INET",
        "inet6": "sockserve.transports._inet:INET6",
        "unix": "sockserve.transports._unix:UNIX",
    },
    "sockserve.socket_types": {
        "stream": "sockserve.transports._stream:STREAM",
        "dgram": "sockserve.transports._dgram:DGRAM",
    },
    "sockserve.transports": {
        "tcp": "sockserve.transports._pairs:TCP",
        "tcp6": "sockserve.transports._pairs:TCP6",
        "udp": "sockserve.transports._pairs:UDP",
        "udp6": "sockserve.transports._pairs:UDP6",
        "unix": "sockserve.transports._pairs:UNIX_STREAM",
        "unix-dgram": "sockserve.transports._pairs:UNIX_DGRAM",
    },
    "sockserve.concurrency": {
        "sync": "sockserve.concurrency._sync:SyncMixIn",
        "threading": "sockserve.concurrency._threading:ThreadingMixIn",
        "forking": "sockserve.concurrency._forking:ForkingMixIn",
        "threadpool": "sockserve.concurrency._threadpool:ThreadpoolMixIn",
        "prefork": "sockserve.concurrency._prefork:PreforkMixIn",
    },
    "sockserve.plugins": {
        "access-log": "sockserve.plugins._accesslog:ACCESS_LOG",
        "stats": "sockserve.plugins._stats:STATS",
    },
}

_CLASS_KEYS = frozenset(
    {"__module__", "__doc__", "__qualname__", "__dict__", "__weakref__", "__annotations__",
     "__firstlineno__", "__static_attributes__"}
)


@attrs.frozen
class PluginInfo:
    """Where a plugin comes from: its entry point and distribution."""

    #: The plugin kind (a key of ``KINDS``).
    kind: str
    #: The entry point's name.
    name: str
    #: ``module:attr`` (or ``<added>`` for a plugin added in code).
    value: str
    #: The distribution's name, or None when there is no installed metadata.
    distribution: str | None
    #: The distribution's version, or None.
    version: str | None
    entry_point: Any = attrs.field(eq=False, repr=False)

    @property
    def group(self) -> str:
        """The entry-point group."""
        return KINDS[self.kind]

    def describe_entry_point(self) -> str:
        """Return ``"group  name = module:attr"``."""
        return f"{self.group}  {self.name} = {self.value}"

    def describe_distribution(self) -> str | None:
        """Return ``"name version"`` or None."""
        if self.distribution is None:
            return None
        return f"{self.distribution} {self.version}" if self.version else self.distribution


#: How messages name each kind: "no transport plugin named ...".
LABELS: dict[str, str] = {
    "family": "address family",
    "socket_type": "socket type",
    "transport": "transport",
    "concurrency": "concurrency",
    "plugin": "lifecycle",
}


def _label(kind: str) -> str:
    return LABELS.get(kind, kind.replace("_", " "))


def _is_own(dist_name: str | None) -> bool:
    return dist_name is not None and dist_name.lower().replace("_", "-") == DISTRIBUTION


def _precedence(info: PluginInfo) -> tuple[bool, int, str]:
    """Sort key of plugins registered under one name: the first one wins.

    Ours first (from metadata, or the vendored fallback that has no distribution), then
    the others in the order of ``sys.path`` (as imports resolve), then, within one
    directory, by distribution name: importlib.metadata lists a directory in the order
    the file system gives, which is no order at all.
    """
    ours = info.distribution is None or _is_own(info.distribution)
    dist = getattr(info.entry_point, "dist", None)
    return (not ours, _path_rank(dist), (info.distribution or "").lower())


def _path_rank(dist: Any) -> int:
    """The index in ``sys.path`` of the directory holding *dist*'s metadata."""
    location = getattr(dist, "_path", None)  # PathDistribution: the .dist-info directory
    if location is None:
        return len(sys.path)
    parent = os.path.realpath(os.path.dirname(os.fspath(location)))
    for index, entry in enumerate(sys.path):
        if os.path.realpath(entry or os.curdir) == parent:
            return index
    return len(sys.path)


class _UncheckedFamily(AddressFamily):
    """A ``socket.AF_*`` value no family plugin handles: addresses pass unchecked."""

    expected = "an address for the socket module"

    def __init__(self, address_family: int) -> None:
        self.address_family = address_family  # type: ignore[misc]
        try:
            self.name = socket.AddressFamily(address_family).name  # type: ignore[misc]
        except ValueError:
            self.name = f"AF {address_family}"  # type: ignore[misc]


class Registry:
    """Discovers, loads and composes plugins of every kind.

    :param kinds: plugin kind -> entry-point group.
    :param builtins: fallback entry points for running without installed metadata.
    """

    def __init__(
        self,
        kinds: dict[str, str] | None = None,
        builtins: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self._kinds = dict(KINDS if kinds is None else kinds)
        self._builtins = BUILTIN_ENTRY_POINTS if builtins is None else builtins
        self._lock = threading.RLock()
        self._infos: dict[str, dict[str, PluginInfo]] | None = None
        self._added: dict[tuple[str, str], PluginInfo] = {}
        self._loaded: dict[tuple[str, str], Any] = {}
        self._failed: dict[tuple[str, str], PluginLoadError] = {}
        self._classes: dict[tuple[Any, ...], type] = {}
        self._transport_classes: dict[str, type] = {}
        self._families_by_af: dict[int, AddressFamily] = {}
        #: Name clashes found during discovery, one message each.
        self.clashes: list[str] = []

    # ------------------------------------------------------------------ discovery

    def _discover(self) -> dict[str, dict[str, PluginInfo]]:
        infos = self._infos
        if infos is not None:
            return infos
        with self._lock:
            if self._infos is not None:
                return self._infos
            infos = {}
            clashes = []
            for kind, group in self._kinds.items():
                candidates: dict[str, list[PluginInfo]] = {}
                for ep in importlib_metadata.entry_points(group=group):
                    dist = getattr(ep, "dist", None)
                    info = PluginInfo(
                        kind,
                        ep.name,
                        ep.value,
                        dist.name if dist is not None else None,
                        dist.version if dist is not None else None,
                        ep,
                    )
                    candidates.setdefault(ep.name, []).append(info)
                for name, value in self._builtins.get(group, {}).items():
                    if not any(_is_own(c.distribution) for c in candidates.get(name, ())):
                        ep = importlib_metadata.EntryPoint(name=name, value=value, group=group)
                        info = PluginInfo(kind, name, value, None, None, ep)
                        candidates.setdefault(name, []).insert(0, info)
                chosen = {}
                for name, found in candidates.items():
                    found.sort(key=_precedence)
                    distinct = {(i.distribution, i.value) for i in found}
                    if len(distinct) > 1:
                        winner = found[0]
                        others = ", ".join(
                            f"{i.describe_distribution() or '(no distribution)'} ({i.value})"
                            for i in found[1:]
                        )
                        message = (
                            f"{kind} plugin name {name!r} is registered more than once; using "
                            f"{winner.describe_distribution() or 'the built-in'} ({winner.value}), "
                            f"ignoring {others}. Rename one of the entry points in group {group}."
                        )
                        clashes.append(message)
                        warnings.warn(message, PluginClashWarning, stacklevel=4)
                    chosen[name] = found[0]
                infos[kind] = chosen
            self.clashes = clashes
            self._infos = infos
            return infos

    def refresh(self) -> None:
        """Forget what was discovered, to see distributions installed since.

        Loaded plugins and composed classes stay cached.
        """
        with self._lock:
            self._infos = None
            self._failed.clear()
            self._families_by_af.clear()

    def _check_kind(self, kind: str) -> None:
        if kind not in self._kinds:
            error = UnknownPluginError("plugin kind", kind, self._kinds)
            error.args = (f"no plugin kind {kind!r}; plugin kinds: {', '.join(sorted(self._kinds))}",)
            raise error

    def names(self, kind: str) -> list[str]:
        """Return the sorted names of the installed plugins of *kind*."""
        self._check_kind(kind)
        names = set(self._discover()[kind])
        names.update(n for k, n in self._added if k == kind)
        return sorted(names)

    def info(self, kind: str, name: str) -> PluginInfo:
        """Return where plugin *name* of *kind* comes from.

        :raises UnknownPluginError: no such plugin; the message lists the installed ones.
        """
        self._check_kind(kind)
        added = self._added.get((kind, name))
        if added is not None:
            return added
        info = self._discover()[kind].get(name)
        if info is None:
            raise UnknownPluginError(_label(kind), name, self.names(kind))
        return info

    def add(self, kind: str, name: str, plugin: Any) -> None:
        """Register *plugin* under *name* in code, as if an entry point named it.

        For plugins that are not installed as distributions (tests, applications).
        An existing name is not replaced: a clash raises ``ValueError``.
        """
        with self._lock:
            if name in self.names(kind):
                raise ValueError(f"a {kind} plugin named {name!r} is already installed")
            plugin = self._validate(kind, name, plugin)  # a refused plugin leaves no trace
            self._added[(kind, name)] = PluginInfo(kind, name, "<added>", None, None, None)
            self._loaded[(kind, name)] = plugin

    def remove(self, kind: str, name: str) -> None:
        """Forget a plugin added with ``add``."""
        with self._lock:
            if (kind, name) not in self._added:
                raise UnknownPluginError(
                    _label(kind), name, [n for k, n in self._added if k == kind]
                )
            del self._added[(kind, name)]
            self._loaded.pop((kind, name), None)
            self._families_by_af.clear()
            # Classes composed from the removed plugin must not outlive it.
            if kind == "transport":
                self._transport_classes.pop(name, None)
            position = {"transport": 0, "concurrency": 1}.get(kind)
            if position is not None:
                for key in [k for k in self._classes if k[position] == name]:
                    del self._classes[key]

    def load(self, kind: str, name: str) -> Any:
        """Import and return plugin *name* of *kind* (cached).

        :raises UnknownPluginError: no plugin of that name is installed.
        :raises PluginLoadError: it is installed but cannot be loaded; the message names
            the entry point, the distribution and the cause.
        """
        key = (kind, name)
        try:
            return self._loaded[key]
        except KeyError:
            pass
        info = self.info(kind, name)
        with self._lock:
            if key in self._loaded:
                return self._loaded[key]
            if key in self._failed:
                raise self._failed[key]
            try:
                plugin = self._validate(kind, name, info.entry_point.load())
            except Exception as exc:
                error = PluginLoadError(
                    _label(kind),
                    name,
                    info.describe_entry_point(),
                    info.describe_distribution(),
                    exc,
                    installed=[n for n in self.names(kind) if n != name],
                )
                error.__cause__ = exc
                self._failed[key] = error
                raise error from exc
            self._loaded[key] = plugin
            return plugin

    @staticmethod
    def _validate(kind: str, name: str, plugin: Any) -> Any:
        if kind == "family":
            if isinstance(plugin, type) and issubclass(plugin, AddressFamily):
                plugin = plugin()
            if not (hasattr(plugin, "address_family") and hasattr(plugin, "check_address")):
                raise TypeError(f"{plugin!r} is not an address family (see sockserve.AddressFamily)")
        elif kind == "socket_type":
            if not isinstance(getattr(plugin, "server_class", None), type):
                raise TypeError(f"{plugin!r} is not a socket type (see sockserve.SocketType)")
        elif kind == "transport":
            if not all(hasattr(plugin, a) for a in ("family", "socket_type", "stem")):
                raise TypeError(f"{plugin!r} is not a transport (see sockserve.Transport)")
        elif kind == "concurrency":
            if not isinstance(plugin, type):
                raise TypeError(f"{plugin!r} is not a mixin class")
        return plugin

    def failures(self) -> dict[tuple[str, str], PluginLoadError]:
        """Try to load every installed plugin; return the ones that fail, by (kind, name)."""
        failed = {}
        for kind in self._kinds:
            for name in self.names(kind):
                try:
                    self.load(kind, name)
                except PluginLoadError as exc:
                    failed[(kind, name)] = exc
        return failed

    def family_for(self, address_family: int) -> AddressFamily:
        """Return the family plugin for a ``socket.AF_*`` value.

        A value no installed family plugin handles gets a family that passes addresses
        through unchecked, as the standard module does for any ``address_family``.
        """
        family = self._families_by_af.get(address_family)
        if family is not None:
            return family
        with self._lock:
            for name in self.names("family"):
                try:
                    plugin = self.load("family", name)
                except PluginLoadError:
                    continue  # reported when asked for by name; others still work
                self._families_by_af.setdefault(plugin.address_family, plugin)
            family = self._families_by_af.get(address_family)
        if family is None:
            # The standard module binds whatever address_family a subclass sets (AF_TIPC,
            # AF_VSOCK, ...): without a plugin, the address is used as given, unchecked.
            family = _UncheckedFamily(address_family)
        return family

    # ------------------------------------------------------------------ composing

    def transport_class(self, transport: str | Transport) -> type:
        """Return the server class for *transport* (``TCPServer`` for ``"tcp"``)."""
        key = transport if isinstance(transport, str) else transport.name
        cls = self._transport_classes.get(key)
        if cls is not None:
            return cls
        spec = self.load("transport", transport) if isinstance(transport, str) else transport
        family = self.load("family", spec.family)
        socket_type = self.load("socket_type", spec.socket_type)
        base = socket_type.server_class
        name = f"{spec.stem}Server"
        with self._lock:
            cls = self._transport_classes.get(key)
            if cls is None:
                if (
                    spec.mixin is None
                    and base.address_family == family.address_family
                    and base.__name__ == name
                ):
                    cls = base
                else:
                    bases = (spec.mixin, base) if spec.mixin is not None else (base,)
                    namespace = {
                        "__module__": "sockserve",
                        "__qualname__": name,
                        "__doc__": spec.description or f"{spec.family} {spec.socket_type} server.",
                        "address_family": family.address_family,
                    }
                    cls = type(name, bases, namespace)
                self._transport_classes[key] = cls
        return cls

    def _find_transport(self, family: str, socket_type: str) -> str | Transport:
        for name in self.names("transport"):
            try:
                spec = self.load("transport", name)
            except PluginLoadError:
                continue
            if spec.family == family and spec.socket_type == socket_type:
                return name
        self.load("family", family)  # unknown names raise, listing what is installed
        self.load("socket_type", socket_type)
        stem = family.title() + socket_type.replace("_", " ").title().replace(" ", "")
        return Transport(f"{family}-{socket_type}", family, socket_type, stem)

    def compose(
        self,
        transport: str | Transport | None = None,
        concurrency: str | type = "sync",
        *,
        family: str | None = None,
        socket_type: str | None = None,
        mixins: Sequence[type] = (),
        plugins: Iterable[object] = (),
        options: Mapping[str, Any] | None = None,
    ) -> type:
        """Return the server class for a transport and a concurrency strategy.

        ``compose("udp", "threading") is ThreadingUDPServer``. The same arguments give the
        same class object.

        :param transport: a transport name (default ``"tcp"``); or give *family* and
            *socket_type* instead.
        :param concurrency: a concurrency plugin name, or a mixin class.
        :param mixins: extra mixin classes, placed after the concurrency mixin and before
            the transport class in the MRO.
        :param plugins: lifecycle plugins that apply to servers of this class only.
        :param options: settings of the class (``{"workers": 4}``), checked against what
            the transport, strategy and plugins declare; gives a subclass (not cached).
        :raises OptionError: an unknown option or a bad value.
        :raises UnknownPluginError: a name is not installed; the message lists what is.
        :raises PluginLoadError: a plugin is installed but fails to load.
        """
        if options:
            inner = options.get("inner")
            if isinstance(inner, str) and inner != "sync":
                # A strategy that runs another one inside (prefork's workers) names it with
                # an ``inner`` option; composing it in makes that strategy's options known.
                inner_mixin = self.load("concurrency", inner)
                if inner_mixin not in mixins:
                    mixins = (*mixins, inner_mixin)
            base = self.compose(
                transport, concurrency, family=family, socket_type=socket_type,
                mixins=mixins, plugins=plugins,
            )
            return with_options(base, options)
        plugins = tuple(plugins)
        mixins = tuple(mixins)
        key = (transport, concurrency, family, socket_type, mixins, tuple(map(id, plugins)))
        cls = self._classes.get(key)
        if cls is not None:
            return cls
        if transport is not None and (family is not None or socket_type is not None):
            raise TypeError("give either transport or family/socket_type, not both")
        if transport is None:
            if family is None and socket_type is None:
                transport = "tcp"
            else:
                transport = self._find_transport(family or "inet", socket_type or "stream")
            # One class per composition, however the transport was named.
            canonical = (transport, concurrency, None, None, mixins, key[5])
            cls = self._classes.get(canonical)
            if cls is not None:
                self._classes[key] = cls
                return cls
            key = canonical
        base = self.transport_class(transport)
        if isinstance(concurrency, str):
            mixin = self.load("concurrency", concurrency)
        else:
            mixin = concurrency
        adds_nothing = mixin.__bases__ == (object,) and set(vars(mixin)) <= _CLASS_KEYS
        with self._lock:
            cls = self._classes.get(key)
            if cls is not None:
                return cls
            if adds_nothing and not mixins and not plugins:
                cls = base
            else:
                prefix = "" if adds_nothing else _prefix(mixin)
                name = prefix + "".join(_prefix(m) for m in mixins) + base.__name__
                bases = ((() if adds_nothing else (mixin,)) + mixins + (base,))
                namespace: dict[str, Any] = {
                    "__module__": "sockserve",
                    "__qualname__": name,
                    "__doc__": f"{base.__name__} served with {mixin.__name__} "
                    "(composed by sockserve.compose).",
                }
                if plugins:
                    namespace["_sockserve_plugins"] = base._sockserve_plugins + plugins
                cls = type(name, bases, namespace)
            self._classes[key] = cls
        return cls


def _prefix(mixin: type) -> str:
    name = mixin.__name__
    for suffix in ("MixIn", "Mixin"):
        if name.endswith(suffix) and name != suffix:
            return name[: -len(suffix)]
    return name


#: The default registry, reading the installed distributions' entry points.
registry = Registry()
#: ``registry.compose`` of the default registry.
compose = registry.compose
