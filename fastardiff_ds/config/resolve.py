"""The top of the config package: preset defaults -> config file -> dotted CLI overrides, then every check.

Layers, bottom to top: `schema` (the dataclasses) and `ranges` (numeric ranges) -> `checks` (per-key types and
ranges) -> `overrides` (parse and set keys, merge dicts) and `rules` (derived keys, cross-field rules) and `presets`
(the named factories) -> this module, the only one that knows them all. `resolve_config` is the entry point
launchers use (re-exported by `fastardiff_ds.config`).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any

from .checks import ConfigError, check_ranges, check_types
from .overrides import set_key, update_from_dict
from .presets import PRESETS
from .rules import reset_derived, resolve
from .schema import Config


def validate(cfg: Any, prefix: str = "") -> Any:
    """Check a config tree, in this order: every key's type and enum values (checks.check_types), every numeric
    key's range (ranges.RANGES), every section's `__post_init__` (overrides are set after construction), then, for
    the root Config, its derived values and cross-field rules (rules.resolve). Every error is a ConfigError naming
    the key."""
    if not prefix:
        check_types(cfg)
        check_ranges(cfg)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")
    check = getattr(cfg, "__post_init__", None)
    if check is not None:
        try:
            check()
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config section '{prefix.rstrip('.') or 'root'}': {e}") from None
    if not prefix and isinstance(cfg, Config):
        resolve(cfg, PRESETS)
    return cfg


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply `key=value` strings in order (later wins), then validate."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        set_key(cfg, key.strip(), raw.strip())
    return validate(cfg)


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
    update_from_dict(cfg, data)
    if isinstance(cfg, Config):  # a resolved config.json holds derived values: they follow their source again
        reset_derived(cfg)
    return cfg


def get_preset(name: str) -> Config:
    """A fresh, validated config for a named preset (derived keys filled); an unknown name lists the valid ones."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.0)
        raise KeyError(f"unknown preset '{name}'. Did you mean '{close[0]}'? Valid presets: {', '.join(PRESETS)}")
    return validate(PRESETS[name]())


def resolve_config(preset: str = "tiny", config_file: str | None = None, overrides: list[str] | None = None) -> Config:
    """Preset defaults -> config file -> dotted CLI overrides, in that order; then validated (`validate`):
    a bad value raises ConfigError naming the key before anything is built or read."""
    cfg = get_preset(preset)
    if config_file:
        load_file(cfg, config_file)
    apply_overrides(cfg, overrides or [])
    return cfg
