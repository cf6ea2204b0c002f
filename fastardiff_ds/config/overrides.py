"""Dotted overrides (`train.lr=1e-4`), strict dict round trips and the resolved-config file.

An unknown key is an error that names the closest valid key, so a typo never silently trains the default.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and the fix."""


def dotted_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every leaf key of a dataclass tree as `a.b.c`."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = f"{prefix}{f.name}"
        keys.extend(dotted_keys(value, name + ".") if dataclasses.is_dataclass(value) else [name])
    return keys


def _unknown(key: str, cfg: Any, prefix: str = "") -> ConfigError:
    valid = [prefix + k for k in dotted_keys(cfg)]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Run with --print-config to list valid keys.")


def _field_type(obj: Any, name: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    return hints.get(name, type(getattr(obj, name)))


def parse_value(raw: str, typ: Any, key: str) -> Any:
    """Parse a CLI string into the field's declared type."""
    origin = typing.get_origin(typ)
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if origin is typing.Union or origin is types.UnionType:  # Optional[X] and X | None
        if raw.lower() in ("none", "null"):
            return None
        return parse_value(raw, args[0], key)
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ is int:
            return int(float(raw)) if "e" in raw.lower() else int(raw)
        if typ is float:
            return float(raw)
        if origin in (list, tuple) or typ in (list, tuple):
            items = json.loads(raw) if raw.startswith("[") else [s for s in raw.split(",") if s]
            inner = args[0] if args else str
            items = [parse_value(str(i), inner, key) for i in items]
            return tuple(items) if (origin is tuple or typ is tuple) else items
        if typ is dict or origin is dict:
            return json.loads(raw)
    except (ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"config key '{key}' expects {getattr(typ, '__name__', typ)}, got '{raw}'") from e
    return raw


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


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply `key=value` strings in order (later wins)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        set_key(cfg, key.strip(), raw.strip())
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def update_from_dict(cfg: Any, data: dict, prefix: str = "") -> Any:
    """Strictly merge a nested dict (from a file or a checkpoint) into a dataclass tree."""
    for name, value in data.items():
        key = f"{prefix}{name}"
        if not dataclasses.is_dataclass(cfg) or name not in {f.name for f in dataclasses.fields(cfg)}:
            raise _unknown(key, cfg, prefix)
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {value!r}")
            update_from_dict(current, value, key + ".")
        else:
            typ = _field_type(cfg, name)
            if isinstance(value, list) and (typ is tuple or typing.get_origin(typ) is tuple):
                value = tuple(value)
            setattr(cfg, name, value)
    return cfg


def load_file(cfg: Any, path: str | Path) -> Any:
    """Merge a JSON or YAML config file into `cfg`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass an existing .json/.yaml path")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    return update_from_dict(cfg, data)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as JSON (the run directory's `config.json`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=False) + "\n")
    return path
