"""Checkpoints that survive corruption and a change of world size (gloo, 127.0.0.1, bounded in time).

Three launches share one checkpoint folder: 2 ranks train 3 steps, save (step 3), train on and save a
step-4 checkpoint; the pytest process truncates a file of step 4; 1 rank resumes (falls back to step 3,
re-splits 2 -> 1), checks the re-split state, trains to step 6 and saves; 2 ranks resume that (1 -> 2).
Every run records the global loss of every step and the full fp32 params, Adam moments and lr after loading.

Tolerances: the re-split itself is pure data movement, so weights, Adam moments (exp_avg, exp_avg_sq), Adam's
step and the lr schedule position must be bit-identical. The continued loss curve is the same math (mean
over the same 4-sample global batch; DeepSpeed averages gradients over ranks) but 2 ranks sum two 2-sample
partial gradients where 1 rank sums 4 at once, so float32 addition order differs: losses agree to rel 1e-5.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from test_engines_dist import NO_PERSIST, run_ranks, setup_rank

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]
GLOBAL_BATCH = 4


def build(base, world: int):
    """Engine "a": ZeRO-3 partitioned, a frozen bias, sub-groups that split differently on 1 and 2 ranks;
    engine "b": small enough to stay persistent (resident) on every rank."""
    from fastardiff_ds.engines import EngineSpec, build_engine

    def net_a():
        torch.manual_seed(1)
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        m[0].bias.requires_grad_(False)
        return m

    def net_b():
        torch.manual_seed(2)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))

    micro = GLOBAL_BATCH // world
    a = build_engine(net_a, EngineSpec("a", lr=2e-2, warmup=2, total_steps=12, weight_decay=0.1,
                                       zero_overrides={**NO_PERSIST, "sub_group_size": 40}),
                     base, micro_batch=micro, grad_accum=1)
    b = build_engine(net_b, EngineSpec("b", lr=1e-2, warmup=1, total_steps=12), base, micro_batch=micro, grad_accum=1)
    return {"a": a, "b": b}


def global_batch(step: int) -> torch.Tensor:
    return torch.randn(GLOBAL_BATCH, 8, generator=torch.Generator().manual_seed(1000 + step))  # (4, 8)


def train(engines, start: int, stop: int, rank: int, world: int) -> list[float]:
    """Global mean loss of each step (every rank trains on its slice of the same global batch)."""
    from fastardiff_ds.engines import all_reduce

    losses = []
    for step in range(start, stop):
        x = global_batch(step).chunk(world)[rank]
        total = 0.0
        for name in sorted(engines):
            loss = 10 * (engines[name](x) ** 2).mean()
            engines[name].backward(loss)
            engines[name].step()
            total += float(all_reduce(loss.detach(), "sum")) / world
        losses.append(total)
    return losses


def full_state(engines) -> dict:
    """Full fp32 weights, Adam moments and lr of every engine (collective)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for name, e in sorted(engines.items()):
        for pname, p in e.module.named_parameters():
            if p.requires_grad:
                out[f"{name}.{pname}"] = safe_get_full_fp32_param(p).clone()
                for key in ("exp_avg", "exp_avg_sq"):
                    out[f"{name}.{pname}.{key}"] = safe_get_full_optimizer_state(p, key).clone()
            else:
                with deepspeed.zero.GatheredParameters([p]):
                    out[f"{name}.{pname}"] = p.detach().clone()
        out[f"{name}.lr"] = e.lr
        out[f"{name}.adam_step"] = [float(s["step"]) for s in e.ds.optimizer.optimizer.state.values()]
        out[f"{name}.global_steps"] = e.ds.global_steps
    return out


def _capture_warnings() -> list[str]:
    messages = []

    class Grab(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("fastardiff_ds.engines.checkpoint").addHandler(Grab(level=logging.WARNING))
    return messages


def worker(rank, world, port, out_dir, phase):
    setup_rank(rank, world, port)
    from fastardiff_ds.engines import load_checkpoint, load_ds_config, resolve_resume, save_checkpoint

    root, res, warnings = Path(out_dir) / "ckpt", {}, _capture_warnings()
    engines = build(load_ds_config("zero3"), world)
    start = 0
    if phase != "first":
        ckpt = resolve_resume(root, "auto")
        client = load_checkpoint(ckpt, engines)
        res["resumed_from"], res["client"], start = ckpt.name, client, client["step"]
        res["rng_after_load"] = torch.rand(2)
        res["loaded"] = full_state(engines)
    else:
        res["losses"] = train(engines, 0, 3, rank, world)
    torch.manual_seed(50 + rank)
    mid = start + 3
    res["cont"] = train(engines, start, mid, rank, world) if phase != "first" else []
    save_checkpoint(root, mid, engines, client_state={"step": mid, "rank": rank})
    res["rng_after_save"], res["at_save"] = torch.rand(2), full_state(engines)
    res["after"] = train(engines, mid, mid + 3, rank, world)  # the reference the next phase must reproduce
    if phase == "first":
        save_checkpoint(root, mid + 3, engines, client_state={"step": mid + 3, "rank": rank})
    res["warnings"] = list(warnings)
    torch.save(res, Path(out_dir) / f"rank_{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt_resume")
    first = run_ranks(worker, out, "first", world=2)  # steps 0-2, save 3, steps 3-5, save 6
    victim = out / "ckpt" / "step_000006" / "a" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # a truncated file in the latest checkpoint
    down = run_ranks(worker, out, "down", world=1)  # falls back to 3, re-splits 2 -> 1, steps 3-5, save 6, 6-8
    up = run_ranks(worker, out, "up", world=2)  # resumes down's step 6 on 2 ranks (1 -> 2), steps 6-8, save 9
    return {"first": first, "down": down, "up": up, "victim": victim, "root": out / "ckpt"}


def _same(x: dict, y: dict):
    assert x.keys() == y.keys()
    for k in x:
        assert (torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k]), k


def test_truncated_latest_falls_back_with_a_warning_naming_the_file(runs):
    down = runs["down"][0]
    assert down["resumed_from"] == "step_000003"
    text = " ".join(down["warnings"])
    assert "step_000006" in text and runs["victim"].name in text and "truncated" in text


def test_resplit_2_to_1_restores_weights_moments_lr_and_rng_exactly(runs):
    first, down = runs["first"][0], runs["down"][0]
    _same(down["loaded"], first["at_save"])  # params, exp_avg, exp_avg_sq, Adam step, lr, global_steps
    assert down["loaded"]["a.adam_step"] and set(down["loaded"]["a.adam_step"]) == {3.0}
    assert down["client"]["step"] == 3 and [p["rank"] for p in down["client"]["peers"]] == [0, 1]
    assert torch.equal(down["rng_after_load"], first["rng_after_save"])


def test_resplit_1_to_2_restores_weights_moments_and_lr_exactly(runs):
    down, up = runs["down"][0], runs["up"]
    assert up[0]["resumed_from"] == "step_000006" and up[0]["client"]["step"] == 6
    for r in up:
        _same(r["loaded"], down["at_save"])
    assert up[0]["loaded"]["a.global_steps"] == 6 and set(up[0]["loaded"]["a.adam_step"]) == {6.0}
    # rank 0 keeps its client state and RNG; rank 1 (new) gets rank 0's client state and its own RNG stream
    assert up[1]["client"]["rank"] == 0 and len(up[1]["client"]["peers"]) == 1
    assert torch.equal(up[0]["rng_after_load"], down["rng_after_save"])
    assert not torch.equal(up[0]["rng_after_load"], up[1]["rng_after_load"])


def test_loss_curve_continues_across_world_sizes(runs):
    first, down, up = runs["first"][0], runs["down"][0], runs["up"]
    assert len(first["after"]) == len(down["cont"]) == len(up[0]["cont"]) == 3
    for name, a, b in (("2->1", down["cont"], first["after"]), ("1->2", up[0]["cont"], down["after"])):
        print(f"resume {name}: losses {a} vs uninterrupted {b}; max rel diff "
              f"{max(abs(x - y) / abs(y) for x, y in zip(a, b)):.2e}")
    assert down["cont"] == pytest.approx(first["after"], rel=1e-5)  # 2 -> 1, steps 3-5
    assert up[0]["cont"] == up[1]["cont"]
    assert up[0]["cont"] == pytest.approx(down["after"], rel=1e-5)  # 1 -> 2, steps 6-8


def test_manifest_lists_every_file_and_detects_a_flipped_byte(runs):
    import json

    from fastardiff_ds.engines.manifest import verify

    ckpt = runs["root"] / "step_000009"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["files"]) == on_disk and manifest["world_size"] == 2
    assert {"a/zero_pp_rank_1_mp_rank_00_optim_states.pt", "client/rank_00001.pt"} <= on_disk
    assert verify(ckpt) == []
    victim = ckpt / "b" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    problems = verify(ckpt)
    assert len(problems) == 1 and victim.name in problems[0] and "checksum" in problems[0]
    assert verify(ckpt, deep=False) == []  # same size: only the checksum sees it
    step6 = json.loads((runs["root"] / "step_000006" / "manifest.json").read_text())
    assert step6["world_size"] == 1 and not any("rank_1" in f for f in step6["files"])  # stale files removed
