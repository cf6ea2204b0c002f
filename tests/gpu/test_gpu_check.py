"""The GPU check end to end on this machine's GPU: every stage ok on NCCL, the resumed run reproduces the killed
run's losses, compiled rows recompile nothing while timed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _gpu import gpu_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_gpu_check_passes_on_nccl(tmp_path):
    env = dict(gpu_env(), FASTARDIFF_PYTHON=sys.executable)
    env.pop("OUT", None)
    res = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--work", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=880)
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["ok"], (report["failed"], {k: report["stages"][k].get("error") for k in report["failed"]})
    st = report["stages"]
    assert st["env"]["comm_backend"] == "nccl" and st["env"]["cuda_available"]
    assert st["resume"]["compared_losses"] > 0 and st["resume"]["max_rel_diff"] <= st["resume"]["rtol"]
    assert all(r["recompiles_timed"] == 0 for label, r in st["bench"]["rows"].items() if label.endswith("compiled"))
