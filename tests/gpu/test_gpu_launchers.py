"""Launchers on one GPU: the main job with all four trainable engines (target AR too) over NCCL, and compiled
decoding (static KV cache + CUDA graphs, inference.compile=true) drawing the same images as eager decoding."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _gpu import free_port, gpu_env

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd, timeout=400):
    res = subprocess.run(cmd, cwd=ROOT, env=gpu_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    return res.stdout


@pytest.mark.timeout(500)
def test_main_job_with_the_target_ar_trains_on_nccl(tmp_path):
    from fastardiff_ds.data.synthetic import write_shapes_dataset

    write_shapes_dataset(str(tmp_path / "shapes"), num_samples=64, shard_size=16, resolution=32)
    runner = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port())]
    _run([*runner, str(ROOT / "launcher/train_t2i.py"), "--ds_config", "ds_configs/zero3.json",
          f"run_dir={tmp_path / 'run'}", f"data.shards={tmp_path / 'shapes'}", "train.target_ar=true",
          "train.steps=6", "train.cd_steps=3", "train.save_every=6", "train.log_every=1", "train.tau_batches=1",
          "data.batch_size=8", "wandb.enabled=false"])
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


@pytest.mark.timeout(500)
def test_compiled_generation_draws_the_eager_images(tmp_path):
    def generate(name, *extra):
        _run([sys.executable, str(ROOT / "launcher/generate.py"), "--ckpt", "assets/tiny_teacher", "--num-images", "2",
              "--prompt", "a photo of a red circle", "--out", str(tmp_path / name), *extra])
        return [np.asarray(Image.open(p), dtype=np.float64) for p in sorted((tmp_path / name).glob("0*.png"))]

    eager, compiled = generate("eager"), generate("compiled", "inference.compile=true")
    assert len(eager) == len(compiled) == 2
    for a, b in zip(eager, compiled):  # same seeds; float32 kernels differ in summation order only
        assert np.abs(a - b).mean() < 2.0, np.abs(a - b).mean()
