"""fastardiff_ds/logging.py: W&B never stops a run. Online mode without a reachable server (real wandb pointed at a
closed port, in a subprocess so nothing can hang the suite) falls back to an offline run with one warning naming
`wandb sync`; a W&B call that raises during training is one warning, then the logger is a no-op."""
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from fastardiff_ds.engines import Runtime
from fastardiff_ds.logging import WandbConfig, WandbLogger
from fastardiff_ds.training.loop import LoopConfig, Trainer

_ONLINE = """
import json, sys, warnings
from fastardiff_ds.logging import WandbConfig, make_logger
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    logger = make_logger(WandbConfig(mode="online", init_timeout_s=3), sys.argv[1], {"lr": 1e-4})
    logger.log({"loss": 0.5}, step=1)
    logger.finish()
print("RESULT " + json.dumps({"logger": type(logger).__name__, "run_id": logger.run_id,
                              "warnings": [str(w.message) for w in caught if "W&B" in str(w.message)]}))
"""


def test_online_without_a_server_falls_back_to_offline_with_one_warning(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # tests default to WANDB_MODE=disabled
    env.update(WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="a" * 40, WANDB_CONFIG_DIR=str(tmp_path / "cfg"),
               WANDB_CACHE_DIR=str(tmp_path / "cache"), WANDB_DATA_DIR=str(tmp_path / "data"), WANDB_SILENT="true")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", _ONLINE, str(run_dir)], env=env, capture_output=True, text=True,
                         timeout=150)
    elapsed = time.time() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(next(l for l in res.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    assert out["logger"] == "WandbLogger" and out["run_id"], out
    assert len(out["warnings"]) == 1, out["warnings"]
    message = out["warnings"][0]
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{out['run_id']}"))
    assert len(offline) == 1 and any(offline[0].glob("*.wandb")), list((run_dir / "wandb").iterdir())
    assert "online init failed" in message and f"wandb sync {offline[0]}" in message, message
    assert elapsed < 120, elapsed  # bounded by init_timeout_s, not wandb's 90 s default plus retries


def _failing_logger(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # a real wandb run object; its log is then made to fail
    logger = WandbLogger(WandbConfig(), tmp_path, {})
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("wandb service went away")

    monkeypatch.setattr(logger.run, "log", broken)
    monkeypatch.setattr(logger.run, "finish", broken)
    return logger, calls


def test_a_failing_call_is_one_warning_then_a_no_op(tmp_path, monkeypatch):
    logger, calls = _failing_logger(tmp_path, monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.log({"loss": 1.0}, step=1)
        logger.histogram("h", [1.0, 2.0], step=1)
        logger.image("samples", tmp_path / "missing.png", step=1)
        logger.log({"loss": 2.0}, step=2)
        logger.finish()
    messages = [str(w.message) for w in caught if "W&B" in str(w.message)]
    assert len(messages) == 1 and "ConnectionError: wandb service went away" in messages[0], messages
    assert "metrics.jsonl" in messages[0] and len(calls) == 1


class _Task:
    name, progress_key, engines, modules = "stub", "loss", {}, {}

    def __init__(self):
        self.step_fns = {"only": lambda inputs, step, gen: {"loss": float(step)}}

    def stage_of(self, step):
        return "only"

    def inputs(self, batch):
        return (batch["x"],)

    def log_metrics(self, metrics, inputs):
        return dict(metrics), {"hist": torch.arange(3.0)}

    def finish(self, loader):
        return {"tau": 0.5}

    def export(self, meta):
        return None


class _Loader:
    def __iter__(self):
        return iter({"x": torch.zeros(2, 1)} for _ in range(100))

    def state_dict(self):
        return {}


def test_training_goes_on_when_wandb_fails(tmp_path, monkeypatch):
    logger, calls = _failing_logger(tmp_path, monkeypatch)
    trainer = Trainer(Runtime(), _Task(), LoopConfig(steps=4, log_every=1, save_every=100), run_dir=tmp_path,
                      config={}, seed=0, logger_factory=lambda run_id: logger)
    monkeypatch.setattr(trainer, "save", lambda loader, **_: None)
    with pytest.warns(UserWarning, match="W&B log failed"):
        out = trainer.fit(_Loader())
    assert out["step"] == 4 and len(calls) == 1
    rows = [json.loads(l) for l in Path(tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # every row still reaches metrics.jsonl
