"""The registry: discovers plugins through entry points and composes server classes.

Discovery reads entry-point metadata only; a plugin's module is imported the first time
that plugin is asked for, so asking for ``tcp`` imports only what ``tcp`` needs. Composed
classes are cached: the same arguments give the same class object.

What belongs here, and why it is one module of more than 400 lines: everything that turns
names into classes, because each step needs the others' tables.

- The kinds of plugin as data (``Kind`` rows in ``TABLE``: group, label, check, built-in
  entry points); a new kind is one row.
- Discovery, loading and reporting (``names``, ``info``, ``load``, ``failures``, clashes
  between distributions), with errors that name the entry point and distribution.
- Composition (``compose``, ``transport_class``): the MRO, the class names, the binding of a
  class to its registry and family, and resolving a name back to a class
  (``resolve``) so that composed classes pickle.

Not here: what the plugins do (``transports/``, ``concurrency/``), options (``_options``),
hook relays (``_hooks``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import importlib_metadata

from ._hooks import set_autoload_source
from ._errors import PluginClashWarning, PluginLoadError, UnknownPluginError
from ._options import with_options
from ._plugin_types import AddressFamily, Transport

__all__ = ["KINDS", "TABLE", "Kind", "PluginInfo", "Registry", "compose", "registry"]

def _check_family(plugin: Any) -> Any:
    if isinstance(plugin, type) and issubclass(plugin, AddressFamily):
        plugin = plugin()
    if not (hasattr(plugin, "address_family") and hasattr(plugin, "check_address")):
        raise TypeError(f"{plugin!r} is not an address family (see sockserve.AddressFamily)")
    return plugin


def _check_socket_type(plugin: Any) -> Any:
    if not isinstance(getattr(plugin, "server_class", None), type):
        raise TypeError(f"{plugin!r} is not a socket type (see sockserve.SocketType)")
    return plugin


def _check_transport(plugin: Any) -> Any:
    if not all(hasattr(plugin, a) for a in ("family", "socket_type", "stem")):
        raise TypeError(f"{plugin!r} is not a transport (see sockserve.Transport)")
    return plugin


def _check_mixin(plugin: Any) -> Any:
    if not isinstance(plugin, type):
        raise TypeError(f"{plugin!r} is not a mixin class")
    return plugin


#: What a layer overrides, at least one of them (DESIGN.md section 6).
LAYER_METHODS = ("prepare_request", "verify_request", "shutdown_request")


def _check_layer(plugin: Any) -> Any:
    if not isinstance(plugin, type) or not any(
        name in vars(klass) for klass in plugin.__mro__[:-1] for name in LAYER_METHODS
    ):
        raise TypeError(
            f"{plugin!r} is not a layer: a mixin class overriding {', '.join(LAYER_METHODS)}"
            " (at least one)"
        )
    return plugin


def _check_any(plugin: Any) -> Any:
    return plugin


@attrs.frozen
class Kind:
    """One kind of plugin: a row of the registry's table (DESIGN.md section 3).

    A new kind of plugin is one more row: the registry discovers, checks, loads, lists
    and reports it like every other.
    """

    #: The kind's name, as ``registry.names(kind)`` takes it: ``"transport"``.
    name: str
    #: The entry-point group: ``"sockserve.transports"``.
    group: str
    #: How messages name it: "no transport plugin named ...".
    label: str
    #: The heading of its part of ``sockserve plugins``: "transports".
    title: str
    #: Called with a loaded plugin; returns it (or what to keep instead, e.g. an instance
    #: of a family class) or raises TypeError saying what the kind expects.
    check: Callable[[Any], Any] = _check_any
    #: sockserve's own entry points of this group, for running without installed metadata
    #: (vendored). tests/core/test_registry.py keeps them equal to pyproject.toml's.
    builtins: Mapping[str, str] = attrs.field(factory=dict)


#: The plugin kinds, in the order ``sockserve plugins`` lists them.
TABLE: tuple[Kind, ...] = (
    Kind("family", "sockserve.families", "address family", "address families", _check_family, {
        "inet": "sockserve.transports._inet:INET",
        "inet6": "sockserve.transports._inet:INET6",
        "unix": "sockserve.transports._unix:UNIX",
    }),
    Kind("socket_type", "sockserve.socket_types", "socket type", "socket types", _check_socket_type, {
        "stream": "sockserve.transports._stream:STREAM",
        "dgram": "sockserve.transports._dgram:DGRAM",
    }),
    Kind("transport", "sockserve.transports", "transport", "transports", _check_transport, {
        "tcp": "sockserve.transports._pairs:TCP",
        "tcp6": "sockserve.transports._pairs:TCP6",
        "udp": "sockserve.transports._pairs:UDP",
        "udp6": "sockserve.transports._pairs:UDP6",
        "unix": "sockserve.transports._pairs:UNIX_STREAM",
        "unix-dgram": "sockserve.transports._pairs:UNIX_DGRAM",
    }),
    Kind("layer", "sockserve.layers", "layer", "layers", _check_layer, {
        "tls": "sockserve.transports._tls:TLSLayer",
        "proxy": "sockserve.transports._proxy:ProxyLayer",
    }),
    Kind("concurrency", "sockserve.concurrency", "concurrency", "concurrency strategies", _check_mixin, {
        "sync": "sockserve.concurrency._sync:SyncMixIn",
        "threading": "sockserve.concurrency._threading:ThreadingMixIn",
        "forking": "sockserve.concurrency._forking:ForkingMixIn",
        "threadpool": "sockserve.concurrency._threadpool:ThreadpoolMixIn",
        "prefork": "sockserve.concurrency._prefork:PreforkMixIn",
    }),
    Kind("plugin", "sockserve.plugins", "lifecycle", "lifecycle plugins", _check_any, {
        "access-log": "sockserve.plugins._accesslog:ACCESS_LOG",
        "stats": "sockserve.plugins._stats:STATS",
        "systemd": "sockserve.plugins._systemd:SYSTEMD",
    }),
)

#: Plugin kind -> entry-point group.
KINDS: dict[str, str] = {kind.name: kind.group for kind in TABLE}
#: Entry-point group -> sockserve's own entry points (see ``Kind.builtins``).
BUILTIN_ENTRY_POINTS: dict[str, dict[str, str]] = {kind.group: dict(kind.builtins) for kind in TABLE}
#: Plugin kind -> how messages name it.
LABELS: dict[str, str] = {kind.name: kind.label for kind in TABLE}

#: Our own distribution's name; its plugins win a name clash.
DISTRIBUTION = "sockserve"

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

    :param kinds: the plugin kinds (``TABLE``, the default): ``Kind`` rows, or a mapping
        of kind name -> entry-point group (plugins of such a kind are not checked).
    :param builtins: fallback entry points for running without installed metadata:
        entry-point group -> name -> ``module:attr`` (default: each kind's ``builtins``).
    """

    def __init__(
        self,
        kinds: Iterable[Kind] | Mapping[str, str] | None = None,
        builtins: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        if kinds is None:
            rows: Iterable[Kind] = TABLE
        elif isinstance(kinds, Mapping):
            rows = []
            for name, group in kinds.items():
                label = LABELS.get(name, name.replace("_", " "))
                rows.append(Kind(name, group, label, f"{label} plugins"))
        else:
            rows = kinds
        self._table: dict[str, Kind] = {row.name: row for row in rows}
        self._kinds = {row.name: row.group for row in self._table.values()}
        self._builtins = BUILTIN_ENTRY_POINTS if builtins is None else builtins
        self._lock = threading.RLock()
        self._infos: dict[str, dict[str, PluginInfo]] | None = None
        self._added: dict[tuple[str, str], PluginInfo] = {}
        self._loaded: dict[tuple[str, str], Any] = {}
        self._failed: dict[tuple[str, str], PluginLoadError] = {}
        self._classes: dict[tuple[Any, ...], type] = {}
        self._transport_classes: dict[str, type] = {}
        #: (kind, name) -> the keys of the compositions that use that plugin.
        self._uses: dict[tuple[str, str], set[Any]] = {}
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

    def kinds(self) -> list[Kind]:
        """Return the plugin kinds this registry knows, in listing order."""
        return list(self._table.values())

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
            raise UnknownPluginError(self._table[kind].label, name, self.names(kind))
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
                    self._table[kind].label, name, [n for k, n in self._added if k == kind]
                )
            del self._added[(kind, name)]
            self._loaded.pop((kind, name), None)
            self._families_by_af.clear()
            # Classes composed from the removed plugin must not outlive it.
            if kind == "transport":
                self._transport_classes.pop(name, None)
            for key in self._uses.pop((kind, name), ()):
                self._classes.pop(key, None)

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
                    self._table[kind].label,
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

    def _validate(self, kind: str, name: str, plugin: Any) -> Any:
        return self._table[kind].check(plugin)

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
        """Return the server class for *transport* (``TCPServer`` for ``"tcp"``).

        The class is bound to its address family plugin and to this registry
        (``sockserve_family``, ``sockserve_registry``): constructing a server looks
        nothing up.
        """
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
            if cls is not None:
                return cls
            if (
                self is registry
                and spec.mixin is None
                and base.address_family == family.address_family
                and base.__name__ == name
            ):
                # The socket type's own class is this transport's (TCPServer, UDPServer).
                cls = base
                cls.sockserve_family = family
                cls.sockserve_registry = self
            else:
                bases = (spec.mixin, base) if spec.mixin is not None else (base,)
                cls = self._make_class(name, bases, {
                    "__doc__": spec.description or f"{spec.family} {spec.socket_type} server.",
                    "address_family": family.address_family,
                    "sockserve_family": family,
                })
            self._transport_classes[key] = cls
            self._uses[("transport", key)] = {("transport", key)}
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
        layers: Sequence[str | type] = (),
        mixins: Sequence[type] = (),
        plugins: Iterable[object] = (),
        options: Mapping[str, Any] | None = None,
    ) -> type:
        """Return the server class for a transport, a concurrency strategy and layers.

        ``compose("udp", "threading") is ThreadingUDPServer``. The same arguments give the
        same class object, named by its parts (``PreforkThreadpoolTCPServer``), resolvable
        as ``sockserve.<name>`` and picklable. The MRO is: the concurrency mixin, *mixins*,
        *layers* last-given first (each chains to ``super()`` before its own work, so the
        first one given works on the raw connection first), the transport class.

        :param transport: a transport name (default ``"tcp"``); or give *family* and
            *socket_type* instead.
        :param concurrency: a concurrency plugin name, or a mixin class.
        :param layers: per-connection layers (names of ``sockserve.layers`` plugins, or
            layer classes); the first one sees the raw connection first.
        :param mixins: extra mixin classes, placed after the concurrency mixin.
        :param plugins: lifecycle plugins that apply to servers of this class only; the
            class is named apart from the plain one (``TCPServerWithRecorder``).
        :param options: settings of the class (``{"workers": 4}``), checked against what
            the transport, strategy, layers and plugins declare; gives a subclass (not
            cached). An ``inner`` option (prefork's) names a strategy composed in as if
            given in *mixins*, so that its options are known too.
        :raises OptionError: an unknown option or a bad value.
        :raises UnknownPluginError: a name is not installed; the message lists what is.
        :raises PluginLoadError: a plugin is installed but fails to load.
        """
        mixins = tuple(mixins)
        if options:
            inner = options.get("inner")
            if isinstance(inner, str) and inner != "sync":
                inner_mixin = self.load("concurrency", inner)
                if inner_mixin not in mixins:
                    mixins = (*mixins, inner_mixin)
            base = self.compose(
                transport, concurrency, family=family, socket_type=socket_type,
                layers=layers, mixins=mixins, plugins=plugins,
            )
            derived = with_options(base, options)
            if derived is not base and derived.__module__ == "sockserve":
                # Its own name, so that it pickles (in this process: options are values,
                # not parts a name can spell).
                derived.__qualname__ = _claim_name(base.__qualname__, default=False)
                _composed[derived.__qualname__] = derived
            return derived
        plugins = tuple(plugins)
        layers = tuple(layers)
        key = (transport, concurrency, family, socket_type, layers, mixins,
               tuple(map(id, plugins)))
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
            canonical = (transport, concurrency, None, None, layers, mixins, key[6])
            cls = self._classes.get(canonical)
            if cls is not None:
                self._classes[key] = cls
                return cls
            key = canonical
        base = self.transport_class(transport)
        uses = {("transport", transport if isinstance(transport, str) else transport.name)}
        if isinstance(concurrency, str):
            mixin = self.load("concurrency", concurrency)
            uses.add(("concurrency", concurrency))
        else:
            mixin = concurrency
        layer_classes = []
        for layer in layers:
            if isinstance(layer, str):
                layer_classes.append(self.load("layer", layer))
                uses.add(("layer", layer))
            else:
                layer_classes.append(_check_layer(layer))
        adds_nothing = mixin.__bases__ == (object,) and set(vars(mixin)) <= _CLASS_KEYS
        with self._lock:
            cls = self._classes.get(key)
            if cls is not None:
                return cls
            if adds_nothing and not mixins and not layer_classes and not plugins:
                cls = base
            else:
                parts = (() if adds_nothing else (mixin,)) + mixins + tuple(layer_classes)
                name = "".join(_prefix(m) for m in parts) + base.__name__
                # A layer's prepare_request chains to super() first and works on what it
                # returns: the layer nearest the transport works first. So the first one
                # given goes last in the MRO, and sees the raw connection first.
                bases = (*parts[: len(parts) - len(layer_classes)], *reversed(layer_classes))
                namespace: dict[str, Any] = {
                    "__doc__": f"{base.__name__} served with {mixin.__name__}"
                    + "".join(f", {m.__name__}" for m in parts[1:])
                    + " (composed by sockserve.compose).",
                }
                if plugins:
                    name += "With" + "".join(_plugin_stem(p) for p in plugins)
                    namespace["_sockserve_plugins"] = (*getattr(base, "_sockserve_plugins", ()), *plugins)
                cls = self._make_class(name, (*bases, base), namespace)
            self._classes[key] = cls
            for use in uses:
                self._uses.setdefault(use, set()).add(key)
        return cls

    def _make_class(self, name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> type:
        """Make a composed class, bound to this registry, under a name of its own in
        ``sockserve`` (so that it resolves there and pickles)."""
        public = _claim_name(name, default=self is registry)
        namespace = {"__module__": "sockserve", "__qualname__": public,
                     "sockserve_registry": self, **namespace}
        cls = type(name, bases, namespace)
        _composed[public] = cls
        return cls

    def resolve(self, name: str) -> type:
        """Return the class ``sockserve.<name>`` names: a composed class or a mixin.

        A class composed in this process is found by its name; a name not composed yet is
        read as its parts (``PreforkThreadpoolTCPServer``: prefork, then threadpool, on
        tcp) and composed, so that a pickled class loads in a new process.

        :raises AttributeError: no composition or plugin gives that name.
        """
        cls = _composed.get(name)
        if cls is not None:
            return cls
        for kind in ("concurrency", "layer"):
            for plugin_name in self.names(kind):
                with contextlib.suppress(PluginLoadError):
                    plugin = self.load(kind, plugin_name)
                    if plugin.__name__ == name and plugin.__module__ == "sockserve":
                        return plugin
        cls = self._compose_by_name(name)
        if cls is None:
            raise AttributeError(f"module 'sockserve' has no attribute {name!r}")
        return cls

    def _compose_by_name(self, name: str) -> type | None:
        def loaded(kind: str) -> dict[str, Any]:
            found = {}
            for plugin_name in self.names(kind):
                with contextlib.suppress(PluginLoadError):
                    found[plugin_name] = self.load(kind, plugin_name)
            return found

        for transport, spec in loaded("transport").items():
            tail = f"{spec.stem}Server"
            if not name.endswith(tail):
                continue
            strategies = {_prefix(m): m for m in loaded("concurrency").values()}
            layers = {_prefix(m): m for m in loaded("layer").values()}
            for parts in _split(name[: -len(tail)], {**strategies, **layers}):
                mixins = [m for m in parts if m in strategies.values()]
                chosen = [m for m in parts if m not in strategies.values()]
                if mixins != parts[: len(mixins)]:
                    continue  # strategies come before layers
                concurrency: str | type = mixins.pop(0) if mixins else "sync"
                cls = self.compose(transport, concurrency, mixins=mixins, layers=chosen)
                if cls.__qualname__ == name:
                    return cls
        return None


def _split(text: str, prefixes: Mapping[str, type]) -> Iterable[list[type]]:
    """Every way of reading *text* as a sequence of *prefixes*."""
    if not text:
        yield []
        return
    for prefix, mixin in prefixes.items():
        if prefix and text.startswith(prefix):
            for rest in _split(text[len(prefix):], prefixes):
                yield [mixin, *rest]


#: Composed classes by their name in ``sockserve``; a class goes when nothing uses it.
_composed: weakref.WeakValueDictionary[str, type] = weakref.WeakValueDictionary()


def _claim_name(name: str, *, default: bool) -> str:
    """Return a name under ``sockserve`` for a new class called *name*.

    The default registry's compositions get their plain names; another registry's, and a
    second composition of one name (with other plugins), get a number after it.
    """
    if default and name not in _composed:
        return name
    number = 2
    while f"{name}_{number}" in _composed:
        number += 1
    return f"{name}_{number}"


def _plugin_stem(plugin: object) -> str:
    """A plugin's name in a class name: ``Recorder`` for a Recorder(), ``Stats`` for a module."""
    if isinstance(plugin, types.ModuleType):
        raw = plugin.__name__.rpartition(".")[2]
    elif isinstance(plugin, type):
        raw = plugin.__name__
    else:
        raw = type(plugin).__name__
    words = [w for w in raw.replace("-", "_").split("_") if w]
    return "".join(w[:1].upper() + w[1:] for w in words) or "Plugin"


def _prefix(mixin: type) -> str:
    name = mixin.__name__
    for suffix in ("MixIn", "Mixin", "Layer"):
        if name.endswith(suffix) and name != suffix:
            return name[: -len(suffix)]
    return name


#: The default registry, reading the installed distributions' entry points.
registry = Registry()
#: ``registry.compose`` of the default registry.
compose = registry.compose
set_autoload_source(registry)
