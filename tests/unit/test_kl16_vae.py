"""MAR's KL-16 VAE (models/kl16_vae.py) against the official LTH14/mar `models/vae.py` at a tiny size
(tests/fixtures/mar/vae_official.pt, written by tests/fixtures/mar_official.py ... vae): the weights are
rebuilt from the official key -> shape map (kl16_state), saved the way kl16.ckpt holds them ({"model": state}),
and read back through load_kl16."""
import sys
from pathlib import Path

import pytest
import torch

from fastardiff_ds.models.kl16_vae import KL16Params, load_kl16

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from mar_official import kl16_state  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "fixtures" / "mar" / "vae_official.pt"


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def ckpt(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "kl16.ckpt"
    state = kl16_state(ref["shapes"])
    state["loss.discriminator.main.0.weight"] = torch.zeros(2, 3, 4, 4)  # extra keys: skipped, as strict=False does
    torch.save({"model": state}, path)
    return path


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_layout_read_from_the_weights(ref):
    p = KL16Params.from_state(kl16_state(ref["shapes"]))
    assert (p.embed_dim, p.ch, p.ch_mult, p.num_res_blocks, p.attn_levels) == (8, 32, (1, 2), 2, (1,))
    assert p.stride == 2 and KL16Params().stride == 16  # kl16 itself: 256 px -> 16 x 16 tokens


def test_posterior_and_decode_match_official(ref, ckpt):
    vae = load_kl16(ckpt)
    with torch.no_grad():
        post = vae.encode(ref["x"]).latent_dist
        dec = vae.decode(ref["z"]).sample
    assert _rel(post.mean, ref["mean"]) < 1e-4
    assert _rel(post.logvar, ref["logvar"]) < 1e-4
    assert _rel(dec, ref["decoded"]) < 1e-4


def test_mar_token_scaling(ref, ckpt):
    vae = load_kl16(ckpt)
    with torch.no_grad():
        assert _rel(vae.tokens(ref["x"], sample=False), ref["mean"] * 0.2325) < 1e-4
        assert _rel(vae.images(ref["z"] * 0.2325), ref["decoded"]) < 1e-4
        a = vae.tokens(ref["x"], generator=torch.Generator().manual_seed(0))
        b = vae.tokens(ref["x"], generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.allclose(a, ref["mean"] * 0.2325)  # a seeded posterior sample


def test_bad_files_are_named(tmp_path, ref):
    with pytest.raises(FileNotFoundError, match="download_pretrained_vae"):
        load_kl16(tmp_path / "nope.ckpt")
    torch.save({"model": {"class_emb.weight": torch.zeros(2, 2)}}, tmp_path / "mar.ckpt")
    with pytest.raises(ValueError, match="not a KL-16 VAE checkpoint"):
        load_kl16(tmp_path / "mar.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_kl16(tmp_path / "junk.ckpt")
    state = kl16_state(ref["shapes"])
    state["post_quant_conv.weight"] = torch.zeros(4, 4, 1, 1)  # embed dim 4 against an encoder of 8
    torch.save({"model": state}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="do not fit"):
        load_kl16(tmp_path / "bad.ckpt")


def test_kl16_tokenizer_patchifies_mar_tokens(ref, ckpt):
    from fastardiff_ds.models.kl16_vae import KL16Tokenizer

    vae = load_kl16(ckpt)
    for patch in (1, 2):
        tok = KL16Tokenizer(vae, patch_size=patch)
        t = tok.encode(ref["x"], sample=False)
        assert t.shape == (2, (16 // patch) ** 2, 8 * patch**2)
        with torch.no_grad():
            img = tok.decode(t)
            want = vae.images(vae.tokens(ref["x"], sample=False)).clamp(-1, 1)
        assert _rel(img, want) < 1e-5
