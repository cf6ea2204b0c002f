"""training/loop.py + training/preemption.py in one process with real signals: SIGTERM / SIGUSR1 mid-window stops
the loop at the next optimizer-step boundary, which is saved; the end-of-run work is skipped; a save slower than
the grace is a warning with the measured times. (On 2 ranks through the launchers: tests/distributed/
test_preemption.py.)"""
import os
import signal
import time

import pytest
import torch

from fastardiff_ds.engines import Runtime
from test_loop_accumulation import _Task as _AccumTask
from fastardiff_ds.training.loop import LoopConfig, Trainer
from fastardiff_ds.training.preemption import PREEMPTED_EXIT_CODE, PreemptionWatcher


class _Loader:
    def __iter__(self):
        return iter({"x": torch.zeros(2, 1)} for _ in range(1000))

    def state_dict(self):
        return {}


class _Task(_AccumTask):
    """test_loop_accumulation's stub task, sending itself a real signal at a given micro-batch."""

    def __init__(self, signal_at=None):
        super().__init__()
        self.signal_at, self.finished, self.exported = signal_at, False, False

    def step_fn(self, inputs, step, gen):
        row = super().step_fn(inputs, step, gen)
        if self.signal_at is not None and len(self.seen) == self.signal_at[0]:
            os.kill(os.getpid(), self.signal_at[1])  # a real signal, mid accumulation window
        return row

    def finish(self, loader):
        self.finished = True
        return {}

    def export(self, meta):
        self.exported = True
        return None


class _Logger:
    run_id = None

    def __init__(self):
        self.rows, self.finished = [], False

    def log(self, row, step=None):
        self.rows.append(row)

    def finish(self):
        self.finished = True


@pytest.fixture
def watcher():
    w = PreemptionWatcher(grace_s=30.0).install()
    yield w
    w.uninstall()


def _trainer(tmp_path, task, logger, saved, save_s=0.0, **loop):
    trainer = Trainer(Runtime(), task, LoopConfig(**{"steps": 10, "log_every": 1, "save_every": 100, **loop}),
                      run_dir=tmp_path, config={}, seed=0, logger_factory=lambda run_id: logger)

    def save(loader, **_):
        time.sleep(save_s)
        saved.append(trainer.state.step)
        return tmp_path / f"step_{trainer.state.step:06d}"

    trainer.save = save
    return trainer


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_stops_at_the_next_optimizer_step_saves_and_skips_the_end_of_run(tmp_path, watcher, sig):
    task, logger, saved = _Task(signal_at=(3, sig)), _Logger(), []  # 3rd micro-batch: the 1st of step 2's window
    out = _trainer(tmp_path, task, logger, saved, grad_accum=2).fit(_Loader(), preemption=watcher)
    assert task.seen == [0, 0, 1, 1]  # the window in flight is completed: the boundary is an optimizer step
    assert out["preempted"] and out["step"] == 2 and saved == [2]
    assert out["checkpoint"].endswith("step_000002") and out["export"] is None
    assert not task.finished and not task.exported  # tau, export and sampling are the resumed run's
    assert logger.finished and logger.rows[-1] == {"preempted_at_step": 2}
    assert watcher.signal_name == signal.Signals(sig).name and 0 <= out["signal_to_saved_s"] < 10
    assert PREEMPTED_EXIT_CODE == 75


def test_without_a_signal_the_run_finishes(tmp_path, watcher):
    task, saved = _Task(), []
    out = _trainer(tmp_path, task, _Logger(), saved, steps=3).fit(_Loader(), preemption=watcher)
    assert "preempted" not in out and out["step"] == 3 and saved == [3] and task.finished and task.exported


def test_a_second_signal_only_flags_again(tmp_path, watcher):
    os.kill(os.getpid(), signal.SIGTERM)
    first = watcher.received_at
    os.kill(os.getpid(), signal.SIGTERM)  # slurm's repeat or DeepSpeed's forwarding: no exit, the first time kept
    assert watcher.requested and watcher.received_at == first


def test_a_save_later_than_the_grace_is_a_warning_with_the_measured_times(tmp_path):
    w = PreemptionWatcher(grace_s=0.05).install()
    try:
        task, saved = _Task(signal_at=(2, signal.SIGTERM)), []
        with pytest.warns(UserWarning, match=r"complete \d+\.\ds after the signal .*save 0\.[1-9]s.*"
                                             r"preempt_grace_s=0\.05s"):
            out = _trainer(tmp_path, task, _Logger(), saved, save_s=0.15).fit(_Loader(), preemption=w)
    finally:
        w.uninstall()
    assert out["preempted"] and saved == [2]


def test_the_first_save_warns_when_a_step_and_a_save_exceed_the_grace(tmp_path):
    w = PreemptionWatcher(grace_s=0.05).install()
    try:
        with pytest.warns(UserWarning, match=r"a preemption now could not be saved in time: .* a save 0\.[1-9]s.*"
                                             r"--signal=TERM@"):
            out = _trainer(tmp_path, _Task(), _Logger(), [], save_s=0.15, steps=3, save_every=1).fit(
                _Loader(), preemption=w)
    finally:
        w.uninstall()
    assert out["step"] == 3


@pytest.mark.parametrize("key", ["train.preempt_grace_s", "pretrain.preempt_grace_s"])
def test_grace_key_is_validated(key):
    from fastardiff_ds.config import ConfigError, resolve_config

    section, name = key.split(".")
    assert getattr(getattr(resolve_config("tiny"), section), name) == 30.0
    assert getattr(getattr(resolve_config("tiny", overrides=[f"{key}=12.5"]), section), name) == 12.5
    with pytest.raises(ConfigError, match=rf"{key}.*> 0"):
        resolve_config("tiny", overrides=[f"{key}=0"])
