"""The joint Fast-ARDiff run on 2 CPU ranks: every stage runs with finite losses, ZeRO-3 shards the four
trainable networks and the teacher its own group, and a run killed mid-way resumes on the same loss curve."""
from __future__ import annotations

import json
import math

import pytest
import torch

from _launch import metrics_by_step as _rows, run, run_until

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ["data.batch_size=2", "data.num_workers=0", "train.log_every=1", "train.tau_batches=1",
          "wandb.enabled=false", "inference.num_steps=2", "inference.batch_size=8", "inference.student_steps=1",
          "train.gen_every=2", "train.cd_steps=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny teacher checkpoint and a small shapes set shared by the tests of this module."""
    from fastardiff_ds.config import get_preset
    from fastardiff_ds.data.synthetic import write_shapes_dataset
    from fastardiff_ds.models import build_head, build_target, save_pretrained

    root = tmp_path_factory.mktemp("joint")
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    head = build_head(cfg)
    for p in head.parameters():  # a non-trivial teacher head (the real one's output layer is not zero)
        torch.nn.init.normal_(p, std=0.02)
    save_pretrained(root / "teacher", cfg, build_target(cfg), head)
    write_shapes_dataset(str(root / "shapes"), num_samples=64, shard_size=16, resolution=32)
    return root



def _args(setup, run_dir, *extra):
    return ["--ds_config", "ds_configs/zero3.json", f"train.teacher={setup / 'teacher'}",
            f"data.shards={setup / 'shapes'}", f"run_dir={run_dir}", *COMMON, *extra]


@pytest.mark.parametrize("group_size,draft_kind", [(1, "truncated"), (2, "eagle")])
def test_all_stages_run_and_shard(setup, tmp_path, group_size, draft_kind):
    # the feature-level draft reads the partitioned teacher's hidden states: the same pass, under ZeRO-3
    res = run("launcher/train_t2i.py", _args(setup, tmp_path / "run", "train.steps=5", "train.save_every=5",
                                             "train.target_ar=true", f"train.teacher_group_size={group_size}",
                                             f"model.draft.kind={draft_kind}"))
    assert res.returncode == 0, res.stdout[-5000:]
    report = next(json.loads(l) for l in res.stdout.splitlines() if l.startswith('{"fresh_run"'))["partitions"]
    from fastardiff_ds.config import get_preset
    from fastardiff_ds.models import DraftAR, build_head, build_target, count_params

    cfg = get_preset("tiny")
    cfg.model.draft.kind = draft_kind
    full = {"target": count_params(build_target(cfg)), "draft": count_params(DraftAR(cfg.model)),
            "student": count_params(build_head(cfg, student=True)), "fake": count_params(build_head(cfg))}
    teacher_full = full["target"] + count_params(build_head(cfg))
    for r in report:  # each rank holds ~1/2 of every trainable network, 1/group_size of the teacher
        for name, n in full.items():
            assert abs(r[name] - n / 2) <= 0.02 * n, (name, r[name], n)
        assert abs(r["teacher"] - teacher_full / group_size) <= 0.02 * teacher_full
        assert r["teacher_group_size"] == group_size
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert {r["stage"] for r in rows.values()} == {0.0, 1.0}  # CD steps then DMD steps
    for r in rows.values():
        for k, v in r.items():
            if isinstance(v, float):
                assert math.isfinite(v), (k, v)
    assert any("dmd/loss" in r for r in rows.values()) and any("fake/loss" in r for r in rows.values())
    lr_draft = cfg.train.lr_draft
    for r in rows.values():  # train.alpha_mode=lr: alpha(t) is on the draft's lr, and every step is measured
        assert r["lr/draft"] == pytest.approx(lr_draft * r["alpha"], rel=1e-6), r["step"]
        assert r["update/draft"] > 0 and r["update/fake" if r["stage"] else "update/student"] > 0, r["step"]
    meta = json.loads((tmp_path / "run" / "export" / "meta.json").read_text())
    assert math.isfinite(meta["tau"]) and (tmp_path / "run" / "export" / "student_head.safetensors").is_file()


def test_kill_and_resume_continues_the_same_loss_curve(setup, tmp_path):
    # with the exported student an EMA (train.student_ema_decay): a checkpointed module that must resume too
    steps = ["train.steps=6", "train.save_every=3", "train.student_ema_decay=0.5"]
    ref = run("launcher/train_t2i.py", _args(setup, tmp_path / "ref", *steps))
    assert ref.returncode == 0, ref.stdout[-5000:]
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    run_until("launcher/train_t2i.py", _args(setup, tmp_path / "killed", *steps),
              done=lambda: latest.is_file() and latest.read_text().strip() == "step_000003")
    assert latest.read_text().strip() == "step_000003"
    res = run("launcher/train_t2i.py", _args(setup, tmp_path / "killed", *steps, "--resume", "auto"))
    assert res.returncode == 0, res.stdout[-5000:]
    assert '"resumed_at_step": 3' in res.stdout
    a, b = _rows(tmp_path / "ref" / "metrics.jsonl"), _rows(tmp_path / "killed" / "metrics.jsonl")
    compared = set()
    for step in (4, 5, 6):  # every logged loss: draft (reg, ent), student (dmd), fake score
        keys = [k for k in a[step] if "loss" in k]
        assert set(keys) == {k for k in b[step] if "loss" in k}, step
        for key in keys:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
        compared.update(keys)
    assert {"reg/loss", "ent/loss", "loss/ar", "fake/loss", "dmd/loss"} <= compared, compared
    from safetensors.torch import load_file

    heads = [load_file(str(tmp_path / r / "export" / "student_head.safetensors")) for r in ("ref", "killed")]
    ema = load_file(str(tmp_path / "ref" / "checkpoints" / "step_000006" / "modules" / "student_ema.safetensors"))
    ema = {k.removeprefix("inner."): v for k, v in ema.items()}
    assert json.loads((tmp_path / "killed" / "export" / "meta.json").read_text())["student_weights"] == "ema"
    for k, v in heads[0].items():  # the export is the EMA, and the resumed run's EMA is the uninterrupted one's
        torch.testing.assert_close(heads[1][k], v, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(v.float(), ema[k].float(), rtol=0, atol=0)
