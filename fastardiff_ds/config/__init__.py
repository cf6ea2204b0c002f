"""Config tree, presets and overrides. `resolve_config` is the one entry point launchers use."""
from __future__ import annotations

from .overrides import ConfigError, apply_overrides, dotted_keys, load_file, save_config, to_dict, update_from_dict
from .presets import PRESETS, get_preset
from .rules import reset_derived
from .schema import ARConfig, Config, DraftConfig, HeadConfig, ImageConfig, ModelConfig, TextConfig


def resolve_config(preset: str = "tiny", config_file: str | None = None, overrides: list[str] | None = None) -> Config:
    """Preset defaults -> config file -> dotted CLI overrides, in that order; then validated (overrides.validate):
    a bad value raises ConfigError naming the key before anything is built or read."""
    cfg = get_preset(preset)
    if config_file:
        load_file(cfg, config_file)
    apply_overrides(cfg, overrides or [])
    return cfg


__all__ = [
    "ARConfig", "Config", "ConfigError", "DraftConfig", "HeadConfig", "ImageConfig", "ModelConfig", "PRESETS",
    "TextConfig", "apply_overrides", "dotted_keys", "get_preset", "load_file", "reset_derived", "resolve_config",
    "save_config", "to_dict", "update_from_dict",
]
