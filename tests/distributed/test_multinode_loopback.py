"""Multi-node as the README documents it: two `deepspeed --hostfile H --no_ssh --node_rank N` invocations, one per
"node", here two names of the loopback host with one rank each, run the main job to the end together.

DeepSpeed's runner (launcher/runner.py, 0.19.8) refuses `--num_nodes 2` without a hostfile ("Num nodes is >1 but
no extra nodes available via hostfile"); with one, `--no_ssh` starts only this node's ranks (`--node_rank`), global
ranks follow the hostfile's order, and `--master_addr` must be given (it is otherwise asked of node 0 over ssh).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from _launch import ROOT, env, free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TIMEOUT_S = 480


def node_cmd(hostfile: Path, node_rank: int, port: int, args: list[str]) -> list[str]:
    runner = str(Path(sys.executable).parent / "deepspeed")
    return [runner, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank), "--num_nodes", "2",
            "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
            str(ROOT / "launcher/train_t2i.py"), *args]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_two_loopback_nodes_run_the_main_job_to_the_end(tmp_path):
    from fastardiff_ds.data.synthetic import write_shapes_dataset

    write_shapes_dataset(str(tmp_path / "shapes"), num_samples=32, shard_size=8, resolution=32)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")  # two names of one host: two "nodes"
    run_dir = tmp_path / "run"
    args = ["--ds_config", "ds_configs/zero3.json", f"run_dir={run_dir}", f"data.shards={tmp_path / 'shapes'}",
            "data.batch_size=2", "data.num_workers=0", "train.steps=3", "train.save_every=3", "train.cd_steps=2",
            "train.gen_every=2", "train.log_every=1", "train.tau_batches=1", "wandb.enabled=false"]
    port = free_port()
    nodes = [start(node_cmd(hostfile, rank, port, args)) for rank in (0, 1)]
    outs = []
    try:
        for proc in nodes:
            outs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in nodes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the two loopback nodes did not finish within {TIMEOUT_S} s")
    for rank, (proc, out) in enumerate(zip(nodes, outs)):
        assert proc.returncode == 0, f"node {rank} exited {proc.returncode}:\n{out[-5000:]}"
    fresh = next(json.loads(l) for l in outs[0].splitlines() if l.startswith('{"fresh_run"'))
    assert len(fresh["partitions"]) == 2  # a world of two ranks, one per node
    assert all(r["teacher_group_size"] == 1 for r in fresh["partitions"])  # teacher groups stay inside a node
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert math.isfinite(json.loads((run_dir / "export" / "meta.json").read_text())["tau"])
