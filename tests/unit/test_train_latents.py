"""data.kind=latents feeds both trainers: a tiny latent shard set, cached with the official NextStep VAE layout
(tests/unit/nextstep_vae_fixture.py: config.json + checkpoint.pt) through data_pipelines' encode_shards, gives the
pretraining step and the joint step exactly the tokens (and so the losses) the pixel path gives through the VAE,
without loading a VAE; a cache that does not fit the model is refused naming the keys."""
from __future__ import annotations

import copy
import types

import pytest
import torch

from fastardiff_ds.config import apply_overrides
from fastardiff_ds.data import build_loader
from fastardiff_ds.data.latents import encode_shards
from fastardiff_ds.data.shards import expand_shards
from fastardiff_ds.data.synthetic import write_shapes_dataset
from fastardiff_ds.models import build_head, build_target, unpatchify
from fastardiff_ds.models.image_tokenizers import VAETokenizer, load_vae
from fastardiff_ds.training.batch import image_tokens, latent_tokens
from fastardiff_ds.training.pretrain import PretrainTask, pretrain_loss
from fastardiff_ds.training.trainer import JointTask
from nextstep_vae_fixture import write_official_vae_folder
from test_train_step import _setup

# the fixture VAE: f4, 4 latent channels; 16 px -> 4x4 latent -> 2x2 tokens of 4 * 2^2 = 16-d
VAE_MODEL = ["model.image.tokenizer=vae", "model.image.resolution=16", "model.image.patch_size=2",
             "model.image.channels=4", "model.image.vae_downsample=4"]


def tok(text: str) -> list[int]:
    return [5 + len(w) for w in text.split()][:6] + [2]  # ids < vocab; never the pad id 0


class LatentGrid:
    """encode -> (B, C, h, w) normalised latents: the other layout a latent cache may hold."""

    def __init__(self, tk: VAETokenizer):
        self.tk = tk

    def encode(self, pixels):
        return unpatchify(self.tk.encode(pixels), 2, 4, self.tk.cfg.grid)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Pixel shards, the VAE tokenizer, and two latent caches of them ((N, D) tokens and (C, h, w) latents)."""
    root = tmp_path_factory.mktemp("latents")
    write_shapes_dataset(str(root / "pixels"), num_samples=16, shard_size=8, resolution=32, seed=0)
    folder, _ = write_official_vae_folder(root / "vae", resolution=16)
    cfg = apply_overrides(_tiny(), VAE_MODEL + [f"model.image.vae_path={folder}"])
    tk = VAETokenizer(cfg.model.image, load_vae(folder, cache_dir=root / "cache"))
    shards = expand_shards(str(root / "pixels"))
    for name, enc in (("tokens", tk), ("grid", LatentGrid(tk))):
        out = encode_shards(shards, str(root / name), enc, resolution=16, batch_size=5, dtype="float32")
        assert out == {"samples": 16, "skipped": {}}
    return root, cfg, tk


def _tiny():
    from fastardiff_ds.config import get_preset

    cfg = get_preset("tiny")
    cfg.model.ar.hidden_size, cfg.model.ar.intermediate_size, cfg.model.ar.num_layers = 64, 128, 3
    cfg.model.head.width, cfg.model.head.depth = 32, 2
    return cfg


def _batches(cfg, shards: str, kind: str) -> list[dict]:
    data = copy.deepcopy(cfg.data)
    data.shards, data.kind, data.batch_size, data.num_workers = shards, kind, 4, 0
    data.shuffle_buffer, data.shuffle_shards, data.drop_text_prob = 0, False, 0.0
    return list(build_loader(data, rank=0, world_size=1, tokenize=tok, pad_id=0))


def test_both_cache_layouts_give_the_pixel_paths_tokens(data):
    root, cfg, tk = data
    pix = _batches(cfg, str(root / "pixels"), "pixels")
    for name in ("tokens", "grid"):
        lat = _batches(cfg, str(root / name), "latents")
        assert [b["keys"] for b in lat] == [b["keys"] for b in pix] and "pixels" not in lat[0]
        for a, b in zip(lat, pix):
            got = image_tokens(a, "latents", None, cfg.model.image, "cpu")  # no VAE needed
            assert got.shape == (4, 4, 16)
            torch.testing.assert_close(got, image_tokens(b, "pixels", tk, cfg.model.image, "cpu"), rtol=0, atol=1e-5)


def test_a_cache_that_does_not_fit_names_the_keys(data):
    root, cfg, _ = data
    batch = _batches(cfg, str(root / "tokens"), "latents")[0]
    other = apply_overrides(copy.deepcopy(cfg), ["model.image.resolution=32"])
    with pytest.raises(ValueError, match=r"\(4, 16\) do not fit.*resolution=32.*encode_latents"):
        latent_tokens(batch["latents"], other.model.image)
    with pytest.raises(KeyError, match="data.kind=latents but the batch has"):
        image_tokens(_batches(cfg, str(root / "pixels"), "pixels")[0], "latents", None, cfg.model.image, "cpu")


def _pretrain_inputs(cfg, kind, image_tokenizer, batch):
    """PretrainTask.inputs -- the hook the training loop calls -- on a task with only what it reads."""
    cfg = apply_overrides(copy.deepcopy(cfg), [f"data.kind={kind}"])
    task = types.SimpleNamespace(cfg=cfg, image=image_tokenizer, device=torch.device("cpu"))
    return PretrainTask.inputs(task, batch)


def test_pretraining_step_on_latents_equals_the_pixel_step(data):
    root, cfg, tk = data
    torch.manual_seed(0)
    target, head = build_target(cfg), build_head(cfg)
    for a, b in zip(_batches(cfg, str(root / "grid"), "latents")[:2], _batches(cfg, str(root / "pixels"), "pixels")):
        ins_a, ins_b = _pretrain_inputs(cfg, "latents", None, a), _pretrain_inputs(cfg, "pixels", tk, b)
        torch.testing.assert_close(ins_a[2], ins_b[2], rtol=1e-5, atol=1e-5)
        la, _ = pretrain_loss(target, head, *ins_a, torch.Generator().manual_seed(1), cfg.pretrain.batch_mul)
        lb, _ = pretrain_loss(target, head, *ins_b, torch.Generator().manual_seed(1), cfg.pretrain.batch_mul)
        assert float(la) == pytest.approx(float(lb), rel=1e-5)
        ga = torch.autograd.grad(la, list(head.parameters()))
        gb = torch.autograd.grad(lb, list(head.parameters()))
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_joint_step_on_latents_equals_the_pixel_step(data):
    root, cfg, tk = data
    runs = {}
    for kind, shards, image in (("latents", "tokens", None), ("pixels", "pixels", tk)):
        c = apply_overrides(copy.deepcopy(cfg), [f"data.kind={kind}"])
        c, step_fn, engines, _ = _setup(c)
        trainer = types.SimpleNamespace(cfg=c, image=image, device=torch.device("cpu"))  # what JointTask.inputs reads
        gen, seen = torch.Generator().manual_seed(0), []
        for step, batch in zip((0, 3), _batches(c, str(root / shards), kind)):  # a CD step and a DMD step
            ids, mask, tokens = JointTask.inputs(trainer, batch)
            metrics = step_fn(ids, mask, tokens, step, gen)
            seen.append({k: float(v) for k, v in metrics.items() if not k.startswith("_")})
        runs[kind] = seen
    assert "cd/loss" in runs["latents"][0] and "dmd/loss" in runs["latents"][1]
    for a, b in zip(runs["latents"], runs["pixels"]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
