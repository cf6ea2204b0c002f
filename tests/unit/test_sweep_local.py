from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("sweep_local", ROOT / "launcher" / "sweep_local.py")
sweep_local = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep_local)


def test_alpha_sweep_yaml_expands_to_valid_overrides():
    from fastardiff_ds.config import resolve_config

    sweep = yaml.safe_load((ROOT / "sweeps" / "alpha_schedule.yaml").read_text())
    runs = sweep_local.expand(sweep["parameters"], "grid", None, 0)
    assert len(runs) == 2 * 3 * 2 * 2 * 2 and len({tuple(r.items()) for r in runs}) == len(runs)
    cmd = sweep_local.command_for(sweep, runs[0], ["run_dir=x"])
    assert cmd[:3] == ["deepspeed", "--num_gpus=2", "launcher/train_t2i.py"]
    overrides = [c for c in cmd if "=" in c and not c.startswith("--")]
    resolve_config("tiny", overrides=overrides)  # every swept key is a real config key


def test_random_method_is_seeded_and_respects_ranges():
    params = {"train.alpha0": {"min": 0.5, "max": 0.9}, "train.alpha_kind": {"values": ["linear", "cosine"]},
              "train.steps": {"min": 10, "max": 20}}
    a = sweep_local.expand(params, "random", 5, seed=1)
    assert a == sweep_local.expand(params, "random", 5, seed=1)
    assert all(0.5 <= r["train.alpha0"] <= 0.9 and isinstance(r["train.steps"], int) for r in a)
    with pytest.raises(ValueError, match="random"):
        sweep_local.expand(params, "grid", None, 0)
