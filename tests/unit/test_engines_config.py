"""Engine layer without processes: DeepSpeed dicts, specs and lr schedule, memory estimates, checkpoint
bookkeeping (resume resolution, rotation, RNG), all single-process and fast."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn as nn

from fastardiff_ds.engines import (EngineSpec, default_lr_lambda, estimate_memory, inference_ds_config,
                                   load_ds_config, nextstep_large_table, train_ds_config)
from fastardiff_ds.engines.checkpoint import (capture_rng_state, load_checkpoint, resolve_resume,
                                              restore_rng_state, rotate)
from fastardiff_ds.engines.ds_config import check_engine_knobs_only
from fastardiff_ds.engines.engine import param_groups
from fastardiff_ds.engines.memory import NEXTSTEP_LARGE, NetSize, count_params, qwen2_size


@pytest.mark.parametrize("name, stage", [("zero3", 3), ("zero3_offload", 3), ("zero2", 2)])
def test_shipped_configs_hold_engine_knobs_only(name, stage):
    base = load_ds_config(name)
    assert base["zero_optimization"]["stage"] == stage and base["bf16"]["enabled"] == "auto"
    assert base["wandb"] == {"enabled": False} and "gradient_clipping" in base
    check_engine_knobs_only(base)


def test_batch_size_and_clip_injected_from_config():
    cfg = train_ds_config(load_ds_config("zero3"), micro_batch=4, grad_accum=3, world_size=16, device_type="cpu",
                          grad_clip=0.5, zero_stage=2, zero_overrides={"reduce_bucket_size": 7})
    assert cfg["train_batch_size"] == 4 * 3 * 16 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3 and cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["zero_optimization"]["reduce_bucket_size"] == 7
    assert cfg["bf16"]["enabled"] is False and cfg["zero_allow_untested_optimizer"] is True
    assert load_ds_config("zero3")["zero_optimization"]["stage"] == 3  # the base is not mutated


def test_bf16_auto_and_explicit():
    base = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    assert train_ds_config(base, micro_batch=1, grad_accum=1, world_size=1, device_type="cpu")["bf16"]["enabled"]


def test_inference_config_has_no_world_batch_or_optimizer_offload():
    cfg = inference_ds_config(load_ds_config("zero3_offload"), micro_batch=2, device_type="cpu")
    assert "train_batch_size" not in cfg and cfg["zero_optimization"]["stage"] == 3
    assert "offload_optimizer" not in cfg["zero_optimization"] and "gradient_clipping" not in cfg


def test_json_with_batch_or_optimizer_is_rejected(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 8, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="train_batch_size"):
        load_ds_config(bad)
    with pytest.raises(FileNotFoundError, match="zero3"):
        load_ds_config("zero4")


def test_lr_schedule_known_values():
    fn = default_lr_lambda(EngineSpec("x", lr=1.0, warmup=4, total_steps=104, min_lr_ratio=0.1))
    assert [fn(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert fn(54) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert fn(104) == pytest.approx(0.1) and fn(500) == pytest.approx(0.1)
    const = default_lr_lambda(EngineSpec("y", lr=1.0, warmup=0, schedule="constant"))
    assert const(0) == const(10**6) == 1.0
    assert default_lr_lambda(EngineSpec("z", lr=1.0, total_steps=8))(2) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 2 / 8)))


@pytest.mark.parametrize("kwargs", [dict(lr=0.0), dict(lr=1e-3, schedule="linear"), dict(lr=1e-3, warmup=5),
                                    dict(lr=1e-3, warmup=-1, schedule="constant")])
def test_engine_spec_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="EngineSpec"):
        EngineSpec("bad", **kwargs)


def test_weight_decay_only_on_matrices():
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    decay, rest = param_groups(m, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 3)] and decay["weight_decay"] == 0.1
    assert len(rest["params"]) == 3 and rest["weight_decay"] == 0.0


def test_lr_groups_give_a_prefix_its_own_lr_and_keep_weight_decay_rules():
    m = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 1)))
    groups = param_groups(m, 0.1, (("1.", 1e-3),))
    by = {(g.get("lr"), g["weight_decay"]): [p.shape for p in g["params"]] for g in groups}
    assert by == {(None, 0.1): [(4, 3)], (None, 0.0): [(4,)], (1e-3, 0.1): [(1, 4)], (1e-3, 0.0): [(4,), (4,), (1,)]}
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    with pytest.raises(ValueError, match="'head.\\*'"):
        param_groups(m, 0.1, (("head.", 1e-3),))
    with pytest.raises(ValueError, match="lr_groups"):
        EngineSpec("bad", lr=1e-3, lr_groups=(("1.", 0.0),))


def test_memory_estimate_matches_deepspeed_formulas():
    gib = 2**30
    est = estimate_memory({"t": (10**9, 10**8), "f": NetSize(10**9, 10**8, trainable=False, group_size=4)},
                          num_gpus_per_node=8, num_nodes=2)
    assert est["t"]["gpu_bytes"] == 4 * 10**8 + 18 * 10**9 // 16  # largest layer + 18 B/param / GPUs
    assert est["f"]["gpu_bytes"] == 2 * 10**9 // 4 + 2 * 10**8  # bf16 shard over its group + one layer
    assert est["total_gpu_bytes"] == est["t"]["gpu_bytes"] + est["f"]["gpu_bytes"]
    off = estimate_memory({"t": (10**9, 10**8)}, 8, 2, offload_optimizer=True)
    assert off["t"]["gpu_bytes"] == 4 * 10**8 + 2 * 10**9 // 16 and off["t"]["gpu_bytes"] < 1.0 * gib


def test_param_count_on_meta_matches_transformers_qwen2():
    """The analytic Qwen2 size equals a real (meta-device) Qwen2.5-14B-shaped model, tied params once."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = NEXTSTEP_LARGE
    cfg = Qwen2Config(hidden_size=c["hidden"], num_hidden_layers=2, num_attention_heads=c["heads"],
                      num_key_value_heads=c["kv_heads"], intermediate_size=c["intermediate"],
                      vocab_size=c["vocab"], tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    assert count_params(model) == qwen2_size(**{**c, "layers": 2})
    assert 14.6e9 < qwen2_size(**c)[0] < 14.9e9  # Qwen2.5-14B: 14.7B parameters
    with torch.device("meta"):
        tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert count_params(tied) == (40, 40)


def test_nextstep_large_table_shrinks_with_nodes():
    table = nextstep_large_table()
    rows = [r for r in table.splitlines() if r.startswith("| ") and r[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "2", "4", "8"]
    trainable = [float(r.split("|")[3].split()[0]) for r in rows]
    assert trainable == sorted(trainable, reverse=True) and trainable[0] > 2 * trainable[-1]


def _fake_ckpt(root, step, complete=True, world_size=1):
    d = root / f"step_{step:06d}"
    d.mkdir(parents=True)
    if complete:
        (d / "manifest.json").write_text(json.dumps({"step": step, "engines": [], "modules": [],
                                                     "world_size": world_size}))
    return d


def test_resume_resolution_and_errors(tmp_path):
    assert resolve_resume(tmp_path, "none") is None and resolve_resume(tmp_path, "auto") is None
    good, broken = _fake_ckpt(tmp_path, 10), _fake_ckpt(tmp_path, 20, complete=False)
    (tmp_path / "latest").write_text(good.name)
    assert resolve_resume(tmp_path, "auto") == good and resolve_resume(tmp_path, str(good)) == good
    with pytest.raises(FileNotFoundError, match=r"step_000020.*resume from one of \['step_000010'\]"):
        resolve_resume(tmp_path, broken.name)
    (tmp_path / "latest").write_text("step_000099")  # names a missing checkpoint: the newest intact one is used
    assert resolve_resume(tmp_path, "auto") == good


def test_load_from_other_world_size_needs_every_rank_file_and_missing_engines_are_named(tmp_path):
    ckpt = _fake_ckpt(tmp_path, 5, world_size=4)
    with pytest.raises(FileNotFoundError, match="rank_00000.pt is missing"):
        load_checkpoint(ckpt, {})  # another world size is re-split, not refused: it reads every rank's client file
    with pytest.raises(KeyError, match="target"):
        load_checkpoint(ckpt, {"target": object()})


def test_rotation_keeps_newest_complete(tmp_path):
    for s in (1, 2, 3, 4):
        _fake_ckpt(tmp_path, s)
    stale = tmp_path / "step_000000"
    stale.mkdir()
    (tmp_path / "latest").write_text("step_000004")
    rotate(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000003", "step_000004"]


def test_rng_round_trip():
    state = capture_rng_state()
    a = (random.random(), torch.rand(2))
    restore_rng_state(state)
    b = (random.random(), torch.rand(2))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_teacher_group_size_must_divide_world():
    from fastardiff_ds.engines.groups import contiguous_groups

    with pytest.raises(ValueError, match="teacher.group_size=2 must divide the world size 1"):
        contiguous_groups(2)
    assert contiguous_groups(1) == (None, [0])  # no process group: a world of one


def test_mpu_scope_restores_deepspeed_global():
    from deepspeed.utils import groups

    from fastardiff_ds.engines.groups import mpu_scope

    before, marker = groups.mpu, object()
    with pytest.raises(RuntimeError):
        with mpu_scope(marker):
            assert groups.mpu is marker
            raise RuntimeError
    assert groups.mpu is before


def test_gpu_engines_use_a_client_torch_adamw_except_under_zero_offload():
    """No JIT-built FusedAdam on a GPU: its first build needs nvcc and fails where TORCH_CUDA_ARCH_LIST holds
    '9.0a' (seen on a lent H200); only ZeRO-Offload keeps DeepSpeed's own (CPU) Adam."""
    from fastardiff_ds.engines.ds_config import client_optimizer

    for name, client in (("zero2", True), ("zero3", True), ("zero3_offload", False)):
        cfg = train_ds_config(load_ds_config(name), micro_batch=2, grad_accum=1, world_size=8, device_type="cuda")
        assert client_optimizer(cfg, "cuda") is client, name
        assert cfg.get("zero_allow_untested_optimizer", False) is client, name
        cpu = train_ds_config(load_ds_config(name), micro_batch=2, grad_accum=1, world_size=8, device_type="cpu")
        assert client_optimizer(cpu, "cpu") and cpu["zero_allow_untested_optimizer"] is True, name


def test_checkpoint_networks_this_run_does_not_build_are_named_in_a_warning(tmp_path, caplog):
    ckpt = tmp_path / "step_000005"
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text(json.dumps({"step": 5, "engines": ["fake"], "modules": ["student_ema"],
                                                    "world_size": 1}))
    with caplog.at_level("WARNING", logger="fastardiff_ds.engines.checkpoint"):
        with pytest.raises(FileNotFoundError):  # the stand-in has no client file; the check comes before loading
            load_checkpoint(ckpt, {}, modules={})
    assert "['fake', 'student_ema']" in caplog.text and "not loaded" in caplog.text
