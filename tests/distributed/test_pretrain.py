"""Stage-0 pretraining on the shared loop: one plain `python` process (no launcher) and 2 gloo ranks under the
deepspeed runner. A run killed after its step-3 checkpoint resumes on exactly the uninterrupted loss curve, and
the exported teacher holds the EMA weights (equal to the checkpoint's EMA, different from the raw weights)."""
from __future__ import annotations

import json

import pytest
import torch

from _launch import metrics_by_step as _rows, run, run_until

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ["data.batch_size=2", "data.num_workers=0", "wandb.enabled=false", "pretrain.log_every=1",
          "pretrain.sample_every=0", "pretrain.steps=6", "pretrain.save_every=3", "pretrain.warmup_steps=2",
          "pretrain.lr=1e-3", "pretrain.ema_decay=0.9", "pretrain.batch_mul=2",
          "inference.num_steps=2", "inference.batch_size=8"]
LAUNCH = {"python": 0, "deepspeed2": 2}  # 0: plain `python launcher/pretrain_t2i.py`, world size 1


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from fastardiff_ds.data.synthetic import write_shapes_dataset

    root = tmp_path_factory.mktemp("pretrain")
    write_shapes_dataset(str(root / "shapes"), num_samples=64, shard_size=16, resolution=32)
    return root / "shapes"


def _args(shapes, run_dir, *extra):
    return [f"data.shards={shapes}", f"run_dir={run_dir}", *COMMON, *extra]



@pytest.mark.parametrize("launch", list(LAUNCH))
def test_pretraining_resumes_exactly_and_exports_the_ema(shapes, tmp_path, launch):
    ranks = LAUNCH[launch]
    ref = run("launcher/pretrain_t2i.py", _args(shapes, tmp_path / "ref"), num_ranks=ranks)
    assert ref.returncode == 0, ref.stdout[-5000:]
    assert f'"world_size": {max(ranks, 1)}' in ref.stdout
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    run_until("launcher/pretrain_t2i.py", _args(shapes, tmp_path / "killed"), num_ranks=ranks,
              done=lambda: latest.is_file() and latest.read_text().strip() == "step_000003")
    assert latest.read_text().strip() == "step_000003"
    res = run("launcher/pretrain_t2i.py", _args(shapes, tmp_path / "killed", "--resume", "auto"), num_ranks=ranks)
    assert res.returncode == 0, res.stdout[-5000:]
    assert '"resumed_at_step": 3' in res.stdout
    a, b = _rows(tmp_path / "ref" / "metrics.jsonl"), _rows(tmp_path / "killed" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):  # the same data, noise, optimizer state and EMA: bit-identical on CPU
        for key in ("fm/loss", "fm/t_mean", "grad_norm/model", "lr/model", "ema/decay"):
            assert b[step][key] == a[step][key], (step, key, a[step][key], b[step][key])
    _check_export_is_ema(tmp_path / "ref")


def _check_export_is_ema(run_dir):
    """export model.safetensors (NextStep layout) == the last checkpoint's EMA module != the engine's raw weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    meta = json.loads((run_dir / "checkpoint" / "meta.json").read_text())
    assert meta["weights"] == "ema" and meta["step"] == 6
    export = load_file(str(run_dir / "checkpoint" / "model.safetensors"))
    ckpt = run_dir / "checkpoints" / "step_000006"
    ema = load_file(str(ckpt / "modules" / "ema.safetensors"))
    raw = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="model")

    def ours(key):  # NextStep layout -> the engine's Dispatch(PretrainNet) key
        return "inner.head." + key.removeprefix("image_head.") if key.startswith("image_head.") else "inner.ar." + key

    assert len(export) > 10
    differs = 0
    for key, value in export.items():
        assert torch.equal(value, ema[ours(key)]), key
        differs += not torch.equal(value, raw[ours(key)].to(value.dtype))
    assert differs > len(export) // 2, f"only {differs} of {len(export)} exported tensors differ from the raw weights"
