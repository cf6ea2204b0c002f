"""The validated config: every enum key refuses a value outside its choices (naming the key and every choice),
every numeric key its range, cross-field rules, derived keys, and a bad value stops a launcher before any work."""
from __future__ import annotations

import json
import re
import sys
import typing
from pathlib import Path

import pytest

from fastardiff_ds.config import ConfigError, apply_overrides, get_preset, resolve_config
from fastardiff_ds.config.checks import check_ranges, leaves
from fastardiff_ds.config.resolve import validate
from fastardiff_ds.config.ranges import BY_RULE, RANGES, UNBOUNDED

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from nextstep_official import write_tokenizer  # noqa: E402

CFG = get_preset("tiny")
ENUMS = [(k, typing.get_args(t)) for k, t, _ in leaves(CFG) if typing.get_origin(t) is typing.Literal]


def test_the_issue_examples_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"'train.on_nonfinite' must be one of 'stop', 'skip'; got 'skp' "
                                          r"\(did you mean 'skip'\?\)"):
        resolve_config("tiny", overrides=["train.on_nonfinite=skp"])
    with pytest.raises(ConfigError, match=r"'train.gen_every' must be >= 1; got 0"):
        resolve_config("tiny", overrides=["train.gen_every=0"])
    suffix = re.escape("`<|image_area|>8*8<|begin_of_image|>`")
    with pytest.raises(ConfigError, match=rf"data.max_text_len=38 would cut the prompt suffix {suffix}.*"
                                          r"model.text.max_length=32.*>= 39"):
        resolve_config("tiny", overrides=["data.max_text_len=38"])
    with pytest.raises(ConfigError, match="'model.dtype' must be one of 'float32', 'bfloat16', 'float16'; got 'fp8'"):
        resolve_config("tiny", overrides=["model.dtype=fp8"])


def test_every_mode_key_is_an_enum():
    assert {k for k, _ in ENUMS} >= {
        "train.on_nonfinite", "train.alpha_kind", "train.alpha_mode", "inference.sampler", "inference.cfg_schedule", "inference.accept",
        "inference.draft_policy", "inference.compile_mode", "data.kind", "data.interpolation",
        "model.image.tokenizer", "model.text.tokenizer", "model.text.prompt_style", "model.dtype", "wandb.mode"}
    free_text = {k for k, t, _ in leaves(CFG) if t is str}  # every str key left is a path, a name or a prompt
    assert free_text == {"preset", "run_dir", "model.image.vae_path", "model.text.path", "data.shards",
                         "wandb.project", "wandb.entity", "wandb.group", "inference.positive_prompt",
                         "inference.negative_prompt", "train.teacher", "train.ds_config", "train.export_dir",
                         "pretrain.ds_config", "pretrain.init"}


def test_enum_choices_are_the_subsystems_own():
    from fastardiff_ds.models.text_tokenizer import PROMPT_STYLES
    from fastardiff_ds.models.weights import DTYPES
    from fastardiff_ds.sampling.compiled import COMPILE_MODES
    from fastardiff_ds.sampling.draft_policy import POLICIES
    from fastardiff_ds.sampling.flow import KINDS
    from fastardiff_ds.sampling.guidance import SCHEDULES
    from fastardiff_ds.sampling.speculative import ACCEPT_RULES
    from fastardiff_ds.schedules.alpha import ALPHA_KINDS, ALPHA_MODES

    enums = dict(ENUMS)
    assert enums["train.alpha_mode"] == ALPHA_MODES
    assert enums["train.alpha_kind"] == ALPHA_KINDS and enums["inference.cfg_schedule"] == SCHEDULES
    assert enums["inference.compile_mode"] == COMPILE_MODES and enums["inference.accept"] == ACCEPT_RULES
    assert enums["inference.draft_policy"] == POLICIES and enums["model.text.prompt_style"] == PROMPT_STYLES
    assert set(enums["inference.sampler"]) == set(KINDS) - {"consistency"}  # the student's chain is not a choice
    assert set(enums["model.dtype"]) <= set(DTYPES)


@pytest.mark.parametrize("key,choices", ENUMS, ids=[k for k, _ in ENUMS])
def test_every_enum_key_refuses_a_bad_value_everywhere(key, choices, tmp_path):
    want = re.escape(f"'{key}' must be one of {', '.join(repr(c) for c in choices)}; got 'bogus'")
    with pytest.raises(ConfigError, match=want):  # from the command line
        resolve_config("tiny", overrides=[f"{key}=bogus"])
    section, leaf = key.rsplit(".", 1) if "." in key else ("", key)
    nested = {leaf: "bogus"}
    for part in reversed(section.split(".")):
        nested = {part: nested}
    (tmp_path / "c.json").write_text(json.dumps(nested))
    with pytest.raises(ConfigError, match=want):  # from a config file
        resolve_config("tiny", config_file=str(tmp_path / "c.json"))
    cfg = get_preset("tiny")
    obj = cfg
    for part in section.split("."):
        obj = getattr(obj, part)
    setattr(obj, leaf, "bogus")
    with pytest.raises(ConfigError, match=want):  # from Python code
        validate(cfg)
    for choice in choices:  # every choice passes the per-key checks
        setattr(obj, leaf, choice)
        check_ranges(cfg)


def _numeric(typ) -> bool:
    args = [a for a in typing.get_args(typ) if a is not type(None) and a is not Ellipsis] or [typ]
    return any(a in (int, float) for a in args)


def test_every_numeric_key_has_a_range_or_is_declared_unbounded():
    numeric = {k for k, t, _ in leaves(CFG) if _numeric(t)}
    assert numeric - set(RANGES) - UNBOUNDED - BY_RULE == set()
    assert set(RANGES) | UNBOUNDED | BY_RULE <= numeric  # no stale table entries


def _outside(rng, integer: bool):
    """A value just outside the range (below it when it has a lower bound)."""
    if rng.lo is not None:
        return rng.lo if rng.lo_open else rng.lo - (1 if integer else 0.5)
    return rng.hi if rng.hi_open else rng.hi + 1


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_range_refuses_the_value_just_outside(key):
    typ = dict((k, t) for k, t, _ in leaves(CFG))[key]
    integer = int in typing.get_args(typ) or typ is int
    bad = _outside(RANGES[key], integer)
    value = dict((k, v) for k, _, v in leaves(CFG))[key]
    text = ",".join([str(bad)] * len(value)) if isinstance(value, tuple) else str(bad)
    with pytest.raises(ConfigError, match=re.escape(f"'{key}' must be {RANGES[key]}; got ")):
        resolve_config("tiny", overrides=[f"{key}={text}"])


def test_nan_and_wrong_types_from_a_file_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="'train.lr_draft' must be > 0; got nan"):
        resolve_config("tiny", overrides=["train.lr_draft=nan"])
    for data, msg in [({"train": {"steps": 10.5}}, r"'train.steps' expects int, got 10.5"),
                      ({"train": {"betas": [0.9]}}, r"'train.betas' expects tuple\[float, float\], got \(0.9,\)"),
                      ({"data": {"batch_size": True}}, r"'data.batch_size' expects int, got True"),
                      ({"train": {"betas": [0.9, 1.0]}}, r"'train.betas' must be in \[0, 1\); got \(0.9, 1.0\)")]:
        (tmp_path / "c.json").write_text(json.dumps(data))
        with pytest.raises(ConfigError, match=msg):
            resolve_config("tiny", config_file=str(tmp_path / "c.json"))


@pytest.mark.parametrize("overrides,msg", [
    (["model.image.resolution=30"], r"model.image.resolution=30 is not a multiple of 4 \(model.image.patch_size=4\)"),
    (["model.image.tokenizer=vae", "model.image.resolution=48"], r"not a multiple of 32 .*vae_downsample=8"),
    (["model.image.channels=16"], r"model.image.channels=16 with model.image.tokenizer='pixel'"),
    (["model.ar.num_heads=3"], r"model.ar.hidden_size=256 must be a multiple of model.ar.num_heads=3"),
    (["model.ar.num_kv_heads=3"], r"num_heads a multiple of model.ar.num_kv_heads=3"),
    (["model.draft.num_layers=5"], r"model.draft.num_layers=5 > model.ar.num_layers=4"),
    (["model.draft.entropy_layer=2"], r"model.draft.entropy_layer=2 is not a layer of the 2-layer draft"),
    (["model.draft.shallow_layer=-3"], r"model.draft.shallow_layer=-3 is not a layer .* use 0..1"),
    (["model.draft.num_layers=1", "model.draft.shallow_layer=1"], r"shallow_layer=1 is not a layer of the 1-layer"),
    (["model.text.add_special_tokens=true"], r"add_special_tokens=true applies to model.text.tokenizer='hf' only"),
    (["model.text.boi_id=512"], r"model.text.boi_id=512 is outside model.ar.vocab_size=512"),
    (["data.resolution=64"], r"data.resolution=64 != model.image.resolution=32"),
    (["model.ar.max_position_embeddings=100"], r"data.max_text_len=39 \+ 64 image tokens exceed "
                                               r"model.ar.max_position_embeddings=100"),
    (["train.cd_steps=61"], r"train.cd_steps=61 > train.steps=60: stage 2 \(DMD\) would never run"),
    (["train.guidance_min=7"], r"train.guidance_min=7.0 > train.guidance_max=6.0"),
    (["preset=tinny"], r"preset='tinny' is not a named preset: use one of tiny, tiny-bench"),
])
def test_cross_field_rules(overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve_config("tiny", overrides=overrides)


def test_the_retired_guidance_embed_knob(tmp_path):
    """model.head.guidance_embed was a knob whose only working value was false (true broke the teacher): the role
    decides now. Setting it is refused with the reason; old config files and checkpoints holding it still load."""
    with pytest.raises(ConfigError, match="'model.head.guidance_embed' was removed: the student head always has"):
        resolve_config("tiny", overrides=["model.head.guidance_embed=true"])
    (tmp_path / "old.json").write_text(json.dumps({"model": {"head": {"width": 64, "guidance_embed": False}}}))
    assert resolve_config("tiny", config_file=str(tmp_path / "old.json")).model.head.width == 64
    from fastardiff_ds.models import build_head, load_config

    old = json.loads((Path(__file__).resolve().parents[2] / "assets" / "tiny_teacher" / "config.json").read_text())
    old["model"]["head"]["guidance_embed"] = False  # a checkpoint written while the knob existed
    (tmp_path / "old_ckpt").mkdir()
    (tmp_path / "old_ckpt" / "config.json").write_text(json.dumps(old))
    cfg = load_config(tmp_path / "old_ckpt")
    assert build_head(cfg).guidance_embed is None and build_head(cfg, student=True).guidance_embed is not None


def test_cross_field_edges_that_are_allowed():
    cfg = resolve_config("tiny", overrides=["train.cd_steps=60", "model.draft.num_layers=4",
                                            "model.draft.entropy_layer=-4", "model.draft.shallow_layer=3"])
    assert cfg.train.cd_steps == cfg.train.steps and cfg.model.draft.num_layers == cfg.model.ar.num_layers
    assert resolve_config("tiny", overrides=["train.cd_steps=0"]).train.cd_steps == 0  # DMD only


def test_derived_keys_follow_their_source_unless_set():
    cfg = resolve_config("tiny", overrides=["model.image.resolution=64", "seed=5"])
    assert (cfg.data.resolution, cfg.data.seed) == (64, 5)
    assert cfg.data.max_text_len == 32 + 1 + 1 + len("16*16") + 1 + 1  # BOS, <|image_area|>, h*w (+1), <boi>
    apply_overrides(cfg, ["model.text.max_length=50", "model.text.prompt_style=nextstep-1.1"])
    assert cfg.data.max_text_len == 50 + 2 + 1 + 6 + 1  # the 1.1 style may add a second BOS
    assert cfg.inference.student_steps == cfg.train.student_steps == 2
    apply_overrides(cfg, ["train.student_steps=4"])
    assert cfg.inference.student_steps == 4  # the student samples on the grid it was trained on
    cfg = resolve_config("tiny", overrides=["data.max_text_len=100", "data.seed=9", "seed=1"])
    assert (cfg.data.max_text_len, cfg.data.seed) == (100, 9)
    apply_overrides(cfg, ["model.text.max_length=40"])
    assert cfg.data.max_text_len == 100  # set by the user: kept (and checked)
    with pytest.raises(ConfigError, match="data.max_text_len=100 would cut"):
        apply_overrides(cfg, ["model.text.max_length=95"])


def test_a_saved_config_rederives_what_was_derived(tmp_path):
    """Checkpoints and resolved config files hold derived values as plain values: those equal to their source's
    follow it again, those the user set stay."""
    import torch

    from fastardiff_ds.config import save_config
    from fastardiff_ds.models import build_head, build_target, load_config, save_pretrained

    cfg = resolve_config("tiny", overrides=["model.ar.num_layers=1", "model.draft.num_layers=1", "data.seed=3",
                                            "inference.student_steps=1"])
    torch.manual_seed(0)
    save_pretrained(tmp_path / "ckpt", cfg, build_target(cfg), build_head(cfg))
    again = load_config(tmp_path / "ckpt", overrides=["model.text.max_length=64", "seed=5"])
    assert again.data.max_text_len == 64 + 7 and again.model.ar.num_layers == 1
    assert (again.data.seed, again.inference.student_steps) == (3, 1)  # set by the user: kept
    save_config(cfg, tmp_path / "config.json")
    again = resolve_config("tiny", config_file=str(tmp_path / "config.json"), overrides=["model.image.resolution=64"])
    assert (again.data.resolution, again.data.seed) == (64, 3)


def test_the_derived_text_length_never_cuts_begin_of_image(tmp_path):
    """The suffix bound is an upper bound for the tiny sentencepiece tokenizer and a Qwen-like word-level one, for
    every grid; and the loader, at the derived max_text_len, keeps <|begin_of_image|> last on every row."""
    from fastardiff_ds.config.rules import prompt_suffix_bound
    from fastardiff_ds.models.text_tokenizer import load_text_tokenizer, resolve_asset

    write_tokenizer(tmp_path / "hf")
    long = "a photo of a red circle on the left of the blue square " * 8
    for text_cfg in (["model.text.max_length=4"], ["model.text.tokenizer=hf", f"model.text.path={tmp_path / 'hf'}",
                                                   "model.text.max_length=5"]):
        for res in (4, 32, 64, 256, 1024):
            cfg = resolve_config("tiny", overrides=text_cfg + [f"model.image.resolution={res}",
                                                               "model.ar.max_position_embeddings=70000"])
            cfg.model.text.path = resolve_asset(cfg.model.text.path)
            text = load_text_tokenizer(cfg.model.text)
            ids = text.prompt_ids(long, cfg.model.image.grid, strict=False)
            assert len(ids) <= cfg.model.text.max_length + prompt_suffix_bound(cfg) == cfg.data.max_text_len
            assert ids[-1] == text.boi_id


@pytest.mark.parametrize("launcher", ["pretrain_t2i", "train_t2i"])
def test_a_bad_value_stops_a_launcher_before_any_work(launcher, tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "launcher" / f"{launcher}.py"
    spec = importlib.util.spec_from_file_location(f"_launcher_{launcher}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = tmp_path / "run"
    for bad, msg in [("train.gen_every=0", "'train.gen_every' must be >= 1"),
                     ("train.on_nonfinite=skp", "did you mean 'skip'"), ("data.max_text_len=8", "data.max_text_len=8")]:
        with pytest.raises(SystemExit, match=f"config error: .*{msg}"):
            module.main([f"run_dir={run}", f"data.shards={tmp_path / 'shapes'}", bad])
    assert not run.exists() and not (tmp_path / "shapes").exists()  # no run folder, no data generated
