"""Fixture generator: a tiny VAE folder written the way stepfun-ai/NextStep-1 saves `NextStep-1-f8ch16-Tokenizer`.

`checkpoint.pt` = `torch.save` of the official `AutoencoderKL` module's flat `state_dict()`; the module tree is
rebuilt here with the official attribute names (modeling_flux_vae.py: `encoder.down[i].block[j]`, `.downsample`,
`.mid.block_1 / attn_1 (norm, q, k, v, proj_out as 1x1 convs) / block_2`, `norm_out`, `conv_out`; the decoder's
`up` list indexed by resolution level via insert(0, ...), `num_res_blocks + 1` blocks per level, `.upsample`).
`config.json` = the official `AutoEncoderParams` fields. Weights are random (GroupNorm affine too) so any mixed-up
key shows in the outputs. Independent of fastardiff_ds.

    python tests/unit/nextstep_vae_fixture.py OUT_DIR   # writes OUT_DIR/{config.json, checkpoint.pt}
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


def _resnet(cin: int, cout: int) -> nn.Module:
    m = nn.Module()
    m.norm1, m.conv1 = _gn(cin), nn.Conv2d(cin, cout, 3, padding=1)
    m.norm2, m.conv2 = _gn(cout), nn.Conv2d(cout, cout, 3, padding=1)
    if cin != cout:
        m.nin_shortcut = nn.Conv2d(cin, cout, 1)
    return m


def _attn(c: int) -> nn.Module:
    m = nn.Module()
    m.norm = _gn(c)
    m.q, m.k, m.v, m.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))
    return m


def _mid(c: int) -> nn.Module:
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = _resnet(c, c), _attn(c), _resnet(c, c)
    return m


def _encoder(p: dict) -> nn.Module:
    ch, mult, n = p["ch"], p["ch_mult"], len(p["ch_mult"])
    e = nn.Module()
    e.conv_in = nn.Conv2d(p["in_channels"], ch, 3, padding=1)
    e.down = nn.ModuleList()
    in_mult = (1,) + tuple(mult)
    for i in range(n):
        level, cin = nn.Module(), ch * in_mult[i]
        level.block, level.attn = nn.ModuleList(), nn.ModuleList()
        for _ in range(p["num_res_blocks"]):
            level.block.append(_resnet(cin, ch * mult[i]))
            cin = ch * mult[i]
        if i != n - 1:
            level.downsample = nn.Module()
            level.downsample.conv = nn.Conv2d(cin, cin, 3, stride=2, padding=0)
        e.down.append(level)
    e.mid, e.norm_out = _mid(ch * mult[-1]), _gn(ch * mult[-1])
    e.conv_out = nn.Conv2d(ch * mult[-1], 2 * p["z_channels"], 3, padding=1)
    return e


def _decoder(p: dict) -> nn.Module:
    ch, mult, n = p["ch"], p["ch_mult"], len(p["ch_mult"])
    d, cin = nn.Module(), ch * mult[-1]
    d.conv_in = nn.Conv2d(p["z_channels"], cin, 3, padding=1)
    d.mid, d.up = _mid(cin), nn.ModuleList()
    for i in reversed(range(n)):
        level = nn.Module()
        level.block, level.attn = nn.ModuleList(), nn.ModuleList()
        for _ in range(p["num_res_blocks"] + 1):
            level.block.append(_resnet(cin, ch * mult[i]))
            cin = ch * mult[i]
        if i != 0:
            level.upsample = nn.Module()
            level.upsample.conv = nn.Conv2d(cin, cin, 3, padding=1)
        d.up.insert(0, level)
    d.norm_out, d.conv_out = _gn(cin), nn.Conv2d(cin, p["out_ch"], 3, padding=1)
    return d


def official_params(**overrides) -> dict:
    """config.json content: the official AutoEncoderParams fields, tiny channels (GroupNorm(32) needs ch % 32 == 0)."""
    p = dict(resolution=16, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4,
             scaling_factor=0.3611, shift_factor=0.1159, deterministic=True, encoder_norm=True, psz=2)  # levels 1 and 2 share a width: a mixed-up decoder level order shows numerically
    p.update(overrides)
    return p


def write_official_vae_folder(out: str | Path, seed: int = 0, **overrides) -> tuple[Path, dict]:
    """Write config.json + checkpoint.pt; returns (folder, the state dict that was saved)."""
    p = official_params(**overrides)
    torch.manual_seed(seed)
    vae = nn.Module()
    vae.encoder, vae.decoder = _encoder(p), _decoder(p)
    with torch.no_grad():
        for name, t in vae.named_parameters():
            if ".norm" in name and name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn_like(t))
            else:
                t.copy_((0.1 if t.ndim > 1 else 0.05) * torch.randn_like(t))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = vae.state_dict()
    torch.save(state, out / "checkpoint.pt")
    (out / "config.json").write_text(json.dumps(p, indent=2))
    return out, {k: v.clone() for k, v in state.items()}


if __name__ == "__main__":
    folder, sd = write_official_vae_folder(sys.argv[1])
    print(f"wrote {folder}/config.json and checkpoint.pt ({len(sd)} tensors)")
