"""Peak host RSS per rank while building the pretraining engines of a NextStep-shaped model (issue 26, item 2).

    deepspeed --num_gpus 2 scripts/rss_build.py --scale 0.25 --json runs/rss_2.json     # DS_ACCELERATOR=cpu: gloo
    deepspeed --num_gpus 2 scripts/rss_build.py --scale 0.25 --whole --json runs/rss_2_whole.json

Builds PretrainTask's engine (AR + head, ZeRO-3, AdamW) and its EMA from random weights (pretrain.init unset),
under zero.Init (the default) or, with --whole, the way pretraining did before: the whole model on every rank,
partitioned by deepspeed.initialize. Then takes --steps optimizer steps on a short random batch (Adam's states
appear at the first step). Per rank: RSS before, peak (VmHWM, reset before the build) and RSS after each phase;
beside it engines/memory.py's plan for the same networks (fp32 on CPU, see `plan`), compared with the RSS the
model states add (RSS after the steps minus RSS before the build).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastardiff_ds.engines import Runtime  # noqa: E402
from fastardiff_ds.engines.memory import NetSize, count_params, estimate_memory  # noqa: E402
from fastardiff_ds.scalebench.shapes import scaled_config  # noqa: E402
from fastardiff_ds.training.pretrain import PretrainTask, build_pretrain_net, init_pretrain_net  # noqa: E402

GIB = 2**30


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


class WholeTask(PretrainTask):
    """Pretraining's build before zero.Init: the whole module on every rank, handed to deepspeed.initialize."""

    def _net(self):
        return init_pretrain_net(self.cfg)


def plan(cfg, world: int) -> dict:
    """engines/memory.py's plan for the engine (trainable, ZeRO-3) and the EMA (frozen, partitioned) per rank, in
    fp32 (DeepSpeed on CPU runs without bf16), and its bf16 figure (what a GPU run would hold) for reference."""
    with torch.device("meta"):
        total, largest = count_params(build_pretrain_net(cfg))
    nets = {"model": NetSize(total, largest), "ema": NetSize(total, largest, trainable=False, group_size=world)}
    return {"params": total, "largest_layer": largest, "fp32": estimate_memory(nets, world, precision="fp32"),
            "bf16": estimate_memory(nets, world)}


def compare(out: dict) -> dict:
    """Planned model states vs the RSS they added (after the steps, over the RSS before the build), per rank."""
    want = out["plan"]["fp32"]["total_gpu_bytes"]
    rows = []
    for r in out["ranks"]:
        got = r["steps"]["after"] - r["rss_before"]
        rows.append({"rank": r["rank"], "planned_bytes": want, "measured_bytes": got,
                     "relative_error": abs(got - want) / want})
    return {"per_rank": rows, "max_relative_error": max(x["relative_error"] for x in rows)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="nextstep-1.1")
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--whole", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed runner
    a = p.parse_args()
    torch.set_num_threads(1)
    rt = Runtime.start()
    cfg = scaled_config(a.shape, a.scale)
    cfg.model.dtype, cfg.data.batch_size = "float32", 1
    cfg.pretrain.ds_config, cfg.run_dir = str(ROOT / "ds_configs/zero3.json"), "/tmp/rss_build_unused"
    rt.barrier()
    rss0 = _status("VmRSS")
    reset_peak()
    task = (WholeTask if a.whole else PretrainTask)(rt, cfg, image=None)
    rt.barrier()
    build = {"peak": _status("VmHWM"), "after": _status("VmRSS")}
    reset_peak()
    g = torch.Generator().manual_seed(rt.rank)
    ids = torch.randint(0, cfg.model.ar.vocab_size, (1, 16), generator=g)
    batch = (ids, torch.ones_like(ids), torch.randn(1, 16, cfg.model.image.token_dim, generator=g))
    for step in range(a.steps):
        task.pretrain_step(batch, step, g)
    rt.barrier()
    steps = {"peak": _status("VmHWM"), "after": _status("VmRSS")}
    mine = {"rank": rt.rank, "rss_before": rss0, "build": build, "steps": steps,
            "build_peak_over_before": build["peak"] - rss0, "steps_peak_over_before": max(build["peak"],
                                                                                          steps["peak"]) - rss0}
    ranks = rt.all_gather_object(mine)
    if rt.is_rank0:
        out = {"shape": a.shape, "scale": a.scale, "world": rt.world_size, "zero_init": not a.whole,
               "steps": a.steps, "plan": plan(cfg, rt.world_size), "ranks": ranks}
        out["plan_vs_measured"] = compare(out)
        text = json.dumps(out, indent=2)
        print(text)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(text + "\n")
    rt.close()


if __name__ == "__main__":
    main()
