"""The official NextStep VAE folder (config.json + checkpoint.pt) against an independent reference forward.

The reference below re-implements the official `modeling_flux_vae.py` math directly on the official state-dict keys
(GroupNorm(32, eps 1e-6) -> swish -> conv residual blocks, single-head attention on 1x1-conv q/k/v, asymmetric
(0,1,0,1) padding before the stride-2 conv, nearest 2x upsampling, `decoder.up[i]` run from the deepest level, and
`encoder_norm` = no-affine LayerNorm over each psz x psz patch of the mean); it shares no code with the loader.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastardiff_ds.config import get_preset
from fastardiff_ds.models.image_tokenizers import VAETokenizer, load_vae
from fastardiff_ds.models import nextstep_vae, patchify, unpatchify, vae_cache
from nextstep_vae_fixture import write_official_vae_folder


def _gn(x, sd, p):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _conv(x, sd, p, stride=1, padding=1):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], stride=stride, padding=padding)


def _swish(x):
    return x * torch.sigmoid(x)


def _resnet(x, sd, p):
    h = _conv(_swish(_gn(x, sd, p + ".norm1")), sd, p + ".conv1")
    h = _conv(_swish(_gn(h, sd, p + ".norm2")), sd, p + ".conv2")
    if p + ".nin_shortcut.weight" in sd:
        x = _conv(x, sd, p + ".nin_shortcut", padding=0)
    return x + h


def _attn(x, sd, p):
    h = _gn(x, sd, p + ".norm")
    b, c, hh, ww = x.shape
    q, k, v = (_conv(h, sd, f"{p}.{n}", padding=0).reshape(b, c, hh * ww) for n in "qkv")
    w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # (b, hw, hw)
    out = (w @ v.transpose(1, 2)).transpose(1, 2).reshape(b, c, hh, ww)
    return x + _conv(out, sd, p + ".proj_out", padding=0)


def _mid(h, sd, p):
    return _resnet(_attn(_resnet(h, sd, p + ".block_1"), sd, p + ".attn_1"), sd, p + ".block_2")


def ref_encode_mean(x, sd, cfg):
    """Official encode: the posterior mean after encoder_norm, (B, z, H/f, W/f)."""
    n = len(cfg["ch_mult"])
    h = _conv(x, sd, "encoder.conv_in")
    for i in range(n):
        for j in range(cfg["num_res_blocks"]):
            h = _resnet(h, sd, f"encoder.down.{i}.block.{j}")
        if i != n - 1:
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.down.{i}.downsample.conv", stride=2, padding=0)
    h = _conv(_swish(_gn(_mid(h, sd, "encoder.mid"), sd, "encoder.norm_out")), sd, "encoder.conv_out")
    mean = h[:, : cfg["z_channels"]]
    if cfg["encoder_norm"]:
        p, (b, c, hh, ww) = cfg["psz"], mean.shape
        m = mean.reshape(b, c, hh // p, p, ww // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, hh // p, ww // p)
        m = F.layer_norm(m.permute(0, 2, 3, 1), (c * p * p,), eps=1e-6).permute(0, 3, 1, 2)
        mean = m.reshape(b, c, p, p, hh // p, ww // p).permute(0, 1, 4, 2, 5, 3).reshape(b, c, hh, ww)
    return mean


def ref_decode(z, sd, cfg):
    n = len(cfg["ch_mult"])
    h = _mid(_conv(z, sd, "decoder.conv_in"), sd, "decoder.mid")
    for i in reversed(range(n)):
        for j in range(cfg["num_res_blocks"] + 1):
            h = _resnet(h, sd, f"decoder.up.{i}.block.{j}")
        if i != 0:
            h = _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.up.{i}.upsample.conv")
    return _conv(_swish(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")


def _image_cfg(folder, z_channels=4, downsample=4, resolution=16):
    cfg = get_preset("nextstep-1-large").model.image
    cfg.vae_path, cfg.channels, cfg.vae_downsample, cfg.resolution = str(folder), z_channels, downsample, resolution
    return cfg


@pytest.fixture
def official(tmp_path):
    folder, sd = write_official_vae_folder(tmp_path / "NextStep-1-f8ch16-Tokenizer")
    import json

    return folder, sd, json.loads((folder / "config.json").read_text())


def test_decode_matches_reference(official, tmp_path):
    folder, sd, cfg = official
    tk = VAETokenizer(_image_cfg(folder), load_vae(folder, cache_dir=tmp_path / "cache"))
    assert (tk.scale, tk.shift) == (cfg["scaling_factor"], cfg["shift_factor"])  # from config.json, not 1 / 0
    torch.manual_seed(1)
    tokens = torch.randn(2, tk.cfg.num_tokens, tk.cfg.token_dim)
    z = unpatchify(tokens, 2, 4, tk.cfg.grid) / cfg["scaling_factor"] + cfg["shift_factor"]
    want = ref_decode(z, sd, cfg).clamp(-1, 1)
    got = tk.decode(tokens)
    assert got.shape == (2, 3, 16, 16) and tokens.shape == (2, 4, 16)  # 16 px / f4 = 4x4 latent -> 2x2 tokens
    err = (got - want).abs().max().item()
    assert err < 1e-4, err
    assert (want.abs() < 1).float().mean() > 0.5  # the comparison is not all clamped


def test_encode_applies_encoder_norm_and_scale_shift(official, tmp_path):
    folder, sd, cfg = official
    tk = VAETokenizer(_image_cfg(folder), load_vae(folder, cache_dir=tmp_path / "cache"))
    torch.manual_seed(2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean = ref_encode_mean(x, sd, cfg)
    tokens = tk.encode(x)
    err = (tokens - patchify((mean - cfg["shift_factor"]) * cfg["scaling_factor"], 2)).abs().max().item()
    assert err < 1e-4, err
    # encoder_norm: each psz=2 patch of the mean is zero-mean, unit-variance over its 4 * 2^2 = 16 values
    unscaled = tokens / cfg["scaling_factor"] + cfg["shift_factor"]
    torch.testing.assert_close(unscaled.mean(-1), torch.zeros(2, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(unscaled.var(-1, unbiased=False), torch.ones(2, 4), atol=1e-3, rtol=0)
    # round trip: decode(encode(x)) is the reference decoder on the reference mean (scale/shift cancel)
    err = (tk.decode(tokens) - ref_decode(mean, sd, cfg).clamp(-1, 1)).abs().max().item()
    assert err < 1e-4, err


def test_encoder_norm_off_and_psz_one(tmp_path):
    folder, sd = write_official_vae_folder(tmp_path / "v", encoder_norm=False, psz=1, scaling_factor=1.0,
                                           shift_factor=0.0)
    cfg = dict(encoder_norm=False, psz=1, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4)
    vae = load_vae(folder, cache_dir=tmp_path / "cache")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        got = vae.encode(x).latent_dist.mode()
    assert (got - ref_encode_mean(x, sd, cfg)).abs().max() < 1e-4
    assert got.mean(1).abs().max() > 1e-2  # no norm: per-position means are not zero


def test_conversion_is_cached_and_read_only_folder_falls_back(official, tmp_path, monkeypatch):
    folder, sd, cfg = official
    real_write = vae_cache.write_atomic

    def read_only(path, state, meta):
        if path.parent == folder.resolve():
            raise PermissionError(13, "Permission denied")
        real_write(path, state, meta)

    monkeypatch.setattr(vae_cache, "write_atomic", read_only)
    first = load_vae(folder, cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache").glob("*/checkpoint.diffusers.safetensors"))
    assert len(cached) == 1 and not (folder / "checkpoint.diffusers.safetensors").exists()
    monkeypatch.setattr(nextstep_vae, "read_official_checkpoint", lambda p: pytest.fail("cache not used"))
    second = load_vae(folder, cache_dir=tmp_path / "cache")
    for k, v in first.state_dict().items():
        assert torch.equal(v, second.state_dict()[k]), k
    # a writable folder gets the cache beside checkpoint.pt
    monkeypatch.setattr(vae_cache, "write_atomic", real_write)
    monkeypatch.undo()
    folder2, _ = write_official_vae_folder(tmp_path / "w")
    load_vae(folder2, cache_dir=tmp_path / "cache2")
    assert (folder2 / "checkpoint.diffusers.safetensors").is_file()


def test_missing_or_wrong_folder_names_the_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"NextStep-1-f8ch16-Tokenizer.*config.json \+ checkpoint.pt"):
        load_vae(tmp_path / "NextStep-1-f8ch16-Tokenizer")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        load_vae(tmp_path / "empty")
    folder, _ = write_official_vae_folder(tmp_path / "v")
    (folder / "config.json").write_text('{"ch": 64, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 4}')
    with pytest.raises(ValueError, match="does not fit its config.json"), pytest.warns(UserWarning, match="psz"):
        load_vae(folder, cache_dir=tmp_path / "cache")


def test_vae_that_does_not_fit_the_model_config(official, tmp_path):
    folder, _, _ = official
    with pytest.raises(ValueError, match="model.image.channels=16"):
        VAETokenizer(_image_cfg(folder, z_channels=16), load_vae(folder, cache_dir=tmp_path / "cache"))


def _launcher(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "launcher" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_launcher_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_vae_flag_end_to_end(official, tmp_path, capsys):
    folder, _, _ = official
    generate = _launcher("generate").main
    args = ["--random-init", "--prompt", "a red circle", "--num-images", "1", "model.image.tokenizer=vae",
            "model.image.channels=4", "model.image.vae_downsample=4", "model.image.resolution=16",
            "model.image.patch_size=2", "inference.num_steps=2", "model.ar.num_layers=1", "model.draft.num_layers=1",
            "model.head.depth=1"]
    with pytest.raises(SystemExit, match="NextStep-1-f8ch16-Tokenizer"):
        generate(["--out", str(tmp_path / "x"), "--vae", str(tmp_path / "nope"), *args])
    generate(["--out", str(tmp_path / "y"), "--vae", str(folder), *args])
    from PIL import Image

    assert Image.open(tmp_path / "y" / "00000_seed0.png").size == (16, 16)
    assert (folder / "checkpoint.diffusers.safetensors").is_file()  # the conversion was cached beside it


def test_eval_generate_vae_flag_becomes_an_override():
    import argparse

    from eval_suites.generation import add_generate_args

    p = argparse.ArgumentParser()
    add_generate_args(p, n_default=1)
    a = p.parse_args(["--ckpt", "c", "--outdir", "o", "--set", "inference.num_steps=3", "--vae", "V"])
    assert a.set == ["model.image.vae_path=V", "inference.num_steps=3"]
    assert p.parse_args(["--ckpt", "c", "--outdir", "o"]).set == []  # the shared default is not mutated
