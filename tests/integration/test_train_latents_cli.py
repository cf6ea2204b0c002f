"""data.kind=latents end to end: launcher/pretrain_t2i.py and launcher/train_t2i.py (single process) train on a
latent cache written by data_pipelines' encode_shards, through both stages of the joint run, and export."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
FAST = ["data.batch_size=2", "data.num_workers=0", "wandb.enabled=false", "inference.num_steps=2",
        "inference.batch_size=8", "inference.student_steps=1", "data.kind=latents"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny teacher and the tiny preset's tokens of a small shapes set, cached as latent shards."""
    from fastardiff_ds.config import get_preset
    from fastardiff_ds.data.latents import encode_shards
    from fastardiff_ds.data.shards import expand_shards
    from fastardiff_ds.data.synthetic import write_shapes_dataset
    from fastardiff_ds.models import PixelPatchTokenizer, build_head, build_target, save_pretrained

    root = tmp_path_factory.mktemp("latents_cli")
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    save_pretrained(root / "teacher", cfg, build_target(cfg), build_head(cfg))
    write_shapes_dataset(str(root / "pixels"), num_samples=24, shard_size=12, resolution=32)
    tokenizer = PixelPatchTokenizer(cfg.model.image)  # (N, D) tokens, as encode_latents.py stores a VAE's
    out = encode_shards(expand_shards(str(root / "pixels")), str(root / "latents"), tokenizer, resolution=32,
                        batch_size=8)
    assert out["samples"] == 24
    return root


def launch(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    res = subprocess.run([sys.executable, str(ROOT / "launcher" / script), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    return res


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_joint_run_trains_on_latents(setup, tmp_path):
    run = tmp_path / "joint"
    launch("train_t2i.py", "--ds_config", "ds_configs/zero3.json", f"train.teacher={setup / 'teacher'}",
           f"data.shards={setup / 'latents'}", f"run_dir={run}", *FAST, "train.steps=3", "train.cd_steps=2",
           "train.gen_every=1", "train.log_every=1", "train.save_every=3", "train.tau_batches=1")
    got = rows(run)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert "cd/loss" in got[0] and "dmd/loss" in got[2] and all(math.isfinite(r["loss/ar"]) for r in got)
    meta = json.loads((run / "export" / "meta.json").read_text())
    assert meta["step"] == 3 and math.isfinite(meta["tau"])  # tau measured on the latent batches too


def test_pretraining_trains_on_latents(setup, tmp_path):
    run = tmp_path / "pretrain"
    launch("pretrain_t2i.py", f"data.shards={setup / 'latents'}", f"run_dir={run}", *FAST, "pretrain.steps=2",
           "pretrain.log_every=1", "pretrain.save_every=2", "pretrain.sample_every=2")
    got = rows(run)
    assert [r["step"] for r in got] == [1, 2] and all(math.isfinite(r["fm/loss"]) for r in got)
    assert got[-1]["consumed_samples"] == 4 and (run / "checkpoint" / "model.safetensors").is_file()
