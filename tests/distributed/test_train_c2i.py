"""The class-conditional main job (launcher/train_c2i.py, DMD of the DiffLoss head) on 2 gloo ranks under ZeRO-3:
a run killed after its step-2 checkpoint resumes on exactly the uninterrupted loss curve, and the export samples
in mode dmd. The teacher is a tiny MAR export written here (the job reads any launcher/pretrain_c2i.py export)."""
from __future__ import annotations

import pytest
import torch

from _launch import metrics_by_step as _rows, run, run_until

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SIZE = ["model.enc_dim=32", "model.dec_dim=32", "model.enc_depth=1", "model.dec_depth=1", "model.diffloss_w=32",
        "model.diffloss_d=1"]
COMMON = ["data.batch_size=4", "data.num_workers=0", "wandb.enabled=false", "distill.log_every=1", "distill.steps=4",
          "distill.save_every=2", "distill.gen_every=2", "distill.guidance=2.0", *SIZE,
          "--ds_config", "ds_configs/zero3.json"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fastardiff_ds.config.c2i import resolve_c2i_config
    from fastardiff_ds.data.synthetic import write_shapes_dataset
    from fastardiff_ds.models.mar import MAR
    from fastardiff_ds.models.mar_checkpoint import save_mar_export

    root = tmp_path_factory.mktemp("c2i_dmd")
    write_shapes_dataset(str(root / "shapes"), num_samples=64, shard_size=16, resolution=32, task="single_object")
    cfg = resolve_c2i_config("mar-tiny", overrides=SIZE)
    torch.manual_seed(0)
    mar = MAR(cfg.model)
    mar.init_weights()
    with torch.no_grad():
        for p in mar.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a non-trivial head (adaLN-zero would make eps = 0)
    save_mar_export(root / "teacher", cfg, mar.state_dict())
    return root


def test_c2i_distillation_resumes_exactly_on_two_ranks(setup, tmp_path):
    args = lambda d, *x: [f"data.shards={setup / 'shapes'}", f"distill.teacher={setup / 'teacher'}",  # noqa: E731
                          f"run_dir={d}", *COMMON, *x]
    ref = run("launcher/train_c2i.py", args(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stdout[-5000:]
    assert '"world_size": 2' in ref.stdout
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    run_until("launcher/train_c2i.py", args(tmp_path / "killed"),
              done=lambda: latest.is_file() and latest.read_text().strip() == "step_000002")
    res = run("launcher/train_c2i.py", args(tmp_path / "killed", "--resume", "auto"))
    assert res.returncode == 0, res.stdout[-5000:]
    assert '"resumed_at_step": 2' in res.stdout
    a, b = _rows(tmp_path / "ref" / "metrics.jsonl"), _rows(tmp_path / "killed" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    # the generator every gen_every = 2 steps (loop steps 0, 2): its last metrics are carried on the rows between
    assert a[2]["dmd/t_mean"] == a[1]["dmd/t_mean"] and a[3]["dmd/t_mean"] != a[2]["dmd/t_mean"]
    for step in (3, 4):
        for key in ("fake/loss", "grad_norm/fake"):
            assert b[step][key] == a[step][key], (step, key, a[step][key], b[step][key])
    assert b[3]["dmd/loss"] == a[3]["dmd/loss"]
    from fastardiff_ds.inference_c2i import MARPipeline

    pipe = MARPipeline.from_pretrained(tmp_path / "ref" / "export", mode="dmd")
    assert pipe.mode == "dmd" and pipe.student_steps == 4
    assert pipe.generate([3, 17], seed=0)[0].size == (32, 32)
    with pytest.raises(ValueError, match="guidance"):
        pipe.generate_tokens([3], seed=0, cfg=2.0)
