"""The class-conditional job (launcher/pretrain_c2i.py) on 2 gloo ranks under ZeRO-3: class-labelled shards in,
a run killed after its step-2 checkpoint resumes on exactly the uninterrupted loss curve, and the export loads
and samples a class."""
from __future__ import annotations

import pytest

from _launch import killed_and_resumed
from toy import MAR_SMALL

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ["data.batch_size=4", "data.num_workers=0", "wandb.enabled=false", "pretrain.log_every=1",
          "pretrain.sample_every=0", "pretrain.steps=4", "pretrain.save_every=2", "pretrain.warmup_steps=2",
          *MAR_SMALL, "pretrain.batch_mul=2", "sampling.num_iter=2", "sampling.num_sampling_steps=4",
          "--ds_config", "ds_configs/zero3.json"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from fastardiff_ds.data.synthetic import write_shapes_dataset

    root = tmp_path_factory.mktemp("c2i")
    write_shapes_dataset(str(root / "shapes"), num_samples=64, shard_size=16, resolution=32, task="single_object")
    return root / "shapes"


def test_c2i_pretraining_resumes_exactly_on_two_ranks(shards, tmp_path):
    a, b, _ = killed_and_resumed("launcher/pretrain_c2i.py", lambda d: [f"data.shards={shards}", f"run_dir={d}",
                                                                      *COMMON], tmp_path, at=2)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("mar/loss", "mar/mask_rate", "grad_norm/model", "ema/decay"):
            assert b[step][key] == a[step][key], (step, key, a[step][key], b[step][key])
    from fastardiff_ds.inference_c2i import MARPipeline

    pipe = MARPipeline.from_pretrained(tmp_path / "ref" / "checkpoint")
    assert pipe.generate([3, 17], seed=0)[0].size == (32, 32)
