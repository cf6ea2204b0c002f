"""2 CPU ranks (gloo, 127.0.0.1): ZeRO-3 sharding of several engines, the teacher's own group, EMA, export.

One spawn runs every scenario (DeepSpeed start-up dominates the cost); each rank saves its findings and
the assertions run in the pytest process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(420)]

WORLD = 2
NO_PERSIST = {"stage3_param_persistence_threshold": 0}  # tiny test nets would otherwise stay unpartitioned


def run_ranks(fn, out_dir: Path, *args, world: int = WORLD, timeout_s: float = 360.0) -> list[dict]:
    """Run ``fn(rank, world, port, out_dir, *args)`` on ``world`` spawned ranks; kill them on timeout."""
    from fastardiff_ds.engines.dist import free_port

    ctx = mp.start_processes(_closing, args=(fn, world, free_port(), str(out_dir), *args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} did not finish on {world} ranks in {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out_dir / f"rank_{r}.pt", weights_only=False) for r in range(world)]


def _closing(rank: int, fn, *args) -> None:
    """Run a rank's worker, then tear its process group down, so no rank exits with gloo's threads alive."""
    from fastardiff_ds.engines import shutdown

    fn(rank, *args)
    shutdown()


def setup_rank(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from fastardiff_ds.engines import init_distributed

    init_distributed(timeout_s=120)


def mlp(seed: int, d_in: int = 8, d_hidden: int = 16, d_out: int = 4):
    def build() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))

    return build


def batches(rank: int, n: int, micro: int = 2):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(micro, 8, generator=g) for _ in range(n)]


def full_weights(module: nn.Module) -> torch.Tensor:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def _train_with_teacher(base, group_size: int, order: str, rank: int, steps: int = 3):
    """Train a student on ``(student(x) - teacher(x))^2``; returns (student engine, teacher, losses)."""
    from fastardiff_ds.engines import EngineSpec, build_engine, build_teacher

    spec = EngineSpec("student", lr=1e-2, weight_decay=0.1, warmup=2, total_steps=10, zero_overrides=NO_PERSIST)
    teacher = None
    if order == "before":
        teacher = build_teacher(mlp(1), base, micro_batch=2, group_size=group_size, zero_overrides=NO_PERSIST)
    student = build_engine(mlp(2), spec, base, micro_batch=2, grad_accum=1, world_size=WORLD)
    if order == "after":
        teacher = build_teacher(mlp(1), base, micro_batch=2, group_size=group_size, zero_overrides=NO_PERSIST)
    losses = []
    for x in batches(rank, steps):
        loss = 10 * ((student(x) - teacher(x)) ** 2).mean()  # x10: grad norm > 1, so clipping acts
        student.backward(loss)
        student.step()
        losses.append(loss.item())
    return student, teacher, losses


def sharding_worker(rank, world, port, out_dir):
    setup_rank(rank, world, port)
    from fastardiff_ds.engines import (EMA, EngineSpec, build_engine, build_frozen, build_teacher,
                                       export_safetensors, load_ds_config, load_gathered_state_dict)

    base, res = load_ds_config("zero3"), {}
    for gs in (1, 2):
        for order in ("before", "after"):
            student, teacher, losses = _train_with_teacher(base, gs, order, rank)
            res[(gs, order)] = {"weights": full_weights(student.module), "losses": losses,
                                "teacher_numel": teacher.partition_numel(), "teacher_ranks": teacher.ranks,
                                "student_numel": student.partition_numel(), "lr": student.lr,
                                "grad_norm": student.grad_norm, "student_dp": student.ds.dp_world_size,
                                "teacher_dp": teacher.ds.dp_world_size}
    # Several engines at once: a bigger "draft" (ZeRO-3) and a "head" at ZeRO-2 (replicated params).
    draft = build_engine(mlp(3, 8, 64, 8), EngineSpec("draft", lr=1e-3, schedule="constant",
                                                      zero_overrides=NO_PERSIST), base, micro_batch=2, grad_accum=1)
    head = build_engine(mlp(4), EngineSpec("head", lr=1e-3, schedule="constant", zero_stage=2), base,
                        micro_batch=2, grad_accum=1)
    res["draft_numel"], res["head_numel"] = draft.partition_numel(), head.partition_numel()
    # Gradient accumulation: 2 micro-batches of 2 with grad_accum=2 == 1 micro-batch of 4 (same global batch).
    x4 = batches(rank, 1, micro=4)[0]
    spec = EngineSpec("acc", lr=1e-2, schedule="constant", zero_overrides=NO_PERSIST)
    acc = build_engine(mlp(8), spec, base, micro_batch=2, grad_accum=2)
    for half in (x4[:2], x4[2:]):
        acc.backward((acc(half) ** 2).mean())
        acc.step()
    one = build_engine(mlp(8), spec, base, micro_batch=4, grad_accum=1)
    one.backward((one(x4) ** 2).mean())
    one.step()
    res["acc"], res["one"] = full_weights(acc.module), full_weights(one.module)
    # A replicated teacher gives the same outputs as a partitioned one, holding every parameter.
    rep = build_teacher(mlp(1), base, micro_batch=2, group_size=2, replicate=True)
    part = build_teacher(mlp(1), base, micro_batch=2, group_size=2, zero_overrides=NO_PERSIST)
    res["rep_numel"], res["rep_out"], res["part_out"] = rep.partition_numel(), rep(x4), part(x4)
    # EMA: into a frozen copy partitioned like the student (shard-local path) and a replicated copy
    # (GatheredParameters path); the reference is computed on gathered weights.
    student = build_engine(mlp(2), EngineSpec("s", lr=1e-2, schedule="constant", zero_overrides=NO_PERSIST),
                           base, micro_batch=2, grad_accum=1)
    ema_sharded = build_frozen("ema", mlp(5), base, micro_batch=2, zero_overrides=NO_PERSIST)
    ema_plain = mlp(6)()
    emas = [EMA(student, ema_sharded), EMA(student, ema_plain)]
    ref = None
    for i, x in enumerate(batches(rank, 3)):
        student.backward((student(x) ** 2).mean())
        student.step()
        decay = 0.0 if i == 0 else 0.9
        w = full_weights(student.module)
        ref = w.clone() if ref is None else decay * ref + (1 - decay) * w
        for ema in emas:
            ema.update(decay)
    res["ema_ref"], res["ema_sharded"] = ref, full_weights(ema_sharded.module)
    res["ema_plain"] = torch.cat([p.detach().flatten() for p in ema_plain.parameters()])
    res["ema_sharded_numel"] = ema_sharded.partition_numel()
    # Export gathers the shards on rank 0; loading it into a fresh partitioned module restores them.
    path = export_safetensors(student, Path(out_dir) / "student.safetensors")
    res["student_full"] = full_weights(student.module)
    fresh = build_frozen("fresh", mlp(7), base, micro_batch=2, zero_overrides=NO_PERSIST)
    load_gathered_state_dict(fresh, Path(out_dir) / "student.safetensors")
    res["reloaded"], res["export_path"] = full_weights(fresh.module), path
    torch.save(res, Path(out_dir) / f"rank_{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines_dist")
    return run_ranks(sharding_worker, out), out


N_MLP = 8 * 16 + 16 + 16 * 4 + 4  # 212 parameters


def test_zero3_shards_trainable_engines_over_world(results):
    res, _ = results
    for r in res:
        assert r[(1, "before")]["student_numel"] == N_MLP // WORLD
        assert r["draft_numel"] == (8 * 64 + 64 + 64 * 8 + 8) // WORLD
        assert r["head_numel"] == N_MLP  # ZeRO-2 keeps full parameters on every rank


def test_teacher_partitioned_over_its_own_group(results):
    res, _ = results
    for rank, r in enumerate(res):
        for order in ("before", "after"):
            assert r[(1, order)]["teacher_numel"] == N_MLP and r[(1, order)]["teacher_ranks"] == [rank]
            assert r[(2, order)]["teacher_numel"] == N_MLP // 2 and r[(2, order)]["teacher_ranks"] == [0, 1]
            for gs in (1, 2):  # DeepSpeed's process-global mpu must not leak between the engines
                assert r[(gs, order)]["teacher_dp"] == gs and r[(gs, order)]["student_dp"] == WORLD


def test_trainable_result_independent_of_teacher_group_and_order(results):
    res, _ = results
    ref = res[0][(1, "before")]["weights"]
    init = torch.cat([p.detach().flatten() for p in mlp(2)().parameters()])
    assert not torch.allclose(ref, init)  # training moved the weights
    for r in res:
        for key in ((1, "before"), (1, "after"), (2, "before"), (2, "after")):
            assert torch.equal(r[key]["weights"], ref), key  # bit-identical
            assert r[key]["losses"] == r[(1, "before")]["losses"], key


def test_student_matches_plain_torch_adamw_reference(results):
    """Same math without DeepSpeed: full batch of both ranks, AdamW, clip 1.0, warmup schedule."""
    from fastardiff_ds.engines import EngineSpec, default_lr_lambda
    from fastardiff_ds.engines.engine import param_groups

    res, _ = results
    spec = EngineSpec("student", lr=1e-2, weight_decay=0.1, warmup=2, total_steps=10)
    student, teacher = mlp(2)(), mlp(1)()
    opt = torch.optim.AdamW(param_groups(student, 0.1), lr=spec.lr, betas=spec.betas, eps=spec.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, default_lr_lambda(spec))
    data = list(zip(*(batches(r, 3) for r in range(WORLD))))
    for xs in data:
        x = torch.cat(xs)
        loss = 10 * ((student(x) - teacher(x).detach()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
    ref = torch.cat([p.detach().flatten() for p in student.parameters()])
    got = res[0][(1, "before")]
    torch.testing.assert_close(got["weights"], ref, rtol=1e-5, atol=1e-6)
    assert got["lr"] == pytest.approx(spec.lr * default_lr_lambda(spec)(3))
    assert got["grad_norm"] == pytest.approx(float(norm), rel=1e-4) and got["grad_norm"] > 1.0  # clipped


def test_grad_accum_equals_larger_micro_batch(results):
    res, _ = results
    for r in res:
        torch.testing.assert_close(r["acc"], r["one"], rtol=1e-6, atol=1e-7)
        assert not torch.equal(r["acc"], torch.cat([p.detach().flatten() for p in mlp(8)().parameters()]))


def test_replicated_teacher_matches_partitioned(results):
    res, _ = results
    for r in res:
        assert r["rep_numel"] == N_MLP and not r["rep_out"].requires_grad
        assert torch.equal(r["rep_out"], r["part_out"])


def test_ema_of_partitioned_module(results):
    res, _ = results
    for r in res:
        assert r["ema_sharded_numel"] == N_MLP // WORLD
        torch.testing.assert_close(r["ema_sharded"], r["ema_ref"], rtol=0, atol=1e-6)
        torch.testing.assert_close(r["ema_plain"], r["ema_ref"], rtol=0, atol=1e-6)
        assert not torch.allclose(r["ema_ref"], r["student_full"])  # decay really lags behind


def test_export_safetensors_gathers_full_weights(results):
    from safetensors.torch import load_file

    res, out = results
    assert res[0]["export_path"] is not None and res[1]["export_path"] is None
    sd = load_file(str(out / "student.safetensors"))
    assert sorted(sd) == ["0.bias", "0.weight", "2.bias", "2.weight"] and sd["0.weight"].shape == (16, 8)
    flat = torch.cat([sd[k].flatten() for k in ("0.weight", "0.bias", "2.weight", "2.bias")])
    for r in res:
        assert torch.equal(flat, r["student_full"]) and torch.equal(r["reloaded"], r["student_full"])
