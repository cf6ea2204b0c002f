"""launcher/generate.py on a NextStep-1.x folder exactly as downloaded (tiny fixture): no --preset, the model is
built from its config.json, its tokenizer is the folder's, weights load in bf16 (the family preset's dtype)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from nextstep_official import write_official  # noqa: E402


def _tiny_vae(path: Path) -> Path:
    """An f8, 16-channel AutoencoderKL (the NextStep-1-f8ch16-Tokenizer architecture, narrow)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
                  layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, use_quant_conv=False,
                  use_post_quant_conv=False).save_pretrained(path)
    return path


@pytest.mark.parametrize("style", ["1.1", "1-large"])
def test_generate_from_official_folder_without_preset(tmp_path, style, monkeypatch):
    sys.path.insert(0, str(ROOT / "launcher"))
    import generate

    ckpt, vae = write_official(tmp_path / "NextStep", style), _tiny_vae(tmp_path / "vae")
    argv = ["--ckpt", str(ckpt), "--prompt", "a photo of a red cat", "--num-images", "2",
            "--out", str(tmp_path / "out"),
            f"model.image.vae_path={vae}", "inference.num_steps=3"]
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave the test process's threads alone
    generate.main(argv)
    from PIL import Image

    pngs = sorted((tmp_path / "out").glob("0*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size == (64, 64)  # latent_size 8 x f8 = 64 px, 4 x 4 tokens
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["random_init"] is False
    with pytest.raises(SystemExit, match="does not match the model built"):  # overrides reach the build
        generate.main([*argv, "model.head.depth=5"])


def test_generate_reports_bad_official_config_in_one_line(tmp_path):
    """A refused setting exits with one line naming the key (SystemExit, not a traceback)."""
    sys.path.insert(0, str(ROOT / "launcher"))
    import generate

    ckpt = write_official(tmp_path / "NextStep", "1.1", config_updates={"use_2d_rope": True})
    with pytest.raises(SystemExit, match="use_2d_rope=True"):
        generate.main(["--ckpt", str(ckpt), "--prompt", "a cat", "--out", str(tmp_path / "out")])
