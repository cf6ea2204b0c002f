"""The class-conditional main job (launcher/train_c2i.py, DMD of the DiffLoss head) on 2 gloo ranks under ZeRO-3:
a run killed after its step-2 checkpoint resumes on exactly the uninterrupted loss curve, and the export samples
in mode dmd. The teacher is a tiny MAR export written here (the job reads any launcher/pretrain_c2i.py export)."""
from __future__ import annotations

import pytest

from _launch import killed_and_resumed
from toy import MAR_SMALL, tiny_mar_export

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ["data.batch_size=4", "data.num_workers=0", "wandb.enabled=false", "distill.log_every=1", "distill.steps=4",
          "distill.save_every=2", "distill.gen_every=2", "distill.guidance=2.0", *MAR_SMALL,
          "--ds_config", "ds_configs/zero3.json"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fastardiff_ds.data.synthetic import write_shapes_dataset

    root = tmp_path_factory.mktemp("c2i_dmd")
    write_shapes_dataset(str(root / "shapes"), num_samples=64, shard_size=16, resolution=32, task="single_object")
    tiny_mar_export(root / "teacher", jitter=0.05)  # a non-trivial head (adaLN-zero would make eps = 0)
    return root


def test_c2i_distillation_resumes_exactly_on_two_ranks(setup, tmp_path):
    a, b, ref = killed_and_resumed("launcher/train_c2i.py", lambda d: [
        f"data.shards={setup / 'shapes'}", f"distill.teacher={setup / 'teacher'}", f"run_dir={d}", *COMMON],
        tmp_path, at=2)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    # the generator every gen_every = 2 steps (loop steps 0, 2): its last metrics are carried on the rows between
    assert a[2]["dmd/t_mean"] == a[1]["dmd/t_mean"] and a[3]["dmd/t_mean"] != a[2]["dmd/t_mean"]
    for step in (3, 4):
        for key in ("fake/loss", "grad_norm/fake"):
            assert b[step][key] == a[step][key], (step, key, a[step][key], b[step][key])
    assert b[3]["dmd/loss"] == a[3]["dmd/loss"]
    from fastardiff_ds.inference_c2i import MARPipeline

    pipe = MARPipeline.from_pretrained(ref / "export", mode="dmd")
    assert pipe.mode == "dmd" and pipe.student_steps == 4
    assert pipe.generate([3, 17], seed=0)[0].size == (32, 32)
    with pytest.raises(ValueError, match="guidance"):
        pipe.generate_tokens([3], seed=0, cfg=2.0)
