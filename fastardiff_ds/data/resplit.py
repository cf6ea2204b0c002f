"""Continue an interrupted epoch on another world size: re-split every saved rank's loader state.

Rule (documented in README and loader.py):
  * resampled mode: exact in count. The global samples already consumed in the epoch
    (``sum(samples_consumed)`` over the saved ranks) are converted to this layout's batches; the rest of
    the epoch is a fresh with-replacement draw (salted by the restart count), as on a same-size restart.
  * non-resampled mode: the saved readers' streams are continued, not restarted. Each saved reader
    (rank r, worker w of W ranks x N workers) still owed ``q`` batches of the epoch; its stream is replayed
    (tars read, nothing decoded) to its cursor and continued on the new ranks:
      - W' divides W (shrink): new rank r' takes the whole streams of the old ranks r = r' (mod W');
      - W divides W' (grow): old rank r's streams are shared by the m = W'/W new ranks r + W*j, j < m,
        new rank r + W*j taking the raw positions = j (mod m) after the cursor.
    Shuffle-buffer order and text-dropout decisions are those of the old reader, so the union of what the
    new ranks read is what the uninterrupted run would have read: no sample twice, none skipped, except
    that every new rank runs the same number of batches (the minimum over ranks), so up to
    ``(N' + 1) * B`` samples per new rank at the end of the epoch are dropped. Ranks whose readers skipped
    bad samples may read a few samples past the old quota (a stream never runs dry: it starts another pass).
  * anything else (a world-size ratio that is not an integer, another batch size, a second change of world
    size inside the same epoch): the interrupted epoch is closed and the next one starts (nothing repeats,
    the rest of that epoch is dropped), with a warning -- the rule of a same-size restart with another
    number of workers.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _owed(st: dict, n_batches: int) -> list[tuple[int, int]]:
    """(raw cursor, batches still owed) of each worker of one saved rank state (non-carry)."""
    n = st["num_readers"]
    done = st["worker_batches"] or [0] * n
    cursors = st["worker_cursors"] or [0] * n
    return [(cursors[w], len(range(w, n_batches, n)) - done[w]) for w in range(n)]


def plan_segments(states: list[dict], n_batches_old: int, batch: int, rank: int, world: int) -> list[dict] | None:
    """The saved streams new rank ``rank`` of ``world`` continues, or None when the rule does not apply."""
    old_world = len(states)
    if old_world % world and world % old_world:
        return None
    segs = []
    if old_world % world == 0:
        olds, stride, offset = range(rank, old_world, world), 1, 0
    else:
        olds, stride, offset = [rank % old_world], world // old_world, rank // old_world
    for r in olds:
        for w, (cursor, owed) in enumerate(_owed(states[r], n_batches_old)):
            need = owed * batch
            take = (need - offset + stride - 1) // stride if need > offset else 0
            segs.append({"rank": r, "world": old_world, "worker": w, "readers": states[r]["num_readers"],
                         "cursor": cursor, "stride": stride, "offset": offset, "take": take})
    return segs


def _worker_batches(segs: list[dict], readers: int, batch: int) -> list[int]:
    return [sum(s["take"] for k, s in enumerate(segs) if k % readers == w) // batch for w in range(readers)]


def resplit_state(states: list[dict], *, rank: int, world: int, readers: int, batch: int, n_batches: int,
                  total_samples: int, resampled: bool, state_cls):
    """A ``LoaderState`` for new rank ``rank`` continuing the epoch the saved ``states`` were in."""
    st0 = states[0]
    base = dict(epoch=st0["epoch"], seed=st0["seed"], world_size=world, num_readers=readers,
                skipped=dict(st0.get("skipped", {})), worker_batches=[], worker_cursors=[])
    consumed = sum(s["samples_consumed"] for s in states)
    if not any(s["batches_consumed"] for s in states):  # saved at an epoch boundary: nothing to re-split
        return state_cls(**base)
    if resampled:
        done = min(n_batches, consumed // (batch * world))
        return state_cls(**base, batches_consumed=done, samples_consumed=done * batch, resumes=st0["resumes"] + 1)
    old_batch = st0["samples_consumed"] // max(1, st0["batches_consumed"])
    nested = any(s.get("carry") for s in states)
    n_old = total_samples // (batch * len(states))
    segs = None if nested or old_batch != batch else plan_segments(states, n_old, batch, rank, world)
    if segs is None:
        log.warning("loader state was saved on %d ranks (now %d, batch %d -> %d%s): closing epoch %d early and "
                    "starting the next", len(states), world, old_batch, batch,
                    ", already re-split once" if nested else "", st0["epoch"])
        return state_cls(**{**base, "epoch": st0["epoch"] + 1})
    # every new rank runs the same number of batches: the smallest supply of any new rank
    supply = min(sum(_worker_batches(plan_segments(states, n_old, batch, r, world), readers, batch))
                 for r in range(world))
    left = min(supply, n_batches)
    quota = _worker_batches(segs, readers, batch)
    for w in reversed(range(readers)):  # trim from the last worker down to the common count
        quota[w] -= min(quota[w], sum(quota) - left)
    return state_cls(**{**base, "worker_batches": [0] * readers, "worker_cursors": [None] * readers},
                     batches_consumed=n_batches - left, samples_consumed=(n_batches - left) * batch,
                     carry=segs, carry_quota=quota)
