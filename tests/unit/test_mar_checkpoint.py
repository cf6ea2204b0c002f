"""Official MAR checkpoint-last.pth files, written the way LTH14/mar's util/misc.py save_model writes them."""
import argparse

import pytest
import torch

from fastardiff_ds.models.mar_checkpoint import MAR_KEYS, read_mar_checkpoint


def _state(v: float) -> dict:
    return {k: torch.full((2, 3), v) for k in (*MAR_KEYS, "fake_latent", "mask_token")}


def _save(path, ema=True, args=None, **extra):
    """save_model's dict: model, model_ema (None without EMA), optimizer, epoch, scaler, args (a Namespace)."""
    ns = args if args is not None else argparse.Namespace(model="mar_base", diffloss_d=6, diffloss_w=1024,
                                                          num_sampling_steps="100", buffer_size=64, ema_rate=0.9999)
    torch.save({"model": _state(1.0), "model_ema": _state(2.0) if ema else None,
                "optimizer": {"state": {}, "param_groups": [{"lr": 8e-4}]}, "epoch": 399,
                "scaler": {"scale": 65536.0}, "args": ns, **extra}, path)
    return path


class Extra:
    """An object a fork of MAR might pickle beside the weights (not argparse.Namespace)."""

    def __init__(self, note: str = "x"):
        self.note = note


def test_reads_ema_by_default_and_raw_on_request(tmp_path):
    p = _save(tmp_path / "checkpoint-last.pth")
    ck = read_mar_checkpoint(p)
    assert ck.weights == "model_ema" and float(ck.state["z_proj.weight"][0, 0]) == 2.0
    assert ck.args["model"] == "mar_base" and ck.args["diffloss_d"] == 6 and ck.epoch == 399
    assert float(read_mar_checkpoint(p, weights="model").state["z_proj.weight"][0, 0]) == 1.0


def test_missing_ema_names_the_key_and_the_fix(tmp_path):
    p = _save(tmp_path / "c.pth", ema=False)
    with pytest.raises(ValueError, match="'model_ema' is missing.*weights='model'"):
        read_mar_checkpoint(p)
    assert read_mar_checkpoint(p, weights="model").weights == "model"


def test_other_family_and_missing_file_and_bad_weights(tmp_path):
    other = tmp_path / "nextstep.pth"
    torch.save({"model": {"embed_tokens.weight": torch.zeros(2)}}, other)
    with pytest.raises(ValueError, match="not a MAR state dict.*class_emb.weight"):
        read_mar_checkpoint(other)
    flat = tmp_path / "flat.pth"
    torch.save({"class_emb.weight": torch.zeros(2)}, flat)
    with pytest.raises(ValueError, match="not a MAR checkpoint-last.pth"):
        read_mar_checkpoint(flat)
    with pytest.raises(FileNotFoundError, match="no such MAR checkpoint"):
        read_mar_checkpoint(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="weights='ema'"):
        read_mar_checkpoint(other, weights="ema")
    bad = tmp_path / "cut.pth"
    bad.write_bytes(_save(tmp_path / "full.pth").read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        read_mar_checkpoint(bad)
    (tmp_path / "page.pth").write_text("<html>403 Forbidden</html>")  # a failed download: not a zip, not a pickle
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        read_mar_checkpoint(tmp_path / "page.pth")


def test_foreign_objects_need_the_explicit_flag(tmp_path):
    p = _save(tmp_path / "c.pth", payload=Extra())
    with pytest.raises(ValueError, match="allow_globals"):
        read_mar_checkpoint(p)
    assert read_mar_checkpoint(p, allow_globals=(Extra,)).weights == "model_ema"  # named: allowed, still safe
