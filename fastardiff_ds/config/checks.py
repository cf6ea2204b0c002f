"""Per-key checks over the whole config tree: every leaf has its declared type, every enum (Literal) key one of
its values, every numeric key its range (ranges.RANGES). Errors name the dotted key, the valid values and the value.

Values from the CLI are already parsed to the declared type (overrides.parse_value); these checks also catch what
a JSON/YAML file or Python code put there (a float in an int key, a misspelt mode, a list of the wrong length).
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from typing import Any, Iterator

from .ranges import RANGES


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and the fix."""


def leaves(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, declared type, value) of every leaf of a dataclass tree."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints.get(f.name, type(value)), value


def choices_error(key: str, choices: tuple, value: Any) -> ConfigError:
    """`config key 'train.on_nonfinite' must be one of 'stop', 'skip'; got 'skp' (did you mean 'skip'?)`."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"config key '{key}' must be one of {', '.join(repr(c) for c in choices)}; "
                       f"got {value!r}{hint}")


def is_union(origin: Any) -> bool:
    """Whether a type's origin is a union (`X | Y`, `Optional[X]`)."""
    return origin is typing.Union or origin is types.UnionType


def type_name(typ: Any) -> str:
    """Readable name of a field type: `int`, `int | None`, `tuple[float, float]`, `Literal['a', 'b']`."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if typ is type(None):
        return "None"
    if typ is Ellipsis:
        return "..."
    if is_union(origin):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is not None and args:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(type_name(a) for a in args)}]"
    return getattr(typ, "__name__", str(typ))


def matches(value: Any, typ: Any) -> bool:
    """Whether `value` is an instance of the declared field type (an int is a float; a bool is not an int)."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if typ is Any:
        return True
    if typ is type(None):
        return value is None
    if is_union(origin):
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == c and type(value) is type(c) for c in args)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if args and args[-1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
    if origin in (list, dict):
        return isinstance(value, origin)
    if isinstance(typ, type):
        return isinstance(value, typ)
    return True


def _literal_of(typ: Any) -> tuple | None:
    """The choices of `Literal[...]` or `Literal[...] | None` (None excluded), else None."""
    if typing.get_origin(typ) is typing.Literal:
        return typing.get_args(typ)
    literals = [a for a in typing.get_args(typ) if typing.get_origin(a) is typing.Literal]
    return typing.get_args(literals[0]) if literals else None


def check_types(cfg: Any) -> None:
    """Refuse a leaf whose value does not have the declared type (enum keys: one of the choices)."""
    for key, typ, value in leaves(cfg):
        if matches(value, typ):
            continue
        choices = _literal_of(typ)
        if choices is not None:
            raise choices_error(key, choices, value)
        if isinstance(typ, type) and issubclass(typ, enum.Enum):
            raise choices_error(key, tuple(m.name for m in typ), value)
        raise ConfigError(f"config key '{key}' expects {type_name(typ)}, got {value!r} ({type(value).__name__})")


def check_ranges(cfg: Any) -> None:
    """Refuse a numeric leaf outside its range in ranges.RANGES (tuples: every item)."""
    values = {key: value for key, _, value in leaves(cfg)}
    for key, rng in RANGES.items():
        if key not in values:
            continue  # a table entry for a key this tree does not have (checked by the tests)
        value = values[key]
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if item is not None and not rng.ok(item):
                shown = f"{value!r} (item {item!r})" if isinstance(value, tuple) else repr(value)
                raise ConfigError(f"config key '{key}' must be {rng}; got {shown}")
