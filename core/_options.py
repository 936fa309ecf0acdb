"""Options: typed, validated server settings declared by the classes and plugins that use them.

An option is a class attribute of the server class (``daemon_threads``, ``max_children``,
``threads``), so code written for the standard module that sets them in a subclass keeps
working unchanged. What this module adds is a declaration of each option: an attrs class
named by the declaring class's (or plugin's) ``sockserve_options`` attribute, whose fields
say each option's type, allowed values and default.

What belongs here, and why it is one module of more than 400 lines: declaring and checking
options, for every caller (Python, the command line, the server at construction).

- The field factories and validators plugin authors declare options with (``option``,
  ``flag``, ``count``, ``seconds``, ``choice``, ``text``, ``python_object``,
  ``non_negative``, ``positive``), the checks across fields an options class lists in its
  ``sockserve_checks`` (``requires``, ``exclusive``, ``any_of``, ``option_check``), and
  the renamed options it lists in ``sockserve_renamed`` (old name -> new name).
- Collecting the declarations of a server class, one per name: its MRO, its class plugins
  and the globally registered plugins (auto-loaded ones included); making each declared
  default the class attribute of the class that declares it (``declare_options``,
  ``settle_options``).
- Checking values: ``with_options`` (Python), ``parse_command_line_options`` (text),
  ``check_options`` (a complete server, before it binds), ``read_options`` (a plugin
  reading its own options).

Not here: the command line itself and its hints for unknown options (``_cli``), the plugin
manager (``_hooks``, asked for the global plugins).
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
import typing
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import attrs

from ._errors import OptionError
from ._hooks import get_plugin_manager

__all__ = [
    "OptionCheck",
    "any_of",
    "check_options",
    "choice",
    "count",
    "declare_options",
    "declared_option_names",
    "exclusive",
    "flag",
    "non_negative",
    "option",
    "option_check",
    "option_fields",
    "parse_command_line_options",
    "parse_option_value",
    "positive",
    "python_object",
    "read_options",
    "requires",
    "seconds",
    "settle_options",
    "text",
    "with_options",
]

T = TypeVar("T")
_C = TypeVar("_C", bound=type)

#: Key of sockserve's entry in an attrs field's ``metadata``.
_META = "sockserve"
#: sockserve's own code: a deprecation warning points at the first frame outside it (the
#: plugin author's line), as STYLE.md asks. tests/ shares the root, so it is not skipped.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIBRARY = tuple(os.path.join(_ROOT, d) + os.sep for d in ("core", "concurrency", "transports",
                                                           "plugins")) + (os.path.join(_ROOT, "__init__.py"),)


@attrs.frozen
class _Info:
    """What sockserve adds to an attrs field: is it required, may text set it."""

    required: bool = False
    python_only: bool = False


_PLAIN = _Info()


def _info(field: attrs.Attribute[Any]) -> _Info:
    info = field.metadata.get(_META)
    return info if isinstance(info, _Info) else _PLAIN


def _worded(key: str, value: object, message: str, known: Iterable[str] = ()) -> OptionError:
    """An OptionError whose text is *message* as given.

    OptionError words "unknown option" and "bad value" messages itself; a required or a
    clashing option needs its own words.
    """
    error = OptionError(key, value, message, known)
    error.args = (message,)
    return error


def _warn(message: str) -> None:
    """Warn (DeprecationWarning) at the first frame outside sockserve's own code."""
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    warnings.warn(message, DeprecationWarning, stacklevel=level)


# --------------------------------------------------------------------------- validators


def non_negative(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """Check a number is >= 0 (an attrs validator; None passes, combine with a type check).

    :raises ValueError: ``'<name>' must be >= 0 (got <value>)``.
    """
    if value is not None and value < 0:
        raise ValueError(f"'{attribute.name}' must be >= 0 (got {value!r})")


def positive(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """Check a number is > 0 (an attrs validator; None passes, combine with a type check).

    :raises ValueError: ``'<name>' must be > 0 (got <value>)``.
    """
    if value is not None and value <= 0:
        raise ValueError(f"'{attribute.name}' must be > 0 (got {value!r})")


# These validators are attrs classes, not closures, so that two declarations of one option
# that say the same thing compare equal (see _same).


@attrs.frozen
class _AtLeast:
    minimum: int

    def __call__(self, instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or value < self.minimum:
            raise ValueError(f"'{attribute.name}' must be an int >= {self.minimum} (got {value!r})")


@attrs.frozen
class _NotBool:
    what: str

    def __call__(self, instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool):
            raise TypeError(f"'{attribute.name}' must be {self.what}, not a bool (got {value!r})")


@attrs.frozen
class _OneOf:
    values: tuple[Any, ...]

    def __call__(self, instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in self.values:
            allowed = ", ".join(repr(v) for v in self.values)
            raise ValueError(f"'{attribute.name}' must be one of {allowed} (got {value!r})")


@attrs.frozen
class _NotEmpty:
    def __call__(self, instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not value:
            raise ValueError(f"'{attribute.name}' must not be empty")


def _maybe(check: Any, optional: bool) -> Any:
    return attrs.validators.optional(check) if optional else check


# --------------------------------------------------------------------------- field factories


def option(
    validator: Any = None,
    *,
    default: Any = attrs.NOTHING,
    required: bool = False,
    python_only: bool = False,
) -> Any:
    """Declare an option: a field of a ``sockserve_options`` attrs class.

    The field's annotation says what ``--option KEY=VALUE`` text converts to (``bool``,
    ``int``, ``float``, ``str`` or ``X | None``); the validator says which values are
    allowed. The factories below (``count``, ``flag``, ...) call this one.

    :param validator: an attrs validator (or a list of them), called with each new value.
    :param default: the option's default. It becomes the class attribute of the class
        that declares the options (``declare_options``): declare it here and nowhere else.
        A plugin reads its options, defaults included, with ``read_options``.
    :param required: there is no default: a server is built only once the option is set
        (``option certfile is required`` otherwise). None counts as not set.
    :param python_only: the value is a Python object (an ``ssl.SSLContext``): settable from
        Python, not offered by ``sockserve serve --option``.
    :raises TypeError: *required* with a *default*.
    """
    if required and default is not attrs.NOTHING:
        raise TypeError("a required option has no default")
    # kw_only: options are set by name, and a field with a default may then come first.
    return attrs.field(validator=validator, default=default, kw_only=True,
                       metadata={_META: _Info(required=required, python_only=python_only)})


def flag(*, optional: bool = False, default: Any = attrs.NOTHING, required: bool = False) -> Any:
    """Declare an option holding a bool (``--option`` text: 1/0, true/false, yes/no, on/off).

    :param optional: None is allowed too (``ipv6_only``: None leaves the system default).
    """
    return option(_maybe(attrs.validators.instance_of(bool), optional), default=default,
                  required=required)


def count(
    minimum: int = 0, *, optional: bool = False, default: Any = attrs.NOTHING, required: bool = False
) -> Any:
    """Declare an option holding an int >= *minimum* (a bool is not a count).

    :param optional: None is allowed too.
    """
    check = attrs.validators.and_(attrs.validators.instance_of(int), _AtLeast(minimum))
    return option(_maybe(check, optional), default=default, required=required)


def seconds(*, optional: bool = True, default: Any = attrs.NOTHING, required: bool = False) -> Any:
    """Declare an option holding a duration in seconds: an int or float >= 0.

    :param optional: None is allowed too (the default: None usually means "no limit").
    """
    check = attrs.validators.and_(
        attrs.validators.instance_of((int, float)), _NotBool("a number of seconds"), non_negative
    )
    return option(_maybe(check, optional), default=default, required=required)


def choice(*values: Any, default: Any = attrs.NOTHING, required: bool = False) -> Any:
    """Declare an option holding one of *values* (``mode: str = choice("a", "b", default="a")``)."""
    if not values:
        raise TypeError("choice() needs at least one value")
    return option(_OneOf(values), default=default, required=required)


def text(
    *, optional: bool = False, empty: bool = False, default: Any = attrs.NOTHING, required: bool = False
) -> Any:
    """Declare an option holding a str (``--option`` text is taken less surrounding space).

    :param optional: None is allowed too (``certfile: str | None = text(optional=True,
        default=None)``).
    :param empty: the empty string is allowed.
    """
    check: Any = attrs.validators.instance_of(str)
    if not empty:
        check = attrs.validators.and_(check, _NotEmpty())
    return option(_maybe(check, optional), default=default, required=required)


def python_object(
    kind: type | tuple[type, ...], *, optional: bool = True, default: Any = None, required: bool = False
) -> Any:
    """Declare an option holding an instance of *kind*, settable from Python only.

    ``ssl_context: ssl.SSLContext | None = python_object(ssl.SSLContext)``: refused by
    ``sockserve serve --option`` and left out of its list of options, since text cannot
    make one.

    :param optional: None is allowed too (the default, with default None).
    """
    return option(_maybe(attrs.validators.instance_of(kind), optional),
                  default=attrs.NOTHING if required else default, required=required,
                  python_only=True)


# --------------------------------------------------------------------------- checks across fields


@attrs.frozen
class OptionCheck:
    """A check across options of one options class, listed in its ``sockserve_checks``.

    Made by ``requires``, ``exclusive``, ``any_of`` or ``option_check``. It runs when
    ``with_options`` sets one of its *names*, and on the complete server before it binds
    (``check_options``).

    :ivar names: the options it reads.
    :ivar test: called with those options' values as keyword arguments; true means fine.
    :ivar message: the error's text, formatted with the same values (``{certfile!r}``).
    """

    names: tuple[str, ...]
    test: Callable[..., bool]
    message: str

    def problem(self, values: Mapping[str, Any]) -> str | None:
        """Return the error message for *values* (name -> value), or None when they pass."""
        mine = {name: values.get(name) for name in self.names}
        return None if self.test(**mine) else self.message.format(**mine)


def requires(name: str, *needed: str) -> OptionCheck:
    """Check that when option *name* is set (not None), each of *needed* is set too.

    ``requires("keyfile", "certfile")`` fails with ``option keyfile requires option certfile``.
    """
    if not needed:
        raise TypeError("requires() needs the options that option needs")
    noun = "option" if len(needed) == 1 else "options"

    def test(**values: Any) -> bool:
        return values[name] is None or all(values[n] is not None for n in needed)

    return OptionCheck((name, *needed), test, f"option {name} requires {noun} {_listed(needed, 'and')}")


def exclusive(*names: str) -> OptionCheck:
    """Check that at most one of the options *names* is set (not None).

    ``exclusive("certfile", "ssl_context")`` fails with
    ``options certfile and ssl_context exclude each other; set one of them``.
    """
    if len(names) < 2:
        raise TypeError("exclusive() needs two options or more")

    def test(**values: Any) -> bool:
        return sum(v is not None for v in values.values()) <= 1

    return OptionCheck(names, test, f"options {_listed(names, 'and')} exclude each other; set one of them")


def any_of(*names: str) -> OptionCheck:
    """Check that at least one of the options *names* is set (not None).

    ``any_of("certfile", "ssl_context")`` fails with
    ``one of options certfile or ssl_context is required``. With ``exclusive`` on the same
    names: exactly one. (For a single option, declare it ``required=True``.)
    """
    if len(names) < 2:
        raise TypeError("any_of() needs two options or more (for one, declare it required)")

    def test(**values: Any) -> bool:
        return any(v is not None for v in values.values())

    return OptionCheck(names, test, f"one of options {_listed(names, 'or')} is required")


def option_check(*names: str, test: Callable[..., bool], message: str) -> OptionCheck:
    """Check the options *names* together with *test*, given their values by name.

    ``option_check("low", "high", test=lambda low, high: low <= high,
    message="option low ({low}) must not exceed option high ({high})")``.
    """
    if not names:
        raise TypeError("option_check() needs the names of the options it reads")
    return OptionCheck(names, test, message)


def _listed(names: Iterable[str], word: str) -> str:
    names = list(names)
    return ", ".join(names[:-1]) + f" {word} " + names[-1] if len(names) > 1 else names[0]


# --------------------------------------------------------------------------- declarations


@attrs.frozen(eq=False)
class _Declaration:
    """One declared option: its field, its options class and who declared it."""

    field: attrs.Attribute[Any]
    options: type
    owner: type | None  # the declaring class; None for a plugin
    plugin: str | None  # how to name the declaring plugin
    tp: Any  # the field's type, resolved

    @property
    def info(self) -> _Info:
        return _info(self.field)

    @property
    def declarer(self) -> str:
        # Worked out when asked: a class's public __module__ is set after its body ran.
        return _label(self.owner) if self.owner is not None else str(self.plugin)


@attrs.define
class _Table:
    """The options of a server class: name -> declaration, and old name -> new name."""

    declared: dict[str, _Declaration] = attrs.field(factory=dict)
    renamed: dict[str, str] = attrs.field(factory=dict)

    def copy(self) -> _Table:
        return _Table(dict(self.declared), dict(self.renamed))


#: Classes settled: their own defaults applied and their renamed attributes moved.
_settled: weakref.WeakSet[type] = weakref.WeakSet()
#: Class -> the options its MRO declares (plugins are asked each time: they come and go).
_class_tables: weakref.WeakKeyDictionary[type, _Table] = weakref.WeakKeyDictionary()
#: Options class -> its fields' resolved types.
_type_cache: weakref.WeakKeyDictionary[type, dict[str, Any]] = weakref.WeakKeyDictionary()


def _label(owner: type) -> str:
    return f"{owner.__module__}.{owner.__qualname__}"


def _options_class(holder: object, where: str) -> type:
    declared = holder if isinstance(holder, type) else getattr(holder, "sockserve_options", None)
    if not (isinstance(declared, type) and attrs.has(declared)):
        raise TypeError(f"{where}.sockserve_options must be an attrs class, not {declared!r}")
    return declared


def _types(options: type) -> dict[str, Any]:
    """Each field's type, resolved from its annotation where that can be done."""
    found = _type_cache.get(options)
    if found is None:
        # resolve_types fails as a whole on one annotation naming a TYPE_CHECKING-only
        # import (a python_object's type, say); then each is resolved alone, as typing does.
        with contextlib.suppress(Exception):
            attrs.resolve_types(options)
        namespace = dict(vars(sys.modules.get(options.__module__, types.ModuleType("_"))))
        found = {}
        for field in attrs.fields(options):
            tp = field.type
            if isinstance(tp, str):
                try:
                    tp = eval(tp, namespace, {})  # an annotation, resolved as typing does
                except Exception:  # noqa: BLE001
                    tp = str  # unknown: text is taken as written
            found[field.name] = tp
        _type_cache[options] = found
    return found


def _checks(options: type) -> tuple[OptionCheck, ...]:
    checks = tuple(getattr(options, "sockserve_checks", ()))
    names = {field.name for field in attrs.fields(options)}
    for check in checks:
        if not isinstance(check, OptionCheck):
            raise TypeError(f"{_label(options)}.sockserve_checks holds {check!r}, not an OptionCheck")
        unknown = [n for n in check.names if n not in names]
        if unknown:
            raise TypeError(f"{_label(options)}.sockserve_checks reads {', '.join(unknown)}, "
                            "which it does not declare")
    return checks


def _renamed(options: type) -> dict[str, str]:
    renamed = dict(getattr(options, "sockserve_renamed", {}))
    names = {field.name for field in attrs.fields(options)}
    for old, new in renamed.items():
        if new not in names or old in names:
            raise TypeError(f"{_label(options)}.sockserve_renamed: {old!r} -> {new!r} must name "
                            "a field of its own by its new name only")
    return renamed


def _same(a: _Declaration, b: _Declaration) -> bool:
    fa, fb = a.field, b.field
    return (a.tp, fa.validator, fa.default, fa.converter, _info(fa)) == (
        b.tp, fb.validator, fb.default, fb.converter, _info(fb))


def _add(table: _Table, options: type, owner: type | None, plugin: str | None) -> None:
    """Add what *options* declares to *table*; raise on a second, different declaration.

    A subclass may re-declare an option of its own base; any other second declaration of
    a name must declare the same (two strategies' identical ``block_on_close``).
    """
    kinds = _types(options)
    _checks(options)
    for field in attrs.fields(options):
        new = _Declaration(field, options, owner, plugin, kinds[field.name])
        old = table.declared.get(field.name)
        if old is None or (old.owner is not None and owner is not None and issubclass(owner, old.owner)):
            table.declared[field.name] = new
        elif old.options is not options and not _same(old, new):
            raise _worded(field.name, None,
                          f"option {field.name!r} is declared twice: by {old.declarer} "
                          f"({old.options.__qualname__}) and by {new.declarer} "
                          f"({options.__qualname__}); rename one, or declare it once where "
                          "both can use it")
    for old_name, new_name in _renamed(options).items():
        if table.renamed.setdefault(old_name, new_name) != new_name:
            raise TypeError(f"option {old_name!r} is renamed twice: to {table.renamed[old_name]!r} "
                            f"and to {new_name!r} (by {options.__qualname__})")


def _class_table(cls: type) -> _Table:
    table = _class_tables.get(cls)
    if table is None:
        table = _Table()
        for klass in reversed(cls.__mro__):
            declared = vars(klass).get("sockserve_options")
            if declared is not None:
                _add(table, _options_class(declared, _label(klass)), klass, None)
        _class_tables[cls] = table
    return table


def _plugin_label(name: str | None, plugin: object) -> str:
    if name:
        return f"plugin {name!r}"
    if isinstance(plugin, types.ModuleType):
        return f"plugin module {plugin.__name__}"
    return f"plugin {_label(type(plugin))}"


def _table(server_class: type) -> _Table:
    """Every option of *server_class*: its MRO's, its class plugins' and the global plugins'."""
    settle_options(server_class)  # in case nothing did yet
    table = _class_table(server_class)
    plugins: list[tuple[str | None, object]] = [
        (None, p) for p in getattr(server_class, "_sockserve_plugins", ())
    ]
    seen = {id(p) for _, p in plugins}
    plugins += [(n, p) for n, p in get_plugin_manager().list_name_plugin()
                if p is not None and id(p) not in seen]
    with_options_of_plugins = [(n, p) for n, p in plugins
                               if getattr(p, "sockserve_options", None) is not None]
    if not with_options_of_plugins:
        return table
    table = table.copy()
    for name, plugin in with_options_of_plugins:
        label = _plugin_label(name, plugin)
        _add(table, _options_class(plugin, label), None, label)
    return table


def _apply_defaults(owner: type, options: type) -> None:
    """Make each default *options* declares the class attribute of *owner*."""
    own = vars(owner)
    for field in attrs.fields(options):
        name, default = field.name, field.default
        if default is attrs.NOTHING:
            if _info(field).required and name not in own:
                setattr(owner, name, None)  # "not set yet": check_options says so
            continue
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            if default.takes_self:
                raise TypeError(f"option {name!r}: a default factory taking self has no self here")
            default = default.factory()
        if name not in own:
            setattr(owner, name, default)
        elif own[name] != default:
            raise _worded(name, own[name],
                          f"option {name!r} has two defaults: {options.__qualname__}.{name} = "
                          f"{default!r} and {_label(owner)}.{name} = {own[name]!r}; declare it "
                          f"once, in {options.__qualname__}")


def _apply_renamed(klass: type) -> None:
    """A class that sets an option by its old name sets it by the new one (with a warning)."""
    table = _class_table(klass)
    own = vars(klass)
    for old, new in table.renamed.items():
        if old in own and old not in table.declared:
            _warn(f"{klass.__qualname__}.{old}: option {old!r} of "
                  f"{table.declared[new].declarer} is now called {new!r}; set {new!r} instead")
            if new not in own:
                setattr(klass, new, own[old])


def settle_options(cls: _C) -> _C:
    """Settle the options of *cls* and its bases, once each, and check their declarations.

    Each class that declares ``sockserve_options`` gets its options' defaults as class
    attributes; a class setting an option by its old name (``sockserve_renamed``) sets the
    new one. Called by ``declare_options`` and for every server class when it is made; it
    does nothing for a class already settled.

    :returns: *cls*.
    :raises OptionError: one name declared twice differently, or a default declared both
        on the options class and as an attribute of the class declaring it, differently.
    """
    for klass in reversed(cls.__mro__[:-1]):
        if klass in _settled:
            continue
        declared = vars(klass).get("sockserve_options")
        if declared is not None:
            _apply_defaults(klass, _options_class(declared, _label(klass)))
        _apply_renamed(klass)
        _settled.add(klass)
    return cls


def declare_options(options: type) -> Callable[[_C], _C]:
    """Return a class decorator: the class declares *options* and gets their defaults now.

    ::

        @sockserve.declare_options(PoolOptions)
        class ProcessPoolMixIn:
            #: Number of worker processes (the default is PoolOptions').
            workers: int

    The same as ``sockserve_options = PoolOptions`` in the class body, except that the
    defaults are class attributes at once (``ProcessPoolMixIn.workers``), not only once a
    server class is made from it.
    """
    _options_class(options, "declare_options()")

    def apply(cls: _C) -> _C:
        present = vars(cls).get("sockserve_options")
        if present is not None and present is not options:
            raise TypeError(f"{_label(cls)} already declares {present.__qualname__}")
        cls.sockserve_options = options  # type: ignore[attr-defined]
        # Made (and maybe settled by __init_subclass__) before this decorator ran.
        _settled.discard(cls)
        _class_tables.pop(cls, None)
        return settle_options(cls)

    return apply


def option_fields(server_class: type) -> dict[str, tuple[attrs.Attribute[Any], type]]:
    """Return every option of *server_class*: name -> (attrs field, declaring options class).

    Declared by the classes in its MRO, by its class plugins (``compose(plugins=...)``) and
    by the plugins registered for every server (auto-loaded ones included).

    :raises OptionError: one name is declared twice, differently; the message names both.
    """
    return {name: (d.field, d.options) for name, d in _table(server_class).declared.items()}


def declared_option_names(holder: object) -> frozenset[str]:
    """Return the names of the options *holder* declares: a class (its MRO) or a plugin."""
    if isinstance(holder, type):
        return frozenset(_class_table(holder).declared)
    declared = getattr(holder, "sockserve_options", None)
    if isinstance(declared, type) and attrs.has(declared):
        return frozenset(field.name for field in attrs.fields(declared))
    return frozenset()


# --------------------------------------------------------------------------- values


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def parse_option_value(key: str, text: str, tp: Any) -> Any:
    """Convert command-line *text* to the option type *tp* (bool, int, float, str, X | None).

    :raises OptionError: the text is not a value of that type.
    """
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    lowered = text.strip().lower()
    if type(None) in options and lowered in ("none", "null", ""):
        return None
    for option_type in options:
        if option_type is bool:
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
        elif option_type in (int, float, str):
            try:
                return option_type(text.strip())
            except ValueError:
                continue
    expected = " or ".join(_type_name(o) for o in options)
    raise OptionError(key, text, f"expected {expected}")


def _resolve(table: _Table, raw_key: str, given: Mapping[str, str]) -> tuple[str, _Declaration | None]:
    """Return the option *raw_key* names (``-`` read as ``_``; an old name, with a warning).

    :param given: the names resolved so far -> the name they were given as.
    """
    key = raw_key.strip().replace("-", "_")
    declaration = table.declared.get(key)
    if declaration is None and key in table.renamed:
        old, key = key, table.renamed[key]
        declaration = table.declared[key]
        _warn(f"option {old!r} of {declaration.declarer} is now called {key!r}; "
              f"set {key!r} instead")
    if key in given:
        raise _worded(key, None, f"option {key!r} is given twice (as {given[key]!r} and as "
                      f"{raw_key!r}); give it once, as {key!r}")
    return key, declaration


def _from_text(key: str, text: str, declaration: _Declaration) -> Any:
    if declaration.info.python_only:
        raise _worded(key, text, f"option {key!r} (declared by {declaration.declarer}) takes a "
                      "Python object; set it from Python, not as text")
    return parse_option_value(key, text, declaration.tp)


def _required(key: str) -> OptionError:
    return _worded(key, None, f"option {key} is required")


def _check_value(field: attrs.Attribute[Any], key: str, value: Any) -> None:
    """Run *field*'s validator on *value* alone; its error becomes an OptionError naming *key*."""
    if value is None and _info(field).required:
        raise _required(key)
    if field.validator is not None:
        try:
            field.validator(None, field, value)
        except (TypeError, ValueError) as exc:
            # attrs' own validators raise with (message, field, expected, value) as args;
            # str() of that is the tuple's repr. The message is args[0].
            problem = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
            raise OptionError(key, value, problem) from exc


def _run_checks(table: _Table, value_of: Callable[[str], Any], touched: set[str] | None) -> None:
    """Run the checks across fields: those reading a *touched* name, or all when None."""
    classes = {id(d.options): d.options for d in table.declared.values()}
    for options in classes.values():
        for check in _checks(options):
            if touched is not None and touched.isdisjoint(check.names):
                continue
            values = {name: value_of(name) for name in check.names}
            problem = check.problem(values)
            if problem is not None:
                first = next(n for n in check.names if touched is None or n in touched)
                raise _worded(first, values[first], problem)


def with_options(server_class: type, options: Mapping[str, Any], *, from_text: bool = False) -> type:
    """Return a subclass of *server_class* with *options* set, each checked first.

    Each value is checked by its option's validator, a required option may not be set to
    None, and the checks across fields that read a given option run on the result. An
    option's old name (its options class's ``sockserve_renamed``) sets the new one, with a
    DeprecationWarning, where no option has that name.

    :param options: option name -> value (``-`` in names is read as ``_``).
    :param from_text: the values are strings from the command line; convert them to each
        option's declared type (a Python-only option cannot be set so).
    :raises OptionError: an unknown name (the message lists the known ones), a value of
        the wrong type or range (the message names the option and says what is allowed),
        a failed check across fields, or two declarations of one option.
    """
    if not options:
        return server_class
    table = _table(server_class)
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    for raw_key, value in options.items():
        key, declaration = _resolve(table, raw_key, given)
        if declaration is None:
            raise OptionError(key, value, None, known=sorted(table.declared))
        if from_text and isinstance(value, str):
            value = _from_text(key, value, declaration)
        values[key], given[key] = value, raw_key
    for key, value in values.items():  # attrs runs nothing here: each validator is called
        _check_value(table.declared[key].field, key, value)
    _run_checks(table, lambda n: values[n] if n in values else getattr(server_class, n, None),
                set(values))
    namespace = {"__module__": server_class.__module__, "__qualname__": server_class.__qualname__,
                 "__doc__": server_class.__doc__, **values}
    return type(server_class.__name__, (server_class,), namespace)


def check_options(server: object) -> None:
    """Check that *server* (a server, or its class) is complete: required options set,
    checks across fields passing.

    For ``BaseServer.__init__``, before anything is bound. Values are not checked one by
    one here: a subclass written for the standard module may set ``allow_reuse_address =
    1``, and that keeps working.

    :raises OptionError: ``option certfile is required``, or a failed check's message.
    """
    table = _table(server if isinstance(server, type) else type(server))
    for name, declaration in table.declared.items():
        if declaration.info.required and getattr(server, name, None) is None:
            raise _required(name)
    _run_checks(table, lambda n: getattr(server, n, None), None)


def read_options(server: object, options: type[T]) -> T:
    """Return an instance of the attrs class *options* holding *server*'s values of them.

    For a plugin reading its own options (its ``sockserve_options``): the value set on the
    server class (``with_options``, ``--option``), else the field's default. Read them
    once, at ``sockserve_server_activate``, and keep the result with ``plugin_state``.

    :raises OptionError: an option without a default is not set, or a value is not allowed.
    """
    values: dict[str, Any] = {}
    for field in attrs.fields(typing.cast(Any, options)):
        if not field.init:
            continue
        value = getattr(server, field.name, attrs.NOTHING)
        if value is attrs.NOTHING or (value is None and _info(field).required):
            if field.default is attrs.NOTHING:
                raise _required(field.name)
            continue  # the field's default
        _check_value(field, field.name, value)
        values[field.name] = value
    return options(**values)


def parse_command_line_options(
    server_class: type, texts: Iterable[str], *, unknown_hint: Callable[[str], str | None] | None = None
) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` texts from the command line into option values, by option name.

    Give the result to ``with_options``, which checks the values. Python-only options are
    refused, and left out of the known options an unknown name lists.

    :param unknown_hint: called with an unknown name; what it returns (which installed
        plugin declares that option, say) replaces the list of known options.
    :raises OptionError: no ``=`` in a text, an unknown or Python-only option, or text
        that is not of the option's type.
    """
    table = _table(server_class)
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    for item in texts:
        raw_key, sep, raw = item.partition("=")
        if not sep or not raw_key.strip():
            raise _worded(item, None, f"option {item!r}: expected KEY=VALUE")
        key, declaration = _resolve(table, raw_key, given)
        if declaration is None:
            known = sorted(n for n, d in table.declared.items() if not d.info.python_only)
            hint = unknown_hint(key) if unknown_hint is not None else None
            raise _worded(key, raw, f"unknown option {key!r} for {server_class.__name__}; "
                          + (hint or f"known options: {', '.join(known) or '(none)'}"), known)
        values[key], given[key] = _from_text(key, raw, declaration), raw_key
    return values
