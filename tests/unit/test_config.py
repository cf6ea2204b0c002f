from __future__ import annotations

import json

import pytest

from fastardiff_ds.config import ConfigError, get_preset, resolve_config, save_config


def test_overrides_are_typed():
    cfg = resolve_config("tiny", overrides=["model.ar.num_layers=6", "seed=3", "model.head.mlp_ratio=2",
                                            "model.draft.train_embeddings=true", "model.text.path=x.model"])
    assert cfg.model.ar.num_layers == 6 and cfg.seed == 3 and cfg.model.head.mlp_ratio == 2.0
    assert cfg.model.draft.train_embeddings is True and cfg.model.text.path == "x.model"


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match="model.ar.num_layers"):
        resolve_config("tiny", overrides=["model.ar.num_layer=6"])
    with pytest.raises(ConfigError, match="expects int"):
        resolve_config("tiny", overrides=["model.ar.num_layers=six"])
    with pytest.raises(ConfigError, match="key=value"):
        resolve_config("tiny", overrides=["model.ar.num_layers"])


def test_unknown_preset():
    with pytest.raises(KeyError, match="nextstep-1-large"):
        get_preset("nextstep-large")


def test_resolved_config_file_round_trip(tmp_path):
    cfg = resolve_config("small", overrides=["seed=7"])
    path = save_config(cfg, tmp_path / "run" / "config.json")
    data = json.loads(path.read_text())
    assert data["seed"] == 7 and data["model"]["ar"]["num_layers"] == 16
    again = resolve_config("tiny", config_file=str(path))
    assert again.model.ar.hidden_size == 1024 and again.seed == 7
    (tmp_path / "bad.json").write_text(json.dumps({"model": {"ar": {"hiden_size": 3}}}))
    with pytest.raises(ConfigError, match="model.ar.hidden_size"):
        resolve_config("tiny", config_file=str(tmp_path / "bad.json"))
