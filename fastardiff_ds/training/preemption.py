"""Preemption: SIGTERM or SIGUSR1 -> every rank stops at the next optimizer step, saves, exits PREEMPTED_EXIT_CODE.

Cluster schedulers warn before they kill: slurm sends SIGTERM at preemption (then SIGKILL after the partition's
GraceTime / KillWait, 30 s by default) and SIGUSR1 (or any signal) at a chosen lead time with `--signal=USR1@120`.
Both launchers install a `PreemptionWatcher` before they build anything; its handler only records the signal and
when it came (no I/O, no collective: a handler runs between any two bytecodes). `Trainer.fit` reads the flag at
every optimizer-step boundary through `Runtime.any_rank`, so all ranks stop at the same step even when the signal
reaches them at slightly different times (or reaches only one of them); they save the checkpoint, skip the
end-of-run tau measurement, export and sampling (the resumed run does them), and the launcher exits with
PREEMPTED_EXIT_CODE = 75, sysexits.h EX_TEMPFAIL ("temporary failure; the user is invited to retry"), which no
other exit of the launchers uses: requeue when you see it, then `--resume auto` continues the same loss curve.
Further signals (the scheduler's repeat, DeepSpeed's launcher forwarding its own) only set the flag again.

`train.preempt_grace_s` / `pretrain.preempt_grace_s` (default 30 s, slurm's default KillWait and DeepSpeed's
wait below) is the time a save may take after the signal. The loop cannot shorten a step or a save, so it says
when they do not fit: a warning at the first save if one step + one save already exceed it (raise the signal's
lead time, `--signal=TERM@<s>`), and one after a preemption save that finished later than the grace.

Who gets the signal (DeepSpeed 0.19 `deepspeed` on one node: runner.py -> launch.py -> one process per rank):
    every rank directly (slurm `srun` with one task per rank, or `kill` on the rank pids): each rank exits 75,
        launch.py passes the first non-zero code on (it SIGTERMs the other ranks, harmless here) and so does the
        runner: the job exits 75.
    the whole process tree (`kill -TERM -<pgid>`, slurm signalling every process of a step): the ranks save and
        exit 75 as above, but the runner installs no handler on one node and dies at once (status 143, 128 + 15),
        and launch.py terminates the ranks' trees, waits up to 30 s, then SIGKILLs them and exits 1: the save
        must fit in 30 s there whatever the grace says, and the checkpoint (`latest`) is the proof, not the code.
        SIGUSR1 to the tree: neither runner.py nor launch.py handles it, both die at once (its default action), and
        the ranks save and exit 75 unwatched.
    only the runner: it dies (143) and the ranks never hear of it; signal the process group or the ranks.
(tests/distributed/test_preemption.py sends real signals both ways.)
"""
from __future__ import annotations

import signal
import time

PREEMPTED_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: preempted, checkpoint saved, resume with --resume auto
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
    """Records the first preemption signal; `requested` is this rank's view (agree with `Runtime.any_rank`)."""

    def __init__(self, grace_s: float = 30.0):
        self.grace_s = grace_s
        self.signum: int | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self._previous: dict = {}

    def install(self) -> "PreemptionWatcher":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handler(self, signum, frame) -> None:  # only flags: no I/O, no locks, no collectives
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def seconds_since_signal(self) -> float:
        """Seconds since this rank's signal; 0 when it got none (another rank did)."""
        return time.monotonic() - self.received_at if self.received_at is not None else 0.0


def grace_warning(grace_s: float, step_s: float, save_s: float) -> str | None:
    """The warning a run gets at its first save when one step + one save would not fit in the grace, else None."""
    if step_s + save_s <= grace_s:
        return None
    return (f"a preemption now could not be saved in time: one step takes {step_s:.1f}s and a save {save_s:.1f}s, "
            f"more than preempt_grace_s={grace_s:g}s; ask the scheduler for a longer lead time "
            f"(slurm: --signal=TERM@{int(2 * (step_s + save_s)) + 1}) and set preempt_grace_s to it")


def late_save_warning(grace_s: float, since_signal_s: float, step_s: float, save_s: float) -> str | None:
    """The warning after a preemption save that finished more than `grace_s` after the signal, else None."""
    if since_signal_s <= grace_s:
        return None
    return (f"the preemption checkpoint was complete {since_signal_s:.1f}s after the signal (last step "
            f"{step_s:.1f}s, save {save_s:.1f}s), later than preempt_grace_s={grace_s:g}s: a scheduler that kills "
            f"after the grace may have killed it first; give it a longer lead time (slurm: --signal=TERM@<s>)")
