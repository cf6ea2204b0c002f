"""The class-conditional job (launcher/pretrain_c2i.py) on 2 gloo ranks under ZeRO-3: class-labelled shards in,
a run killed after its step-2 checkpoint resumes on exactly the uninterrupted loss curve, and the export loads
and samples a class."""
from __future__ import annotations

import pytest

from _launch import metrics_by_step as _rows, run, run_until

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ["data.batch_size=4", "data.num_workers=0", "wandb.enabled=false", "pretrain.log_every=1",
          "pretrain.sample_every=0", "pretrain.steps=4", "pretrain.save_every=2", "pretrain.warmup_steps=2",
          "model.enc_dim=32", "model.dec_dim=32", "model.enc_depth=1", "model.dec_depth=1", "model.diffloss_w=32",
          "model.diffloss_d=1", "pretrain.batch_mul=2", "sampling.num_iter=2", "sampling.num_sampling_steps=4",
          "--ds_config", "ds_configs/zero3.json"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from fastardiff_ds.data.synthetic import write_shapes_dataset

    root = tmp_path_factory.mktemp("c2i")
    write_shapes_dataset(str(root / "shapes"), num_samples=64, shard_size=16, resolution=32, task="single_object")
    return root / "shapes"


def test_c2i_pretraining_resumes_exactly_on_two_ranks(shards, tmp_path):
    args = lambda d, *x: [f"data.shards={shards}", f"run_dir={d}", *COMMON, *x]  # noqa: E731
    ref = run("launcher/pretrain_c2i.py", args(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stdout[-5000:]
    assert '"world_size": 2' in ref.stdout
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    run_until("launcher/pretrain_c2i.py", args(tmp_path / "killed"),
              done=lambda: latest.is_file() and latest.read_text().strip() == "step_000002")
    res = run("launcher/pretrain_c2i.py", args(tmp_path / "killed", "--resume", "auto"))
    assert res.returncode == 0, res.stdout[-5000:]
    assert '"resumed_at_step": 2' in res.stdout
    a, b = _rows(tmp_path / "ref" / "metrics.jsonl"), _rows(tmp_path / "killed" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("mar/loss", "mar/mask_rate", "grad_norm/model", "ema/decay"):
            assert b[step][key] == a[step][key], (step, key, a[step][key], b[step][key])
    from fastardiff_ds.inference_c2i import MARPipeline

    pipe = MARPipeline.from_pretrained(tmp_path / "ref" / "checkpoint")
    assert pipe.generate([3, 17], seed=0)[0].size == (32, 32)
