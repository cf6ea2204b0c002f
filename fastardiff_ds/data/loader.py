"""Streaming webdataset loader for training: `build_loader(cfg, rank=, world_size=, ...)`.

Why not webdataset's `split_by_node`: it reads env RANK/WORLD_SIZE and ignores groups (systems.md
pitfall 6), while our data-parallel group may exclude teacher-only ranks -- so rank / world_size are
arguments. Shard assignment, shuffling and decoding live in reader.py.

Epoch = exactly ``samples_per_epoch // (batch_size * world_size)`` batches on every rank, so ZeRO-3 /
DDP collectives never wait on a rank that ran dry.

Resume contract (`LoaderState`, saved with the trainer state):
  * non-resampled mode is exact: a restarted loader replays each worker's shard order and shuffle
    buffer (reading tars, not decoding) up to the worker's cursor, and the rest of the epoch is exactly
    the samples not yet consumed (text-dropout decisions included). This needs the same shards,
    world_size, num_workers and batch_size; otherwise the interrupted epoch is closed and the next one
    starts (nothing repeats; the unconsumed remainder of that epoch is dropped, with a warning).
  * resampled mode is exact in *count* and *distribution*: the remaining batches of the epoch come
    from a fresh with-replacement draw seeded by (seed, epoch, rank, worker, resume count), not the
    draw the uninterrupted run would have made (that draw is i.i.d. anyway, and costs no replay).
  * another world size: `resume_from(every saved rank's state)` re-splits the epoch (resplit.py): the
    saved readers' streams are continued by the new ranks when one world size divides the other.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from fastardiff_ds.data.config import DataConfig
from fastardiff_ds.data.metadata import count_samples
from fastardiff_ds.data.reader import Plan, WorkerStream
from fastardiff_ds.data.resplit import resplit_state
from fastardiff_ds.data.shards import expand_shards

log = logging.getLogger(__name__)


@dataclass
class LoaderState:
    """Resumable position of one rank's loader (store `to_dict()` in the trainer checkpoint)."""

    epoch: int = 0
    seed: int = 0
    batches_consumed: int = 0  # this rank, this epoch
    samples_consumed: int = 0  # this rank, this epoch
    worker_batches: list[int] = field(default_factory=list)  # batches consumed per worker, this epoch
    worker_cursors: list[int] = field(default_factory=list)  # raw samples consumed per worker, this epoch
    world_size: int = 1
    num_readers: int = 1  # max(1, num_workers)
    resumes: int = 0  # mid-epoch restarts in this epoch (salts resampled-mode seeds)
    skipped: dict[str, int] = field(default_factory=dict)  # whole run, by reason
    carry: list[dict] | None = None  # saved readers' streams this rank continues (world-size change, resplit.py)
    carry_quota: list[int] | None = None  # batches per worker while carrying

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        return cls(**d)


class StreamingLoader:
    """Iterable over one epoch per `iter()`; re-iterating continues from `state` (mid-epoch or next epoch).

    Batches: {"pixels" (B,3,R,R) in [-1,1] | "latents" (B,C,h,w), "input_ids" (B,L) long,
    "attention_mask" (B,L) long (1 = real token, left padding), "captions", "keys", ["labels" (B,)]};
    with `image_transform`, also "latents" = image_transform(pixels) computed in the main process
    (so a GPU VAE can run there).
    """

    def __init__(self, cfg: DataConfig, *, rank: int, world_size: int, tokenize: Callable[[str], list[int]],
                 pad_id: int, image_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 state: LoaderState | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        cfg.require_resolved()
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.tokenize, self.pad_id, self.image_transform = tokenize, pad_id, image_transform
        self.shards = expand_shards(cfg.shards)
        self.num_readers = max(1, cfg.num_workers)
        if not cfg.resampled and len(self.shards) < world_size * self.num_readers:
            raise ValueError(
                f"{len(self.shards)} shards in {cfg.shards!r} cannot feed world_size={world_size} x "
                f"num_workers={self.num_readers} readers without a rank going dry; use resampled=True, "
                "fewer workers or more (smaller) shards")
        total = cfg.samples_per_epoch or count_samples(self.shards, resampled=cfg.resampled)
        self.total_samples = total
        self.batches_per_epoch = total // (cfg.batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(f"{total} samples per epoch < one global batch ({cfg.batch_size} x {world_size})")
        self.state = LoaderState(seed=cfg.seed, world_size=world_size, num_readers=self.num_readers)
        self.bytes_read = 0
        if state is not None:
            self.load_state_dict(state if isinstance(state, dict) else state.to_dict())

    def __len__(self) -> int:
        return self.batches_per_epoch

    def fresh(self, **changes) -> "StreamingLoader":
        """A new loader over the same shards and ranks from the start of epoch 0, with its own iterator and
        workers (this one's state is untouched); `changes` replace DataConfig fields (e.g. num_workers=0).
        The epoch length is kept unless `samples_per_epoch` or `batch_size` is changed."""
        if "batch_size" not in changes:
            changes.setdefault("samples_per_epoch", self.batches_per_epoch * self.cfg.batch_size * self.world_size)
        return StreamingLoader(dataclasses.replace(self.cfg, **changes), rank=self.rank, world_size=self.world_size,
                               tokenize=self.tokenize, pad_id=self.pad_id, image_transform=self.image_transform)

    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, d: dict) -> None:
        st = LoaderState.from_dict(dict(d))
        same = (st.world_size, st.num_readers) == (self.world_size, self.num_readers)
        if st.batches_consumed and not same and not self.cfg.resampled:
            log.warning("loader state was saved with world_size=%d num_workers=%d (now %d, %d): closing epoch %d "
                        "early and starting the next", st.world_size, st.num_readers, self.world_size,
                        self.num_readers, st.epoch)
            st = dataclasses.replace(st, epoch=st.epoch + 1, batches_consumed=0, samples_consumed=0,
                                     worker_batches=[], worker_cursors=[], resumes=0, carry=None, carry_quota=None)
        self.state = dataclasses.replace(st, world_size=self.world_size, num_readers=self.num_readers)

    def resume_from(self, states: list[dict]) -> None:
        """Resume from every saved rank's state in rank order (a checkpoint's ``peers``): on the saved world
        size this rank's own state; on another, the epoch is re-split over the new ranks (resplit.py)."""
        if len(states) == self.world_size:
            return self.load_state_dict(states[self.rank])
        self.state = resplit_state([dict(s) for s in states], rank=self.rank, world=self.world_size,
                                   readers=self.num_readers, batch=self.cfg.batch_size,
                                   n_batches=self.batches_per_epoch, total_samples=self.total_samples,
                                   resampled=self.cfg.resampled, state_cls=LoaderState)

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason over the run (as of the last consumed batch)."""
        return dict(self.state.skipped)

    def _plan(self) -> Plan:
        st, n = self.state, self.num_readers
        if len(st.worker_batches) != n:  # fresh epoch, or resampled resume with a new worker count
            left = self.batches_per_epoch - st.batches_consumed
            st.worker_batches = [len(range(w, self.batches_per_epoch, n)) - len(range(w, left, n)) for w in range(n)]
            st.worker_cursors = [0] * n
        if st.batches_consumed:
            st.resumes += 1
        if self.cfg.resampled:  # fresh draw, salted by the restart count (see module docstring)
            cursors, salt = [0] * n, st.resumes
        else:  # exact replay: same seeds, fast-forward to the cursors
            cursors, salt = list(st.worker_cursors), 0
        return Plan(self.cfg, self.shards, self.rank, self.world_size, n, st.epoch, self.batches_per_epoch,
                    list(st.worker_batches), cursors, salt, st.carry, st.carry_quota)

    def __iter__(self) -> Iterator[dict]:
        st, cfg = self.state, self.cfg
        plan = self._plan()
        loader = DataLoader(WorkerStream(plan, self.tokenize, self.pad_id), batch_size=None,
                            num_workers=cfg.num_workers,
                            prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None)
        base, live, live_bytes = Counter(st.skipped), {}, {}
        for batch in loader:
            w = batch.pop("_worker")
            st.worker_cursors[w] = batch.pop("_cursor")
            live[w], live_bytes[w] = batch.pop("_skipped"), batch.pop("_bytes")
            st.worker_batches[w] += 1
            st.batches_consumed += 1
            st.samples_consumed += len(batch["keys"])
            st.skipped = dict(sum((Counter(c) for c in live.values()), base))
            self.bytes_read = sum(live_bytes.values())
            if self.image_transform is not None:
                batch["latents"] = self.image_transform(batch["pixels"])
            yield batch
        if st.batches_consumed != self.batches_per_epoch:
            raise RuntimeError(f"internal: epoch {st.epoch} ended after {st.batches_consumed} of "
                               f"{self.batches_per_epoch} batches on rank {self.rank}")
        self.state = dataclasses.replace(st, epoch=st.epoch + 1, batches_consumed=0, samples_consumed=0,
                                         worker_batches=[], worker_cursors=[], resumes=0, carry=None,
                                         carry_quota=None)


def build_loader(cfg: DataConfig, *, rank: int, world_size: int, tokenize: Callable[[str], list[int]],
                 pad_id: int, image_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 state: LoaderState | dict | None = None) -> StreamingLoader:
    """The training data loader for data-parallel `rank` of `world_size` (see StreamingLoader)."""
    return StreamingLoader(cfg, rank=rank, world_size=world_size, tokenize=tokenize, pad_id=pad_id,
                           image_transform=image_transform, state=state)
