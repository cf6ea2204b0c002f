"""training/loop.py counts optimizer steps: with grad_accum = k every micro-batch of a window gets the window's step
index (so alpha(t), the stage and gen_every see optimizer steps), and logging / saving happen at window ends."""
import pytest
import torch

from fastardiff_ds.engines import Runtime
from fastardiff_ds.training.loop import LoopConfig, Trainer


class _Loader:
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter({"x": torch.zeros(2, 1)} for _ in range(self.n))

    def state_dict(self):
        return {}


class _Task:
    name, progress_key, engines, modules = "stub", "loss", {}, {}

    def __init__(self):
        self.seen = []
        self.step_fns = {"only": self.step_fn}

    def stage_of(self, step):
        return "only"

    def inputs(self, batch):
        return (batch["x"],)

    def step_fn(self, inputs, step, gen):
        self.seen.append(step)
        return {"loss": float(step)}

    def log_metrics(self, metrics, inputs):
        return dict(metrics), {}

    def finish(self, loader):
        return {}

    def export(self, meta):
        return None


class _Logger:
    run_id = None

    def __init__(self):
        self.steps = []

    def log(self, row, step=None):
        self.steps.append(step)

    def finish(self):
        pass


def test_micro_batches_of_a_window_share_the_optimizer_step(tmp_path, monkeypatch):
    rt, task, logger, saved = Runtime(), _Task(), _Logger(), []
    loop = LoopConfig(steps=3, log_every=1, save_every=2, grad_accum=2)
    trainer = Trainer(rt, task, loop, run_dir=tmp_path, config={}, seed=0, logger_factory=lambda run_id: logger)
    monkeypatch.setattr(trainer, "save", lambda loader, **_: saved.append(trainer.state.step))
    out = trainer.fit(_Loader(100))
    assert task.seen == [0, 0, 1, 1, 2, 2]  # 3 optimizer steps of 2 micro-batches each
    assert out["step"] == 3 and trainer.state.consumed_samples == 12
    assert saved == [2, 3]  # at a window end: every 2 optimizer steps, and the last


def test_resume_from_a_checkpoint_of_other_networks_is_one_error_line(tmp_path):
    """A checkpoint saved without a module this run builds (e.g. train.student_ema_decay turned on at resume): a
    SystemExit naming the checkpoint, what it lacks and the config keys to restore, not a KeyError traceback."""
    import json

    ckpt = tmp_path / "checkpoints" / "step_000005"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text(json.dumps({"step": 5, "engines": [], "modules": ["ema"], "world_size": 1}))
    task = _Task()
    task.modules = {"ema": torch.nn.Linear(1, 1), "student_ema": torch.nn.Linear(1, 1)}
    trainer = Trainer(Runtime(), task, LoopConfig(steps=3), run_dir=tmp_path, config={}, seed=0,
                      logger_factory=lambda run_id: _Logger())
    with pytest.raises(SystemExit) as err:
        trainer.resume("auto", _Loader(1))
    msg = str(err.value)
    assert msg.startswith("error: cannot resume") and "step_000005" in msg and "['student_ema']" in msg, msg
    assert "train.student_ema_decay" in msg and "\n" not in msg
