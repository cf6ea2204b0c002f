"""ZeRO-3 re-split on real engines with odd parameter sizes (gloo, 127.0.0.1): 2 ranks -> 3 ranks -> 2 ranks.

Engine "a" is partitioned (no persistence) with params of 35, 21, 3 and 1 elements and frozen params of 7 and
13 elements: on 2 ranks every param is padded, on 3 ranks all but the 21- and 3-element ones (the 1-element
gain is padding only on ranks >= 1); ``sub_group_size`` cuts it into 3 sub-groups on 2 ranks, 2 on 3 ranks.
Engine "b" is small enough to stay persistent (resident, unpartitioned in use) on every rank and holds a
frozen 13-element param. Both have a buffer. Three launches share one checkpoint folder; every engine set is
built from another seed than the one it loads, so a value that is not loaded shows:

- first (2 ranks): save at step 0 (before the first optimizer step), train 0-2, save at 2, train 2-6: the
  uninterrupted reference.
- mid (3 ranks): step 0 -> train 0-2; step 2 with ``load_optimizer=False``; step 2 -> train 2-4, save at 4.
- last (2 ranks): step 4 -> train 4-6.

Tolerances: the re-split is pure data movement, so what a load gives back (fp32 masters, gathered params,
frozen params, buffers, exp_avg, exp_avg_sq, Adam's step, lr and schedule position, global_steps) must be
bit-identical to what was saved, and the re-split padding exactly zero. The continued loss curve is the same
math on the same 6-sample global batch, but 3 ranks average three 2-sample partial gradients where 2 ranks
average two 3-sample ones, so float32 addition order differs: as in tests/distributed/test_checkpoint_resume.py,
losses agree to rel 1e-5 (and params, after a few Adam steps, to rtol 1e-5 / atol 1e-6); observed: ~1e-7.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from test_engines_dist import NO_PERSIST, run_ranks, setup_rank

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(600)]
GLOBAL_BATCH = 6  # divisible by 2 and 3 ranks
K = 2  # steps per segment


class OddA(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 7)  # weight 35, bias 7 (frozen)
        self.l2 = nn.Linear(7, 3)  # weight 21, bias 3
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(1))  # 1 element: ranks >= 1 hold padding only
        self.frozen = nn.Parameter(torch.randn(13), requires_grad=False)
        self.l1.bias.requires_grad_(False)
        self.register_buffer("shift", torch.randn(5))

    def forward(self, x):
        return self.gain * self.l2(torch.tanh(self.l1(x + self.shift))) + self.frozen[:3]


class OddB(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(5, 3)  # weight 15, bias 3
        self.frozen = nn.Parameter(torch.randn(13), requires_grad=False)
        self.register_buffer("shift", torch.randn(3))

    def forward(self, x):
        return self.l(x) * self.frozen[3:6] + self.shift


def build(base, world: int, seed: int):
    from fastardiff_ds.engines import EngineSpec, build_engine

    def make(cls, s):
        def fn():
            torch.manual_seed(s)
            return cls()
        return fn

    micro = GLOBAL_BATCH // world
    a = build_engine(make(OddA, seed), EngineSpec("a", lr=2e-2, warmup=2, total_steps=12, weight_decay=0.1,
                                                  zero_overrides={**NO_PERSIST, "sub_group_size": 15}),
                     base, micro_batch=micro, grad_accum=1)
    b = build_engine(make(OddB, seed + 50), EngineSpec("b", lr=1e-2, warmup=1, total_steps=12), base,
                     micro_batch=micro, grad_accum=1)
    return {"a": a, "b": b}


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 5, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)


def train(engines, start: int, stop: int, rank: int, world: int) -> list[float]:
    """Global mean loss of each step (every rank trains on its slice of the same global batch)."""
    from fastardiff_ds.engines import all_reduce

    losses = []
    for step in range(start, stop):
        x, y = (t.chunk(world)[rank] for t in global_batch(step))
        total = 0.0
        for name in sorted(engines):
            loss = 10 * ((engines[name](x) - y) ** 2).mean()
            engines[name].backward(loss)
            engines[name].step()
            total += float(all_reduce(loss.detach(), "sum")) / world
        losses.append(total)
    return losses


def full_state(engines) -> dict:
    """Full fp32 masters, gathered params (trainable and frozen), buffers, Adam moments and step, lr and
    global_steps of every engine (collective)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for name, e in sorted(engines.items()):
        params = dict(e.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            for pname, p in params.items():
                out[f"{name}.{pname}"] = p.detach().clone()
        for pname, p in params.items():
            if p.requires_grad:
                out[f"{name}.{pname}.fp32"] = safe_get_full_fp32_param(p).clone()
                started = bool(e.ds.optimizer.optimizer.state.get(e.ds.optimizer.fp32_partitioned_groups_flat[0]))
                for key in ("exp_avg", "exp_avg_sq"):  # None before the first optimizer step
                    out[f"{name}.{pname}.{key}"] = safe_get_full_optimizer_state(p, key).clone() if started else None
        for bname, b in e.module.named_buffers():
            out[f"{name}.{bname}"] = b.detach().clone()
        out[f"{name}.lr"] = e.lr
        out[f"{name}.sched_epoch"] = e.ds.lr_scheduler.last_epoch  # the lr the *next* steps get
        # one Adam step per sub-group; the sub-groups differ between world sizes, their step may not
        out[f"{name}.adam_step"] = sorted({float(s["step"]) for s in e.ds.optimizer.optimizer.state.values()})
        out[f"{name}.sub_groups"] = len(e.ds.optimizer.fp16_groups)
        out[f"{name}.global_steps"] = e.ds.global_steps
    return out


def padding(engines) -> torch.Tensor:
    """The padding elements of this rank's partitions: fp32 flats, Adam moments, frozen ``ds_tensor``s."""
    out = []
    rank = torch.distributed.get_rank()
    for e in engines.values():
        opt = e.ds.optimizer
        for i, group in enumerate(opt.fp16_groups):
            state = opt.optimizer.state.get(opt.fp32_partitioned_groups_flat[i], {})
            flats = [opt.fp32_partitioned_groups_flat[i]] + [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]
            pos = 0
            for p in group:
                s, n = p.partition_numel(), p.ds_numel
                real = max(0, min(s, n - rank * s))
                out += [f[pos + real: pos + s].detach().clone() for f in flats]
                pos += s
        for p in e.module.parameters():
            if not p.requires_grad:
                s, n = p.ds_tensor.numel(), p.ds_numel
                out.append(p.ds_tensor[max(0, min(s, n - rank * s)):].detach().clone())
    return torch.cat(out)


def n_padding(engines) -> int:
    """How many padding elements this rank's partitions of engine "a" hold (params + frozen)."""
    rank = torch.distributed.get_rank()
    return sum(p.partition_numel() - max(0, min(p.partition_numel(), p.ds_numel - rank * p.partition_numel()))
               for p in engines["a"].module.parameters())


def worker(rank, world, port, out_dir, phase):
    setup_rank(rank, world, port)
    from fastardiff_ds.engines import load_checkpoint, load_ds_config, save_checkpoint

    base, root, res = load_ds_config("zero3"), Path(out_dir) / "ckpt", {"world": world}

    def save(engines, step):
        save_checkpoint(root, step, engines, client_state={"step": step}, keep_last=None)

    def load(engines, step, **kwargs):
        return load_checkpoint(root / f"step_{step:06d}", engines, **kwargs)

    if phase == "first":  # 2 ranks: the uninterrupted reference, with checkpoints at steps 0 and K
        engines = build(base, world, seed=1)
        save(engines, 0)
        res["at_save_0"] = full_state(engines)
        res["losses"] = train(engines, 0, K, rank, world)
        save(engines, K)
        res["at_save_K"] = full_state(engines)
        res["losses"] += train(engines, K, 3 * K, rank, world)
        res["final"] = full_state(engines)
    elif phase == "mid":  # 3 ranks
        # (b) a checkpoint saved before the first optimizer step
        engines = build(base, world, seed=2)
        res["fresh_b"] = full_state(engines)
        load(engines, 0)
        res["loaded_0"], res["pad_0"] = full_state(engines), padding(engines)
        res["losses_from_0"] = train(engines, 0, K, rank, world)
        res["trained_from_0"] = full_state(engines)
        # (c) params only: the optimizer state and lr schedule stay those of the fresh engines
        engines = build(base, world, seed=3)
        res["fresh_c"] = full_state(engines)
        load(engines, K, load_optimizer=False)
        res["loaded_K_no_opt"], res["pad_K_no_opt"] = full_state(engines), padding(engines)
        # (a) 2 -> 3: the full state at step K, trained on and saved at 2K on 3 ranks
        engines = build(base, world, seed=4)
        res["fresh_a"] = full_state(engines)
        res["n_padding"] = n_padding(engines)
        res["persistent"] = {n: [bool(p.ds_persist) for p in e.module.parameters()] for n, e in engines.items()}
        res["client"] = load(engines, K)
        res["loaded_K"], res["pad_K"] = full_state(engines), padding(engines)
        res["losses"] = train(engines, K, 2 * K, rank, world)
        save(engines, 2 * K)
        res["at_save_2K"] = full_state(engines)
    else:  # "last", 2 ranks: 3 -> 2
        engines = build(base, world, seed=5)
        res["fresh"] = full_state(engines)
        res["n_padding"] = n_padding(engines)
        res["client"] = load(engines, 2 * K)
        res["loaded_2K"], res["pad_2K"] = full_state(engines), padding(engines)
        res["losses"] = train(engines, 2 * K, 3 * K, rank, world)
        res["final"] = full_state(engines)
    torch.save(res, Path(out_dir) / f"rank_{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("reshard")
    first = run_ranks(worker, out, "first", world=2)
    mid = run_ranks(worker, out, "mid", world=3)
    last = run_ranks(worker, out, "last", world=2)
    return {"first": first, "mid": mid, "last": last, "root": out / "ckpt"}


def _same(x: dict, y: dict, keys=None):
    keys = sorted(x) if keys is None else keys
    assert set(keys) <= set(x) and set(keys) <= set(y)
    for k in keys:
        a, b = x[k], y[k]
        assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), k


def _no_groups(state: dict) -> list[str]:
    return sorted(k for k in state if not k.endswith(".sub_groups"))


def _params(state: dict) -> list[str]:
    """The keys of weights, fp32 masters, frozen params and buffers (no optimizer state, lr or counters)."""
    return sorted(k for k in state if not k.endswith((".exp_avg", ".exp_avg_sq", ".lr", ".adam_step",
                                                      ".global_steps", ".sub_groups", ".sched_epoch")))


def _differs(fresh: dict, saved: dict):
    """Every tensor the load must restore starts out different (another seed), so a skipped one shows."""
    for k in _params(saved):
        assert not torch.equal(fresh[k], saved[k]), k


def test_sizes_are_odd_and_padded_on_2_and_3_ranks(runs):
    state = runs["first"][0]["at_save_0"]
    sizes = {k: v.numel() for k, v in state.items() if torch.is_tensor(v) and k.startswith("a.")
             and not k.endswith((".fp32", ".exp_avg", ".exp_avg_sq", "shift"))}
    assert sizes == {"a.l1.weight": 35, "a.l1.bias": 7, "a.l2.weight": 21, "a.l2.bias": 3, "a.gain": 1,
                     "a.frozen": 13}
    # engine "a"'s padding per rank; 3 ranks: 35 -> 3x12, 7 -> 3x3, 13 -> 3x5, 1 -> 3x1 (21 and 3 split evenly)
    assert [r["n_padding"] for r in runs["mid"]] == [0, 1, 1 + 2 + 2 + 1]
    assert [r["n_padding"] for r in runs["last"]] == [0, 6]  # 2 ranks: one padding element per param
    # sub_group_size=15 cuts "a" into 3 sub-groups on 2 ranks (partitions 18 | 11 | 2+1), 2 on 3 (12+7 | 1+1)
    assert state["a.sub_groups"] == runs["last"][0]["loaded_2K"]["a.sub_groups"] == 3
    assert runs["mid"][0]["loaded_K"]["a.sub_groups"] == 2
    for r in runs["mid"]:  # "a" partitioned in use, "b" resident (persistent) on every rank, frozen param too
        assert not any(r["persistent"]["a"]) and all(r["persistent"]["b"]) and len(r["persistent"]["b"]) == 3


def _zero_padding(pad: torch.Tensor, rank: int):
    assert pad.numel() > 0 or rank == 0  # rank 0 holds no padding (every param has >= 1 element)
    assert torch.equal(pad, torch.zeros_like(pad))


def test_2_to_3_restores_everything_bit_exactly_with_zero_padding(runs):
    first = runs["first"][0]
    for rank, r in enumerate(runs["mid"]):
        _differs(r["fresh_a"], first["at_save_K"])
        # params, fp32 masters, frozen, buffers, moments, Adam step, lr, schedule position, global_steps
        _same(r["loaded_K"], first["at_save_K"], _no_groups(first["at_save_K"]))
        assert set(r["loaded_K"]["a.adam_step"]) == {float(K)} and r["loaded_K"]["a.global_steps"] == K
        _zero_padding(r["pad_K"], rank)
        assert r["client"]["step"] == K and len(r["client"]["peers"]) == 2


def test_3_to_2_restores_everything_bit_exactly_with_zero_padding(runs):
    mid = runs["mid"][0]
    for rank, r in enumerate(runs["last"]):
        _differs(r["fresh"], mid["at_save_2K"])
        _same(r["loaded_2K"], mid["at_save_2K"], _no_groups(mid["at_save_2K"]))
        assert set(r["loaded_2K"]["a.adam_step"]) == {float(2 * K)} and r["loaded_2K"]["a.global_steps"] == 2 * K
        _zero_padding(r["pad_2K"], rank)
        assert r["client"]["step"] == 2 * K and len(r["client"]["peers"]) == 3


def test_2_to_3_to_2_continues_the_uninterrupted_run(runs):
    first, mid, last = runs["first"][0], runs["mid"], runs["last"]
    ref = first["losses"]
    assert len(ref) == 3 * K and mid[0]["losses"] == mid[1]["losses"] == mid[2]["losses"]
    assert last[0]["losses"] == last[1]["losses"]
    got = mid[0]["losses"] + last[0]["losses"]
    print(f"2->3->2 losses {got} vs uninterrupted {ref[K:]}; max rel diff "
          f"{max(abs(x - y) / abs(y) for x, y in zip(got, ref[K:])):.2e}")
    assert got == pytest.approx(ref[K:], rel=1e-5)
    assert got[-1] < ref[0]  # it did train
    for k in _params(first["final"]):
        torch.testing.assert_close(last[0]["final"][k], first["final"][k], rtol=1e-5, atol=1e-6, msg=k)
    assert last[0]["final"]["a.lr"] == pytest.approx(first["final"]["a.lr"], rel=1e-12)
    assert last[0]["final"]["a.global_steps"] == first["final"]["a.global_steps"] == 3 * K


def test_checkpoint_before_the_first_step(runs):
    first = runs["first"][0]
    for rank, r in enumerate(runs["mid"]):
        _differs(r["fresh_b"], first["at_save_0"])
        # init weights, frozen, buffers, the (empty) optimizer state, lr, schedule position, counters
        _same(r["loaded_0"], first["at_save_0"], _no_groups(first["at_save_0"]))
        assert r["loaded_0"]["a.global_steps"] == 0
        _zero_padding(r["pad_0"], rank)
        assert r["losses_from_0"] == pytest.approx(first["losses"][:K], rel=1e-5)
        for k in _params(first["at_save_K"]):
            torch.testing.assert_close(r["trained_from_0"][k], first["at_save_K"][k], rtol=1e-5, atol=1e-6, msg=k)
        assert set(r["trained_from_0"]["a.adam_step"]) == {float(K)}


def test_load_optimizer_false_loads_params_and_keeps_fresh_optimizer_state(runs):
    first = runs["first"][0]
    saved = first["at_save_K"]
    for rank, r in enumerate(runs["mid"]):
        got, fresh = r["loaded_K_no_opt"], r["fresh_c"]
        _differs(fresh, saved)
        _same(got, saved, _params(saved))  # weights, fp32 masters, frozen params, buffers: loaded
        moments = [k for k in saved if k.endswith((".exp_avg", ".exp_avg_sq"))]
        assert moments
        for k in moments:  # the saved moments are non-zero; the loaded engine keeps the fresh ones
            assert saved[k].abs().sum() > 0, k
            assert (got[k] is None and fresh[k] is None) or torch.equal(got[k], fresh[k]), k
        for name in ("a", "b"):
            assert got[f"{name}.adam_step"] == fresh[f"{name}.adam_step"] != saved[f"{name}.adam_step"]
            assert got[f"{name}.lr"] == fresh[f"{name}.lr"] != saved[f"{name}.lr"]  # schedule not loaded
            assert got[f"{name}.sched_epoch"] == fresh[f"{name}.sched_epoch"] == 0 != saved[f"{name}.sched_epoch"]
        assert got["a.global_steps"] == K  # as DeepSpeed's own load without optimizer states
        _zero_padding(r["pad_K_no_opt"], rank)


def test_frozen_params_and_buffers_come_back_exactly(runs):
    """(d) The frozen params (a: 7 and 13 elements, partitioned; b: 13 elements, resident on every rank) and
    the buffers after every load: 2 -> 3 (with and without optimizer, before the first step) and 3 -> 2."""
    first, mid = runs["first"][0], runs["mid"][0]
    frozen = ["a.l1.bias", "a.frozen", "a.shift", "b.frozen", "b.shift"]
    loads = [(r, "fresh_b", "loaded_0", first["at_save_0"]) for r in runs["mid"]]
    loads += [(r, f, k, first["at_save_K"]) for r in runs["mid"] for f, k in (("fresh_c", "loaded_K_no_opt"),
                                                                               ("fresh_a", "loaded_K"))]
    loads += [(r, "fresh", "loaded_2K", mid["at_save_2K"]) for r in runs["last"]]
    assert len(loads) == 3 * 3 + 2
    for r, fresh, loaded, saved in loads:
        for k in frozen:
            assert not torch.equal(r[fresh][k], saved[k]) and torch.equal(r[loaded][k], saved[k]), (loaded, k)
    assert torch.equal(mid["at_save_2K"]["a.frozen"], first["at_save_0"]["a.frozen"])  # frozen: never trained
