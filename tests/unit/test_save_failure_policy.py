"""training/loop.py when a checkpoint save fails (CheckpointSaveError: a full disk): warn, keep the previous
checkpoint, train on and retry at the next save_every; stop with the error after MAX_FAILED_SAVES failures in a
row, or when the last save of the run fails."""
import warnings

import pytest

from fastardiff_ds.engines import Runtime
from fastardiff_ds.engines.checkpoint import CheckpointSaveError
from fastardiff_ds.training.loop import LoopConfig, Trainer
from test_loop_accumulation import _Loader, _Logger, _Task


class _FullDiskRuntime(Runtime):
    """A world of one whose saves fail at the given steps."""

    def __init__(self, failing):
        super().__init__()
        self.failing, self.saved = set(failing), []

    def save_checkpoint(self, root, step, engines, **kwargs):
        if step in self.failing:
            raise CheckpointSaveError(f"could not save checkpoint step_{step:06d} in {root} (No space left)")
        self.saved.append(step)
        return root / f"step_{step:06d}"


def _fit(tmp_path, failing, steps=8, save_every=2):
    rt, task = _FullDiskRuntime(failing), _Task()
    loop = LoopConfig(steps=steps, log_every=100, save_every=save_every)
    trainer = Trainer(rt, task, loop, run_dir=tmp_path, config={}, seed=0, logger_factory=lambda run_id: _Logger())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = trainer.fit(_Loader(100))
        except SystemExit as e:
            out = e
    return rt, trainer, out, [str(w.message) for w in caught if "could not save" in str(w.message)]


def test_failed_saves_warn_and_training_goes_on(tmp_path):
    rt, trainer, out, warned = _fit(tmp_path, failing={2, 4})
    assert not isinstance(out, SystemExit) and out["step"] == 8
    assert rt.saved == [6, 8]  # the retry at the next save_every succeeded
    assert len(warned) == 2 and "next save at step 4 retries" in warned[0] and "3 failed saves" in warned[0]
    assert trainer.failed_saves == 0  # a good save resets the count


def test_consecutive_failures_stop_the_run(tmp_path):
    rt, trainer, out, warned = _fit(tmp_path, failing={2, 4, 6})
    assert isinstance(out, SystemExit) and trainer.step == 6 and len(warned) == 2
    msg = str(out.code)
    assert msg.startswith("error: could not save checkpoint step_000006") and "3 failed save(s) in a row" in msg
    assert "--resume auto" in msg


def test_a_failed_final_save_stops_the_run(tmp_path):
    rt, trainer, out, warned = _fit(tmp_path, failing={8})
    assert isinstance(out, SystemExit) and rt.saved == [2, 4, 6] and not warned
    assert str(out.code).startswith("error: could not save checkpoint step_000008")
