"""launcher/train_t2i.py end to end on img2dataset output as it comes (single process, world of one):
runs to the last step and exports, resampled or not, also when the data ends exactly on an epoch boundary;
without data for tau the export stores tau=-inf with a warning."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from i2d_fixture import write_img2dataset_output

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
FAST = ["data.batch_size=2", "data.num_workers=0", "train.log_every=1", "wandb.enabled=false",
        "inference.num_steps=2", "inference.batch_size=8", "inference.student_steps=1", "train.gen_every=2",
        "train.cd_steps=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny teacher + img2dataset folder: 3 shards of 6 urls (1 failed each), shard 2 cut after 2 samples."""
    from fastardiff_ds.config import get_preset
    from fastardiff_ds.models import build_head, build_target, save_pretrained

    root = tmp_path_factory.mktemp("real")
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    save_pretrained(root / "teacher", cfg, build_target(cfg), build_head(cfg))
    info = write_img2dataset_output(str(root / "i2d"), n_shards=3, per_shard=6, failed_every=5, cut_shard=2,
                                    cut_after=2)
    assert sum(info["usable"].values()) == 12  # 5 + 5 + 2: six batches of 2 per epoch
    return root


def train(setup, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    cmd = [sys.executable, str(ROOT / "launcher" / "train_t2i.py"), "--ds_config", "ds_configs/zero3.json",
           f"train.teacher={setup / 'teacher'}",
           f"data.shards={setup / 'i2d'}", f"run_dir={run_dir}", *FAST, *overrides]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    return res


def last_step(run_dir: Path) -> int:
    return max(json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines())


def test_epoch_boundary_run_exports_with_tau(setup, tmp_path):
    res = train(setup, tmp_path / "run", "train.steps=6", "train.save_every=6", "train.tau_batches=2")
    assert last_step(tmp_path / "run") == 6  # = one epoch exactly: the training iterator is spent
    meta = json.loads((tmp_path / "run" / "export" / "meta.json").read_text())
    assert math.isfinite(meta["tau"]) and meta["rows"] > 0 and meta["tau_batches"] == 2
    assert meta["tau"] == pytest.approx(0.3 * meta["shallow_entropy_mean"] - 0.1 * meta["shallow_entropy_std"])
    assert (tmp_path / "run" / "export" / "draft.safetensors").is_file()
    assert "00002.tar" in res.stderr and "scanning the tar" in res.stderr  # the interrupted shard is named


def test_resampled_run_with_samples_per_epoch_from_the_cli_exports(setup, tmp_path):
    train(setup, tmp_path / "run", "data.resampled=true", "data.samples_per_epoch=8", "train.steps=4",
          "train.save_every=4", "train.tau_batches=1")
    assert last_step(tmp_path / "run") == 4
    meta = json.loads((tmp_path / "run" / "export" / "meta.json").read_text())
    assert math.isfinite(meta["tau"]) and meta["rows"] > 0


def test_no_tau_data_still_exports_with_minus_inf(setup, tmp_path):
    res = train(setup, tmp_path / "run", "train.steps=2", "train.save_every=2", "train.tau_batches=0")
    meta = json.loads((tmp_path / "run" / "export" / "meta.json").read_text())
    assert meta["tau"] == -math.inf and meta["rows"] == 0 and "tau=-inf" in res.stderr
    assert (tmp_path / "run" / "export" / "student_head.safetensors").is_file()
