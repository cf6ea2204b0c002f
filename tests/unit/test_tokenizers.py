"""Image tokenizers (pixel patches, VAE from a local path) and text tokenizers (special tokens, prompt limit)."""
from __future__ import annotations

import pytest
import torch

from fastardiff_ds.config import get_preset
from fastardiff_ds.models import PixelPatchTokenizer, load_text_tokenizer, patchify, unpatchify
from fastardiff_ds.models.image_tokenizers import VAETokenizer, load_vae
from fastardiff_ds.models.text_tokenizer import SPECIAL_TOKENS, PromptTooLong


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 16, 8, 8)
    tok = patchify(x, 2)
    assert tok.shape == (2, 16, 64)
    torch.testing.assert_close(unpatchify(tok, 2, 16, 4), x)
    # NextStep-1 order inside a token: channel-major, then the 2x2 pixels of that channel
    torch.testing.assert_close(tok[0, 0, :4], x[0, 0, :2, :2].reshape(4))


def test_pixel_tokenizer_round_trip():
    cfg = get_preset("tiny").model.image
    tk = PixelPatchTokenizer(cfg)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = tk.encode(img)
    assert tokens.shape == (2, cfg.num_tokens, cfg.token_dim)
    torch.testing.assert_close(tk.decode(tokens), img)


def test_vae_tokenizer_from_local_folder_and_file(tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    small = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
                 layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, use_quant_conv=False,
                 use_post_quant_conv=False)
    torch.manual_seed(0)
    vae = AutoencoderKL(**small)
    vae.save_pretrained(tmp_path / "vae")
    save_file(vae.state_dict(), str(tmp_path / "vae.safetensors"))
    cfg = get_preset("nextstep-1-large").model.image
    cfg.resolution, cfg.vae_path = 32, str(tmp_path / "vae")
    tk = VAETokenizer.from_local(cfg)
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    tokens = tk.encode(img)
    assert tokens.shape == (1, 4, 64)  # 32 px / f8 = 4x4 latent, patch 2 -> 2x2 tokens of 16*4
    assert tk.decode(tokens).shape == (1, 3, 32, 32)
    from_file = load_vae(tmp_path / "vae.safetensors", config=small)
    torch.testing.assert_close(from_file.state_dict()["encoder.conv_in.weight"], vae.state_dict()["encoder.conv_in.weight"])
    with pytest.raises(FileNotFoundError, match="vae_path"):
        load_vae(tmp_path / "missing")


def _train_sp(tmp_path, with_specials: bool):
    import sentencepiece as spm

    lines = [f"a {c} {s} left of a {c2} circle" for c in ("red", "blue", "green") for s in ("square", "triangle")
             for c2 in ("yellow", "purple")] * 5
    (tmp_path / "corpus.txt").write_text("\n".join(lines))
    kw = dict(user_defined_symbols=list(SPECIAL_TOKENS)) if with_specials else {}
    prefix = tmp_path / ("sp" if with_specials else "plain")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(prefix), vocab_size=40 if with_specials else 26, hard_vocab_limit=False,
                                   split_digits=True, minloglevel=2, **kw)
    return str(prefix) + ".model"


def test_sentencepiece_prompt_layout_and_limits(tmp_path):
    cfg = get_preset("tiny").model.text
    cfg.path, cfg.max_length = _train_sp(tmp_path, True), 20
    tok = load_text_tokenizer(cfg)
    ids = tok.prompt_ids("a red square", grid=8)
    assert ids[-1] == tok.boi_id and tok.image_area_id in ids
    batch, mask = tok.batch(["a red square", "a blue triangle left of a yellow circle"], grid=8, strict=False)
    assert mask[0, 0] == 0 and mask[:, -1].all() and (batch[:, -1] == tok.boi_id).all()  # left padding
    with pytest.raises(PromptTooLong, match="max_length"):
        tok.prompt_ids("a blue triangle left of a yellow circle " * 3, grid=8)


def test_tokenizer_without_special_tokens_is_an_error(tmp_path):
    cfg = get_preset("tiny").model.text
    cfg.path = _train_sp(tmp_path, False)
    with pytest.raises(ValueError, match="train_tokenizer.py"):
        load_text_tokenizer(cfg)
    cfg.path = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="model.text.path"):
        load_text_tokenizer(cfg)
