"""Dotted overrides (`train.lr=1e-4`), strict dict round trips and the resolved-config file, for any dataclass tree.

An unknown key is an error that names the closest valid key, so a typo never silently trains the default. Checking
the result (types, ranges, rules) is `resolve.validate`'s: this module knows nothing of presets or rules.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import typing
from pathlib import Path
from typing import Any

from .checks import ConfigError, choices_error, is_union, type_name


def dotted_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every leaf key of a dataclass tree as `a.b.c`."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = f"{prefix}{f.name}"
        keys.extend(dotted_keys(value, name + ".") if dataclasses.is_dataclass(value) else [name])
    return keys


# keys that no longer exist, with why: config files and checkpoints that still hold them load without them
RETIRED = {"model.head.guidance_embed": "the student head always has the guidance embedding and the teacher none"}


def _unknown(key: str, cfg: Any, prefix: str = "") -> ConfigError:
    if key in RETIRED:
        return ConfigError(f"config key '{key}' was removed: {RETIRED[key]}")
    valid = [prefix + k for k in dotted_keys(cfg)]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Run with --print-config to list valid keys.")


def _field_type(obj: Any, name: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    return hints.get(name, type(getattr(obj, name)))


_NONE = ("none", "null")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse_items(raw: str, typ: Any, key: str) -> list | tuple:
    """A list/tuple from JSON (`[1, 2]`) or comma-separated text (`1,2`); items parsed to the inner type."""
    origin, args = typing.get_origin(typ) or typ, typing.get_args(typ)
    items = json.loads(raw) if raw.startswith("[") else [s.strip() for s in raw.split(",") if s.strip()]
    if not isinstance(items, list):
        raise ValueError(raw)
    if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length: tuple[float, float]
        if len(items) != len(args):
            raise ValueError(f"{len(items)} items, expected {len(args)}")
        return tuple(parse_value(str(i), a, key) for i, a in zip(items, args))
    inner = args[0] if args else str
    parsed = [parse_value(i if isinstance(i, str) else json.dumps(i), inner, key) for i in items]
    return tuple(parsed) if origin is tuple else parsed


def _parse_scalar(raw: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is bool:
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise ValueError(raw)
    if typ is int:
        value = float(raw) if "e" in raw.lower() and not raw.lower().startswith("0x") else None
        if value is not None:  # 1e4 is a common way to write 10000; 1.5e0 is not an int
            if not value.is_integer():
                raise ValueError(raw)
            return int(value)
        return int(raw)
    if typ is float:
        return float(raw)
    if typ is str or typ is Any:
        return raw
    if origin is typing.Literal:
        for choice in typing.get_args(typ):
            if str(choice) == raw or (not isinstance(choice, str) and _try(raw, type(choice), key) == choice):
                return choice
        raise ValueError(raw)
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        for member in typ:
            if raw in (member.name, str(member.value)) or raw.lower() == member.name.lower():
                return member
        raise ValueError(raw)
    if origin in (list, tuple) or typ in (list, tuple):
        return _parse_items(raw, typ, key)
    if typ is dict or origin is dict:
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise ValueError(raw)
        return value
    raise TypeError("this type cannot be set from the command line; set it in a --config file")


def _try(raw: str, typ: Any, key: str) -> Any:
    try:
        return _parse_scalar(raw, typ, key)
    except (ValueError, TypeError, json.JSONDecodeError, ConfigError):
        return _FAIL


_FAIL = object()


def parse_value(raw: str, typ: Any, key: str) -> Any:
    """Parse a CLI string into the field's declared type.

    Handles str, int (also `1e4`), float, bool (true/false/yes/no/on/off/1/0), `X | None` / Optional[X]
    ("none" or "null" -> None), other unions (first member that parses), Literal, Enum (name or value),
    list[X] / tuple[X, ...] / tuple[X, Y] (JSON `[..]` or `a,b`) and dict (JSON). A value that does not parse
    raises ConfigError naming the key, the expected type and the value.
    """
    origin = typing.get_origin(typ)
    if is_union(origin):
        members = [a for a in typing.get_args(typ) if a is not type(None)]
        if type(None) in typing.get_args(typ) and raw.strip().lower() in _NONE:
            return None
        for member in members:  # str last: "3" for `int | str` is the int 3
            if member is not str and (value := _try(raw, member, key)) is not _FAIL:
                return value
        if str in members:
            return raw
        raise ConfigError(f"config key '{key}' expects {type_name(typ)}, got {raw!r}"
                          + (" (use 'none' for no value)" if type(None) in typing.get_args(typ) else ""))
    try:
        return _parse_scalar(raw, typ, key)
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        if origin is typing.Literal:
            raise choices_error(key, typing.get_args(typ), raw) from None
        detail = f": {e}" if str(e) and str(e) != raw else ""
        raise ConfigError(f"config key '{key}' expects {type_name(typ)}, got {raw!r}{detail}") from None


def set_key(cfg: Any, key: str, raw: Any) -> None:
    """Set `a.b.c` on a dataclass tree; raw strings are parsed to the field type."""
    obj, parts = cfg, key.split(".")
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise _unknown(key, cfg)
        obj = getattr(obj, part)
    leaf = parts[-1]
    if not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)}:
        raise _unknown(key, cfg)
    if dataclasses.is_dataclass(getattr(obj, leaf)):
        raise ConfigError(f"config key '{key}' is a section; set one of its fields, e.g. '{key}.<field>=...'")
    value = parse_value(raw, _field_type(obj, leaf), key) if isinstance(raw, str) else raw
    setattr(obj, leaf, value)
    mark_explicit(cfg, key)


def mark_explicit(root: Any, key: str) -> None:
    """`key` was set by the user: a derived key (rules.DERIVED) keeps this value instead of being recomputed."""
    derived = getattr(root, "_derived_keys", None)
    if derived is not None:
        derived.discard(key)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def update_from_dict(cfg: Any, data: dict, prefix: str = "", root: Any = None) -> Any:
    """Strictly merge a nested dict (from a file or a checkpoint) into a dataclass tree."""
    root = cfg if root is None else root
    for name, value in data.items():
        key = f"{prefix}{name}"
        if key in RETIRED:
            continue
        if not dataclasses.is_dataclass(cfg) or name not in {f.name for f in dataclasses.fields(cfg)}:
            raise _unknown(key, cfg, prefix)
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {value!r}")
            update_from_dict(current, value, key + ".", root)
        else:
            typ = _field_type(cfg, name)
            if isinstance(value, str) and typ is not str:  # '200' or 'none' in a YAML file: parse like the CLI
                value = parse_value(value, typ, key)
            if isinstance(value, list) and (typ is tuple or typing.get_origin(typ) is tuple):
                value = tuple(value)
            setattr(cfg, name, value)
            mark_explicit(root, key)
    return cfg


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as JSON (the run directory's `config.json`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=False) + "\n")
    return path
