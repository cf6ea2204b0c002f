"""Configuration of the streaming data loader (composed into the global config tree by the lead)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Kind = Literal["pixels", "latents"]
Conditioning = Literal["text", "class"]
Interpolation = Literal["bicubic", "bilinear", "box", "nearest", "lanczos"]
KINDS, INTERPOLATIONS = get_args(Kind), get_args(Interpolation)


@dataclass
class DataConfig:
    """Streaming webdataset loader settings.

    shards: a brace pattern (``/d/{00000..00099}.tar``), a directory of ``*.tar`` or a ``.txt``
        list file with one shard path per line (relative paths resolve against the list's folder).
    batch_size: per data-parallel rank.
    samples_per_epoch: global samples in one epoch (all ranks); None -> the dataset size from
        ``sizes.json`` / ``{shard}_stats.json`` / ``{shard}.parquet``, or a header scan of a tar that has
        none of them (metadata.py). Every rank yields exactly
        ``samples_per_epoch // (batch_size * world_size)`` batches per epoch.
    resampled: draw shards with replacement (infinite stream, no shard-count requirement, no per-shard
        counts needed: without samples_per_epoch the epoch length is an estimate, see metadata.py).
    shuffle_shards / shuffle_buffer: shard-order shuffle per epoch and sample shuffle buffer
        (0 or 1 disables it) -- both seeded by (seed, epoch, rank, worker).
    kind: "pixels" reads ``jpg/png/webp``; "latents" reads ``latent.npy`` written by encode_latents.
    resolution / max_text_len / seed: None only inside the root config, which derives them from the model
        (model.image.resolution; model.text.max_length + the prompt suffix) and the root seed
        (config/rules.py); the loader needs them set.
    min_image_size: images whose shorter side is smaller are skipped (reason "too_small").
    conditioning: "text" needs a caption (``KEY.txt``); "class" needs a class label instead: ``KEY.cls`` (an
        integer as text, as webdataset's ImageNet shards and img2dataset's class columns write it) or the JSON's
        "label", and ``num_classes`` bounds it (skip reasons "missing_label", "bad_cls", "label_out_of_range").
    """

    shards: str = ""
    resolution: int | None = 32
    batch_size: int = 8
    num_workers: int = 2
    shuffle_shards: bool = True
    shuffle_buffer: int = 1000
    resampled: bool = False
    samples_per_epoch: int | None = None
    seed: int | None = 0
    drop_text_prob: float = 0.1
    max_text_len: int | None = 64
    kind: Kind = "pixels"
    interpolation: Interpolation = "bicubic"
    min_image_size: int = 16
    prefetch_factor: int = 2
    conditioning: Conditioning = "text"
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"DataConfig.kind={self.kind!r}; expected one of {KINDS}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"DataConfig.interpolation={self.interpolation!r}; expected one of {INTERPOLATIONS}")
        if self.batch_size < 1 or any(v is not None and v < 1 for v in (self.resolution, self.max_text_len)):
            raise ValueError("DataConfig.batch_size, resolution and max_text_len must be >= 1")
        if not 0.0 <= self.drop_text_prob <= 1.0:
            raise ValueError(f"DataConfig.drop_text_prob={self.drop_text_prob} must be in [0, 1]")
        if self.samples_per_epoch is not None and (not isinstance(self.samples_per_epoch, int)
                                                   or self.samples_per_epoch < 1):
            raise ValueError(f"DataConfig.samples_per_epoch={self.samples_per_epoch!r} must be an int >= 1 or None "
                             "(None = count the shards)")
        if self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers={self.num_workers} must be >= 0")

    def require_resolved(self) -> None:
        """The loader needs every derived field set (the root config fills them when it is resolved)."""
        unset = [k for k in ("resolution", "max_text_len", "seed") if getattr(self, k) is None]
        if unset:
            raise ValueError(f"data.{unset[0]} is None: resolve the config first (fastardiff_ds.config.resolve_config "
                             "derives it from the model) or set it")
