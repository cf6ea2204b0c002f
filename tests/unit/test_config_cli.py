"""Every config field type parses from the command line; Optional fields are found by walking the tree."""
from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Literal, Optional

import pytest

from fastardiff_ds.config import ConfigError, apply_overrides, get_preset, resolve_config
from fastardiff_ds.config.checks import leaves
from fastardiff_ds.config.overrides import parse_value
from fastardiff_ds.config.rules import DERIVED

SAMPLES = {int: ("200", 200), float: ("0.25", 0.25), str: ("abc", "abc"), bool: ("true", True)}


def optional_inner(typ):
    if typing.get_origin(typ) in (typing.Union, types.UnionType) and type(None) in typing.get_args(typ):
        return [a for a in typing.get_args(typ) if a is not type(None)][0]
    return None


def cli_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(cli_text(v) for v in value)
    return str(value)


CFG = get_preset("tiny")
OPTIONAL = [(k, optional_inner(t)) for k, t, _ in leaves(CFG) if optional_inner(t) is not None]


def test_the_tree_has_optional_fields():
    assert {"data.samples_per_epoch", "inference.tau"} <= {k for k, _ in OPTIONAL}


@pytest.mark.parametrize("key,inner", OPTIONAL, ids=[k for k, _ in OPTIONAL])
def test_every_optional_field_parses(key, inner):
    # data.resolution must equal model.image.resolution; train.entropy_align_layer must be a layer of the target;
    # model.student_head.* may only grow the teacher head
    text, want = {"data.resolution": ("32", 32), "train.entropy_align_layer": ("2", 2),
                  "model.student_head.mlp_ratio": ("2.5", 2.5)}.get(key, SAMPLES[inner])
    cfg = apply_overrides(get_preset("tiny"), [f"{key}={text}"])
    section, leaf = key.rsplit(".", 1) if "." in key else ("", key)
    obj = cfg
    for part in filter(None, section.split(".")):
        obj = getattr(obj, part)
    assert getattr(obj, leaf) == want and type(getattr(obj, leaf)) is inner
    for none in ("none", "null", "None"):  # a derived key given no value follows its source again
        apply_overrides(cfg, [f"{key}={none}"])
        assert getattr(obj, leaf) == (DERIVED[key](cfg) if key in DERIVED else None)
    if inner is not str:
        with pytest.raises(ConfigError, match=rf"'{key}' expects {inner.__name__} \| None, got 'x1y'"):
            apply_overrides(get_preset("tiny"), [f"{key}=x1y"])


@pytest.mark.parametrize("key,typ,value", list(leaves(CFG)), ids=[k for k, _, _ in leaves(CFG)])
def test_every_field_round_trips_through_its_cli_text(key, typ, value):
    assert parse_value(cli_text(value), typ, key) == value


def test_samples_per_epoch_from_the_cli_is_an_int_and_validated():
    cfg = resolve_config("tiny", overrides=["data.samples_per_epoch=200", "data.resampled=true"])
    assert cfg.data.samples_per_epoch == 200 and cfg.data.samples_per_epoch // 3 == 66
    with pytest.raises(ConfigError, match="'data.samples_per_epoch' must be >= 1; got 0"):
        resolve_config("tiny", overrides=["data.samples_per_epoch=0"])
    with pytest.raises(ConfigError, match="'data.kind' must be one of 'pixels', 'latents'; got 'jpeg'"):
        resolve_config("tiny", overrides=["data.kind=jpeg"])
    with pytest.raises(ConfigError, match=r"'train.betas' expects tuple\[float, float\], got '0.9'"):
        resolve_config("tiny", overrides=["train.betas=0.9"])
    assert resolve_config("tiny", overrides=["train.betas=[0.8, 0.99]"]).train.betas == (0.8, 0.99)
    assert resolve_config("tiny", overrides=["pretrain.steps=1e3"]).pretrain.steps == 1000
    with pytest.raises(ConfigError, match="expects int, got '1.5'"):
        resolve_config("tiny", overrides=["pretrain.steps=1.5"])


def test_file_values_given_as_strings_are_parsed(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  samples_per_epoch: '200'\ninference:\n  tau: none\n")
    cfg = resolve_config("tiny", config_file=str(tmp_path / "c.yaml"))
    assert cfg.data.samples_per_epoch == 200 and cfg.inference.tau is None


class Mode(enum.Enum):
    FAST = "fast"
    EXACT = "exact"


@dataclasses.dataclass
class Every:
    a: Optional[int] = None
    b: Optional[float] = None
    c: Optional[str] = None
    d: bool = False
    e: Literal["x", "y"] = "x"
    f: Mode = Mode.FAST
    g: list[int] = dataclasses.field(default_factory=list)
    h: tuple[str, ...] = ()
    i: Optional[tuple[int, int]] = None
    j: int | str = 0


@pytest.mark.parametrize("key,raw,want", [
    ("a", "3", 3), ("a", "null", None), ("b", "1e-3", 1e-3), ("b", "none", None), ("c", "hello", "hello"),
    ("c", "none", None), ("d", "off", False), ("d", "YES", True), ("e", "y", "y"), ("f", "exact", Mode.EXACT),
    ("f", "FAST", Mode.FAST), ("g", "1,2,3", [1, 2, 3]), ("g", "[4, 5]", [4, 5]), ("h", "p,q", ("p", "q")),
    ("i", "1,2", (1, 2)), ("i", "none", None), ("j", "7", 7), ("j", "seven", "seven"),
])
def test_every_type_parses(key, raw, want):
    cfg = apply_overrides(Every(), [f"{key}={raw}"])
    assert getattr(cfg, key) == want and type(getattr(cfg, key)) is type(want)


@pytest.mark.parametrize("key,raw,expect", [
    ("a", "three", "int | None"), ("b", "fast", "float | None"), ("d", "maybe", "bool"),
    ("e", "z", "one of 'x', 'y'"), ("f", "slow", "Mode"), ("g", "1,x", "int"), ("i", "1,2,3", "tuple[int, int]"),
])
def test_a_bad_value_names_key_type_and_value(key, raw, expect):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Every(), [f"{key}={raw}"])
    msg = str(err.value)
    assert f"'{key}'" in msg and expect in msg and raw.split(",")[-1] in msg
