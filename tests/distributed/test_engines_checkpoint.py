"""2 CPU ranks: multi-engine checkpoint round trip (weights, optimizer, lr schedule, EMA, client state, RNG),
a crash in the middle of a save, rotation. Exact resume: the continued run is bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_engines_dist import NO_PERSIST, batches, full_weights, mlp, run_ranks, setup_rank

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(420)]


def build_all(base, seed_offset: int):
    from fastardiff_ds.engines import EngineSpec, build_engine, build_frozen

    specs = {"a": EngineSpec("a", lr=1e-2, warmup=2, total_steps=20, weight_decay=0.1, zero_overrides=NO_PERSIST),
             "b": EngineSpec("b", lr=5e-3, warmup=1, total_steps=20, zero_overrides=NO_PERSIST)}
    engines = {n: build_engine(mlp(10 * seed_offset + i), s, base, micro_batch=2, grad_accum=1)
               for i, (n, s) in enumerate(specs.items())}
    ema = build_frozen("ema", mlp(10 * seed_offset + 9), base, micro_batch=2, zero_overrides=NO_PERSIST)
    return engines, ema


def train(engines, ema_tracker, xs):
    losses = []
    for x in xs:
        for name in sorted(engines):
            loss = 10 * (engines[name](x) ** 2).mean()
            engines[name].backward(loss)
            engines[name].step()
            losses.append(loss.item())
        ema_tracker.update(0.5)
    return losses


def snapshot(engines, ema) -> dict:
    out = {n: full_weights(e.module) for n, e in engines.items()}
    out["ema"] = full_weights(ema.module)
    for n, e in engines.items():
        state = e.ds.optimizer.optimizer.state  # the client AdamW's state over this rank's fp32 partition
        out[f"{n}_opt"] = [v.clone() for s in state.values() for k, v in sorted(s.items()) if torch.is_tensor(v)]
        out[f"{n}_lr"] = e.lr
    return out


def checkpoint_worker(rank, world, port, out_dir):
    setup_rank(rank, world, port)
    from fastardiff_ds.engines import EMA, load_checkpoint, load_ds_config, resolve_resume, save_checkpoint

    base, root, res = load_ds_config("zero3"), Path(out_dir) / "ckpt", {}
    data = batches(rank, 5)
    engines, ema = build_all(base, 1)
    tracker = EMA(engines["a"], ema)
    train(engines, tracker, data[:3])
    torch.manual_seed(1000 + rank)  # distinct RNG per rank: each rank must get its own state back
    client = {"step": 3, "stage": 1, "consumed_samples": 12, "cursor": 100 * rank + 3, "wandb_id": "run42"}
    save_checkpoint(root, 3, engines, client_state=client, config={"preset": "tiny"}, modules={"ema": ema.module})
    res["saved"], res["rng_after_save"] = snapshot(engines, ema), torch.rand(3)
    res["cont_losses"] = train(engines, tracker, data[3:])
    res["cont"] = snapshot(engines, ema)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash between engine saves")

    engines["b"].save = crash  # "a" saves (sorted order), then the crash
    try:
        save_checkpoint(root, 5, engines, client_state=client, modules={"ema": ema.module})
    except RuntimeError:
        res["crashed"] = True
    res["latest_after_crash"] = (root / "latest").read_text()
    res["auto_after_crash"] = resolve_resume(root, "auto").name
    try:
        resolve_resume(root, "step_000005")
    except FileNotFoundError as err:
        res["broken_error"] = str(err)

    fresh, fresh_ema = build_all(base, 2)  # different init: the load must overwrite everything
    res["fresh_differs"] = not torch.equal(full_weights(fresh["a"].module), res["saved"]["a"])
    res["client"] = load_checkpoint(resolve_resume(root, "auto"), fresh, modules={"ema": fresh_ema.module})
    res["rng_after_load"] = torch.rand(3)
    res["loaded"] = snapshot(fresh, fresh_ema)
    res["resumed_losses"] = train(fresh, EMA(fresh["a"], fresh_ema), data[3:])
    res["resumed"] = snapshot(fresh, fresh_ema)
    for step in (6, 7):
        save_checkpoint(root, step, fresh, client_state={"step": step}, keep_last=2)
    res["dirs_after_rotation"] = sorted(p.name for p in root.glob("step_*"))
    torch.save(res, Path(out_dir) / f"rank_{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines_ckpt")
    return run_ranks(checkpoint_worker, out), out


def _assert_same(x: dict, y: dict):
    assert x.keys() == y.keys()
    for k in x:
        if isinstance(x[k], list):
            assert len(x[k]) == len(y[k]) > 0 and all(torch.equal(a, b) for a, b in zip(x[k], y[k])), k
        elif torch.is_tensor(x[k]):
            assert torch.equal(x[k], y[k]), k
        else:
            assert x[k] == y[k], k


def test_save_load_round_trip_restores_weights_optimizer_lr_ema(results):
    res, _ = results
    for r in res:
        assert r["fresh_differs"]
        _assert_same(r["loaded"], r["saved"])


def test_resume_continues_bit_identically(results):
    res, _ = results
    for r in res:
        assert r["resumed_losses"] == r["cont_losses"]
        _assert_same(r["resumed"], r["cont"])


def test_client_state_and_rng_per_rank(results):
    res, out = results
    for rank, r in enumerate(res):
        assert r["client"]["cursor"] == 100 * rank + 3 and r["client"]["wandb_id"] == "run42"
        assert torch.equal(r["rng_after_load"], r["rng_after_save"])
    assert not torch.equal(res[0]["rng_after_save"], res[1]["rng_after_save"])
    state = (out / "ckpt" / "step_000007" / "trainer_state.json").read_text()
    assert '"step": 7' in state


def test_crash_during_save_keeps_previous_latest(results):
    res, _ = results
    for r in res:
        assert r["crashed"] and r["latest_after_crash"] == "step_000003" and r["auto_after_crash"] == "step_000003"
        assert "step_000005" in r["broken_error"] and "resume from one of ['step_000003']" in r["broken_error"]


def test_rotation_keeps_last_k_and_drops_interrupted_saves(results):
    res, out = results
    assert res[0]["dirs_after_rotation"] == ["step_000006", "step_000007"]
    assert (out / "ckpt" / "latest").read_text() == "step_000007"
    ckpt = out / "ckpt" / "step_000007"
    assert {p.name for p in ckpt.iterdir()} >= {"a", "b", "client", "manifest.json", "trainer_state.json"}
