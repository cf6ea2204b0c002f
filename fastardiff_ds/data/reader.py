"""Per-worker reader of the streaming loader: shard assignment, tar -> shuffle -> decode -> batch.

For one (rank, worker) and one epoch (all randomness seeded by (seed, epoch, rank, worker)):

    shards --[pass p: global order perm(seed, epoch, p); this rank's [rank::world], this worker's [w::W]]
           --> tar members grouped by key --> shuffle buffer --> decode (caption; image -> resize /
           centre-crop -> [-1, 1], or latent) --> text dropout --> tokenize --> batches

A worker yields exactly its quota of batches (batch i of the epoch belongs to worker i % W); a
non-resampled reader whose shards run out starts another (reshuffled) pass. Each batch carries the
worker's raw cursor (samples emitted by its shuffle buffer, skipped ones included) so a restarted
reader can fast-forward to it without decoding (see loader.py for the resume contract).
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset, get_worker_info

from fastardiff_ds.data.config import DataConfig
from fastardiff_ds.data.decode import (SkipSample, decode_caption, decode_image, decode_json, decode_label,
                                       decode_latent, tokenize_caption)
from fastardiff_ds.data.shards import SkipCounter, iter_tar


def mix_seed(*parts: int) -> int:
    """A 64-bit seed from integers (stable across processes, unlike hash())."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def shuffle_buffer(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Approximate shuffle: keep `size` items, emit a uniformly chosen one per new arrival."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        k = rng.randrange(size)
        yield buf[k]
        buf[k] = item
    rng.shuffle(buf)
    yield from buf


@dataclass
class Plan:
    """Everything a worker needs to produce its part of one epoch (picklable, copied into workers)."""

    cfg: DataConfig
    shards: list[str]
    rank: int
    world_size: int
    num_readers: int
    epoch: int
    n_batches: int
    worker_batches: list[int]
    worker_cursors: list
    salt: int
    carry: list[dict] | None = None  # old readers' streams continued by this rank (see resplit.py)
    carry_quota: list[int] | None = None  # batches per worker when carrying

    def quota(self, w: int) -> int:
        if self.carry is not None:
            return self.carry_quota[w] - self.worker_batches[w]
        return len(range(w, self.n_batches, self.num_readers)) - self.worker_batches[w]


class WorkerStream(IterableDataset):
    """One epoch of batches for one DataLoader worker (see module docstring)."""

    def __init__(self, plan: Plan, tokenize: Callable[[str], list[int]], pad_id: int):
        self.plan, self.tokenize, self.pad_id = plan, tokenize, pad_id
        self.pass_raw: int | None = None  # raw samples in one full pass, once known

    def _raw(self, w: int, skips: SkipCounter) -> Iterator[dict]:
        """This worker's raw samples, shuffled; a non-resampled pass is shuffled (and drained) on its own
        so that pass 0 never shows samples of another reader's shards."""
        p, cfg = self.plan, self.plan.cfg
        buf_rng = random.Random(mix_seed(cfg.seed, p.epoch, p.rank, w, p.salt, 1))
        if cfg.resampled:
            yield from shuffle_buffer(self._resampled(w, skips), cfg.shuffle_buffer, buf_rng)
            return
        for pass_idx in range(1 << 62):
            order = list(range(len(p.shards)))
            if cfg.shuffle_shards:
                random.Random(mix_seed(cfg.seed, p.epoch, pass_idx)).shuffle(order)
            mine = [p.shards[i] for i in order[p.rank :: p.world_size][w :: p.num_readers]]
            got = 0
            for sample in shuffle_buffer((s for shard in mine for s in iter_tar(shard, skips)),
                                         cfg.shuffle_buffer, buf_rng):
                got += 1
                yield sample
            if got == 0:
                raise RuntimeError(_empty_msg(cfg.shards, skips, mine))
            self.pass_raw = self.pass_raw or got

    def _resampled(self, w: int, skips: SkipCounter) -> Iterator[dict]:
        """Shards drawn with replacement, forever; errors out if ~20 passes' worth of draws are all empty."""
        p = self.plan
        rng = random.Random(mix_seed(p.cfg.seed, p.epoch, p.rank, w, p.salt))
        dry = 0
        while True:
            got = 0
            for sample in iter_tar(p.shards[rng.randrange(len(p.shards))], skips):
                got += 1
                yield sample
            dry = 0 if got else dry + 1
            if dry >= 20 * len(p.shards) + 20:
                raise RuntimeError(_empty_msg(p.cfg.shards, skips))
            self.pass_raw = self.pass_raw or (got * len(p.shards) or None)

    def _decode(self, raw: dict, w: int, idx: int) -> dict:
        p, cfg = self.plan, self.plan.cfg
        meta = decode_json(raw)
        label = decode_label(raw, meta, cfg.num_classes) if cfg.conditioning == "class" else None
        caption = decode_caption(raw) if label is None else ""  # class-conditional: no caption needed
        if cfg.kind == "latents":
            image = decode_latent(raw)
        else:
            image = decode_image(raw, cfg.resolution, cfg.min_image_size, cfg.interpolation)
        # text dropout for CFG: a hash of the sample's stream position, so replay/resume agree
        u = mix_seed(cfg.seed, p.epoch, p.rank, w, idx, p.salt) / 2.0**64
        caption = "" if u < cfg.drop_text_prob else caption
        try:
            ids, mask = tokenize_caption(caption, self.tokenize, self.pad_id, cfg.max_text_len)
        except Exception as e:  # a caption the tokenizer rejects is bad data, not a crash
            raise SkipSample("tokenize_error", f"{type(e).__name__}: {e}") from None
        out = {"image": image, "input_ids": ids, "attention_mask": mask, "caption": caption, "key": raw["__key__"]}
        if label is not None:
            out["label"] = label
        elif isinstance(meta.get("label"), int):
            out["label"] = meta["label"]
        return out

    def _attempt(self, raw: dict, w: int, idx: int):
        try:
            return self._decode(raw, w, idx), None
        except SkipSample as e:
            return None, e

    def _positions(self, w: int, skips: SkipCounter) -> Iterator[tuple]:
        """(raw sample, cursor after it, decoded sample or None, SkipSample or None), past the restart cursor."""
        for cursor, raw in enumerate(self._raw(w, skips), start=1):
            if cursor > self.plan.worker_cursors[w]:  # else fast-forward: consumed before a restart, not decoded
                yield raw, cursor, *self._attempt(raw, w, cursor - 1)

    def _carried(self, w: int, skips: SkipCounter) -> Iterator[tuple]:
        """Like ``_positions`` for a rank that continues saved readers' streams after a world-size change
        (resplit.py): segment k of this rank goes to worker k % W; each replays its old reader (same shards,
        shuffle and text-dropout seeds) from the saved cursor and keeps the raw positions ``offset (mod
        stride)`` until ``take`` of them decoded. The worker's last segment runs on past ``take`` only if
        skipped samples left the worker short of its quota. The cursor is [segment, raw position, taken]."""
        p = self.plan
        segs = [s for k, s in enumerate(p.carry) if k % p.num_readers == w]
        at = p.worker_cursors[w] or [0, -1, 0]
        for k in range(at[0], len(segs)):
            seg, last = segs[k], k == len(segs) - 1
            old = WorkerStream(Plan(p.cfg, p.shards, seg["rank"], seg["world"], seg["readers"], p.epoch, 0, [], [], 0),
                               self.tokenize, self.pad_id)
            start, taken = (at[1], at[2]) if k == at[0] and at[1] >= 0 else (seg["cursor"], 0)
            if taken >= seg["take"] and not last:
                continue
            for pos, raw in enumerate(old._raw(seg["worker"], skips)):
                if pos < start or (pos - seg["cursor"]) % seg["stride"] != seg["offset"]:
                    continue
                sample, err = old._attempt(raw, seg["worker"], pos)
                taken += err is None
                yield raw, [k, pos + 1, taken], sample, err
                if taken >= seg["take"] and not last:
                    break

    def __iter__(self) -> Iterator[dict]:
        p, cfg = self.plan, self.plan.cfg
        info = get_worker_info()
        w = info.id if info is not None else 0
        quota = p.quota(w)
        if quota <= 0:
            return
        skips = SkipCounter()
        stream = self._positions(w, skips) if p.carry is None else self._carried(w, skips)
        nbytes, run, batch, shape = 0, 0, [], None
        for raw, cursor, sample, err in stream:
            nbytes += raw["__bytes__"]
            try:
                if err is not None:
                    raise err
                if shape is not None and sample["image"].shape != shape:
                    raise SkipSample("bad_shape", f"{tuple(sample['image'].shape)} != {tuple(shape)}")
            except SkipSample as e:
                skips.skip(e.reason, raw["__key__"], raw["__shard__"], e.detail)
                run += 1
                if self.pass_raw is not None and run > 4 * (self.pass_raw + cfg.shuffle_buffer) + 100:
                    raise RuntimeError(_empty_msg(cfg.shards, skips)) from None
                continue
            run, shape = 0, sample["image"].shape
            batch.append(sample)
            if len(batch) == cfg.batch_size:
                yield collate(batch, cfg.kind, w, cursor, dict(skips.counts), nbytes)
                batch, quota = [], quota - 1
                if quota == 0:
                    return


def _empty_msg(pattern: str, skips: SkipCounter, shards: list[str] | None = None) -> str:
    where = f" ({len(shards)} shards of this reader, e.g. {shards[0]!r})" if shards else ""
    return (f"empty stream: shard pattern {pattern!r}{where} yielded no usable samples; "
            f"skipped so far by reason: {dict(skips.counts)}")


def collate(samples: list[dict], kind: str, worker: int, cursor: int, skipped: dict, nbytes: int) -> dict:
    """List of decoded samples -> batch dict of the loader contract (+ private bookkeeping keys)."""
    batch = {
        kind: torch.stack([s["image"] for s in samples]),  # (B,3,R,R) pixels or (B,C,h,w) latents
        "input_ids": torch.stack([s["input_ids"] for s in samples]),  # (B, L)
        "attention_mask": torch.stack([s["attention_mask"] for s in samples]),  # (B, L)
        "captions": [s["caption"] for s in samples],
        "keys": [s["key"] for s in samples],
        "_worker": worker, "_cursor": cursor, "_skipped": skipped, "_bytes": nbytes,
    }
    if all("label" in s for s in samples):
        batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)  # (B,)
    return batch
