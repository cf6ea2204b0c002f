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
        new rank r + W*j taking every m-th raw position after the cursor, starting with the j-th.
    Shuffle-buffer order and text-dropout decisions are those of the old reader, so the union of what the
    new ranks read is what the uninterrupted run would have read: no sample twice, none skipped, except at
    the end of the epoch, where every new rank runs the same number of batches (the minimum over ranks) and
    each worker only full batches: fewer than N' * B samples per new rank (+ the supply difference between
    ranks, a few samples when streams split unevenly) are dropped. Readers that skip bad samples may read a
    few samples past the old quota (a stream never runs dry: it starts another pass).
    The per-rank batch size may change with the world size (e.g. to keep the global batch).
    A state that already continued other ranks' streams is re-split the same way (its segments' rest).
  * a world-size ratio that is not an integer (e.g. 2 -> 3): the interrupted epoch is closed and the next
    one starts (nothing repeats, the rest of that epoch is dropped), with a warning -- the rule of a
    same-size restart with another number of workers.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def remaining(st: dict, rank: int, old_world: int, n_batches_old: int, old_batch: int) -> list[dict]:
    """The segments saved rank state ``st`` (rank ``rank`` of ``old_world``) still owed to the epoch.

    A segment is one saved reader's stream: {"rank", "world", "worker", "readers"} name the reader (its shard
    split and seeds), "cursor" the raw position to continue from, and the positions ``cursor + offset +
    stride * i`` for i < "take" are its samples. A plain state owes ``q * old_batch`` samples per worker; a
    state that already continued other ranks' streams (``carry``) owes what its segments have left.
    """
    n = st["num_readers"]
    cursors = st["worker_cursors"] or [None] * n
    if st.get("carry") is None:
        done = st["worker_batches"] or [0] * n
        return [{"rank": rank, "world": old_world, "worker": w, "readers": n, "cursor": cursors[w] or 0,
                 "stride": 1, "offset": 0, "take": (len(range(w, n_batches_old, n)) - done[w]) * old_batch}
                for w in range(n)]
    out = []
    for w in range(n):
        at = cursors[w] or [0, -1, 0]  # [segment, raw position after the last sample, samples taken]
        for k, seg in enumerate(s for i, s in enumerate(st["carry"]) if i % n == w):
            if k == at[0] and at[1] >= 0:
                moved = at[1] - seg["cursor"]
                seg = {**seg, "cursor": at[1], "offset": (seg["offset"] - moved) % seg["stride"],
                       "take": seg["take"] - at[2]}
            if k >= at[0] and seg["take"] > 0:
                out.append(seg)
    return out


def split(seg: dict, m: int, j: int) -> dict:
    """Part ``j`` of ``m`` of a segment: every m-th of its samples, starting with the j-th."""
    s, t = seg["stride"], seg["take"]
    return {**seg, "stride": s * m, "offset": seg["offset"] + s * j, "take": -(-(t - j) // m) if t > j else 0}


def plan_segments(states: list[dict], n_batches_old: int, old_batch: int, rank: int, world: int) -> list[dict] | None:
    """The segments new rank ``rank`` of ``world`` continues, or None when one world size does not divide the
    other. ``take`` counts samples, so the per-rank batch size may change with the world size."""
    old_world = len(states)
    if old_world % world and world % old_world:
        return None
    if old_world % world == 0:
        return [seg for r in range(rank, old_world, world)
                for seg in remaining(states[r], r, old_world, n_batches_old, old_batch)]
    r = rank % old_world
    return [split(seg, world // old_world, rank // old_world)
            for seg in remaining(states[r], r, old_world, n_batches_old, old_batch)]


def _worker_batches(segs: list[dict], readers: int, batch: int) -> list[int]:
    return [sum(s["take"] for k, s in enumerate(segs) if k % readers == w) // batch for w in range(readers)]


def resplit_state(states: list[dict], *, rank: int, world: int, readers: int, batch: int, n_batches: int,
                  total_samples: int, resampled: bool, state_cls):
    """A ``LoaderState`` for new rank ``rank`` continuing the epoch the saved ``states`` were in."""
    st0 = states[0]
    base = dict(epoch=st0["epoch"], seed=st0["seed"], world_size=world, num_readers=readers,
                skipped=dict(st0.get("skipped", {})), worker_batches=[], worker_cursors=[])
    consumed = sum(s["samples_consumed"] for s in states)
    if not any(s["batches_consumed"] or s.get("carry") for s in states):  # saved at an epoch boundary
        return state_cls(**base)
    if resampled:
        done = min(n_batches, consumed // (batch * world))
        return state_cls(**base, batches_consumed=done, samples_consumed=done * batch, resumes=st0["resumes"] + 1)
    busy = max(states, key=lambda s: s["batches_consumed"] if s.get("carry") is None else -1)
    old_batch = busy["samples_consumed"] // max(1, busy["batches_consumed"])
    n_old = total_samples // (old_batch * len(states)) if old_batch else 0
    segs = plan_segments(states, n_old, old_batch, rank, world)
    if segs is None:
        log.warning("loader state was saved on %d ranks (now %d; neither divides the other): closing epoch %d "
                    "early and starting the next", len(states), world, st0["epoch"])
        return state_cls(**{**base, "epoch": st0["epoch"] + 1})
    # every new rank runs the same number of batches: the smallest supply of any new rank
    supply = min(sum(_worker_batches(plan_segments(states, n_old, old_batch, r, world), readers, batch))
                 for r in range(world))
    left = min(supply, n_batches)
    quota = _worker_batches(segs, readers, batch)
    for w in reversed(range(readers)):  # trim from the last worker down to the common count
        quota[w] -= min(quota[w], sum(quota) - left)
    return state_cls(**{**base, "worker_batches": [0] * readers, "worker_cursors": [None] * readers},
                     batches_consumed=n_batches - left, samples_consumed=(n_batches - left) * batch,
                     carry=segs, carry_quota=quota)
