"""The joint run resumes on another world size through the launcher: 2 ranks -> 1 rank -> 2 ranks, the global
batch kept (data.batch_size doubled on 1 rank), ZeRO-3 engines re-split, the data epoch continued.

The loss curve cannot be compared step by step here: after 2 -> 1 the one rank reads the saved readers'
streams one after the other (resplit.py), so a step's batch holds other samples than the 2-rank run's. Exact
continuation of the math is tests/distributed/test_checkpoint_resume.py; this test checks the wiring."""
from __future__ import annotations

import json
import math

import pytest

from _launch import run
from test_train_joint import _args, _rows, setup  # noqa: F401  (module-scoped fixture: teacher + shapes)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_joint_run_resumes_on_one_rank_then_on_two(setup, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    first = run("launcher/train_t2i.py", _args(setup, run_dir, "train.steps=2", "train.save_every=2"))
    assert first.returncode == 0, first.stdout[-5000:]
    down = run("launcher/train_t2i.py", _args(setup, run_dir, "train.steps=4", "train.save_every=2",
                                              "data.batch_size=4", "--resume", "auto"), num_ranks=1)
    assert down.returncode == 0, down.stdout[-5000:]
    assert '"resumed_at_step": 2' in down.stdout and "written by 2 ranks) on 1 ranks" in down.stdout
    up = run("launcher/train_t2i.py", _args(setup, run_dir, "train.steps=6", "train.save_every=2",
                                            "--resume", "auto"))
    assert up.returncode == 0, up.stdout[-5000:]
    assert '"resumed_at_step": 4' in up.stdout and "written by 1 ranks) on 2 ranks" in up.stdout
    rows = _rows(run_dir / "metrics.jsonl")
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert [rows[s]["consumed_samples"] for s in range(1, 7)] == [4 * s for s in range(1, 7)]  # global batch 4
    for row in rows.values():
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
    state = json.loads((run_dir / "checkpoints" / "step_000006" / "trainer_state.json").read_text())
    assert state["loader"]["epoch"] == 0 and state["loader"]["carry"]  # still the first epoch, continued
