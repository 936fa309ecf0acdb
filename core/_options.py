"""Options: typed, validated server settings declared by the classes and plugins that use them.

An option is a class attribute of the server class (``daemon_threads``, ``max_children``,
``workers``), so code written for the standard module that sets them in a subclass keeps
working unchanged. What this module adds is a declaration of each option's type and valid
values, as an attrs class named by the declaring class's ``sockserve_options`` attribute,
and ``with_options`` / ``compose(options=...)`` / ``sockserve serve --option KEY=VALUE``,
which check a value against that declaration before building the server class.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any

import attrs

from ._errors import OptionError

__all__ = [
    "option_fields",
    "with_options",
    "parse_option_value",
    "non_negative",
    "positive",
    "flag",
    "count",
    "seconds",
]


def non_negative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator: a number >= 0 (None passes; combine with a type check)."""
    if value is not None and value < 0:
        raise ValueError(f"'{attribute.name}' must be >= 0 (got {value!r})")


def positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator: a number > 0 (None passes; combine with a type check)."""
    if value is not None and value <= 0:
        raise ValueError(f"'{attribute.name}' must be > 0 (got {value!r})")


def flag() -> Any:
    """An option field holding a bool."""
    return attrs.field(validator=attrs.validators.instance_of(bool))


def count(minimum: int = 0, *, optional: bool = False) -> Any:
    """An option field holding an int >= *minimum* (or None when *optional*)."""

    def at_least(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or value < minimum:
            raise ValueError(f"'{attribute.name}' must be an int >= {minimum} (got {value!r})")

    check = attrs.validators.and_(attrs.validators.instance_of(int), at_least)
    return attrs.field(validator=attrs.validators.optional(check) if optional else check)


def seconds(*, optional: bool = True) -> Any:
    """An option field holding a duration in seconds >= 0 (or None when *optional*)."""
    check = attrs.validators.and_(attrs.validators.instance_of((int, float)), non_negative)
    return attrs.field(validator=attrs.validators.optional(check) if optional else check)


def _declarations(server_class: type) -> list[type]:
    found: list[type] = []
    for klass in reversed(server_class.__mro__):
        declared = vars(klass).get("sockserve_options")
        if declared is not None and declared not in found:
            found.append(declared)
    for plugin in getattr(server_class, "_sockserve_plugins", ()):
        declared = getattr(plugin, "sockserve_options", None)
        if declared is not None and declared not in found:
            found.append(declared)
    return found


def option_fields(server_class: type) -> dict[str, tuple[attrs.Attribute, type]]:
    """Return every option of *server_class*: name -> (attrs field, declaring options class).

    Later declarations (subclasses, mixins earlier in the MRO, class plugins) win.
    """
    fields: dict[str, tuple[attrs.Attribute, type]] = {}
    for declared in _declarations(server_class):
        attrs.resolve_types(declared)
        for field in attrs.fields(declared):
            fields[field.name] = (field, declared)
    return fields


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
    for option in options:
        if option is bool:
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
        elif option in (int, float, str):
            try:
                return option(text.strip())
            except ValueError:
                continue
    expected = " or ".join(_type_name(o) for o in options)
    raise OptionError(key, text, f"expected {expected}")


def with_options(server_class: type, options: Mapping[str, Any], *, from_text: bool = False) -> type:
    """Return a subclass of *server_class* with *options* set, each checked first.

    :param options: option name -> value (``-`` in names is read as ``_``).
    :param from_text: the values are strings from the command line; convert them to each
        option's declared type.
    :raises OptionError: an unknown name (the message lists the known ones) or a value of
        the wrong type or range (the message names the option and says what is allowed).
    """
    if not options:
        return server_class
    known = option_fields(server_class)
    values: dict[str, Any] = {}
    for raw_key, value in options.items():
        key = raw_key.replace("-", "_")
        if key not in known:
            raise OptionError(key, value, None, known=sorted(known))
        field, _ = known[key]
        if from_text and isinstance(value, str):
            value = parse_option_value(key, value, field.type)
        values[key] = value
    # attrs runs nothing here: each declared validator is called on the new value alone.
    for key, value in values.items():
        field, _ = known[key]
        if field.validator is not None:
            try:
                field.validator(None, field, value)
            except (TypeError, ValueError) as exc:
                # attrs' own validators raise with (message, field, expected, value) as
                # args; str() of that is the tuple's repr. The message is args[0].
                problem = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
                raise OptionError(key, value, problem) from exc
    namespace = {"__module__": server_class.__module__, "__qualname__": server_class.__qualname__,
                 "__doc__": server_class.__doc__, **values}
    return type(server_class.__name__, (server_class,), namespace)
