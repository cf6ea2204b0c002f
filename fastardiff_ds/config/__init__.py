"""Config tree, presets and overrides. `resolve_config` (resolve.py) is the one entry point launchers use."""
from __future__ import annotations

from .checks import ConfigError
from .overrides import dotted_keys, save_config, to_dict, update_from_dict
from .presets import PRESETS
from .resolve import apply_overrides, get_preset, load_file, resolve_config
from .rules import reset_derived
from .schema import ARConfig, Config, DraftConfig, HeadConfig, ImageConfig, ModelConfig, TextConfig

__all__ = [
    "ARConfig", "Config", "ConfigError", "DraftConfig", "HeadConfig", "ImageConfig", "ModelConfig", "PRESETS",
    "TextConfig", "apply_overrides", "dotted_keys", "get_preset", "load_file", "reset_derived", "resolve_config",
    "save_config", "to_dict", "update_from_dict",
]
