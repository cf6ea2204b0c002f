"""Shared reductions, input checks and seeded noise for the loss functions.

Every loss in this package reduces per-item values (one value per token or per row) with
`masked_mean`: the sum of the valid items divided by a normaliser.

Data-parallel note: by default the normaliser is the number of valid items *on this rank*, so each
rank returns its local mean, and the engine's gradient all-reduce (an average over ranks) gives
the global mean only when every rank holds the same number of valid items. For exact invariance
to sharding, pass ``normalizer = global_valid_count / world_size`` (the all-reduced count divided
by the world size); then the rank average equals sum(all valid items) / global_valid_count.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Raise a ValueError naming both tensors when their shapes differ."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; "
            "they must match (align/shift the tensors before calling the loss)"
        )


def check_mask(mask: Tensor | None, shape: torch.Size, name: str = "mask") -> None:
    """Raise when `mask` is given and its shape is not `shape` (the per-item shape)."""
    if mask is not None and mask.shape != shape:
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)} but the loss has one value per item with shape "
            f"{tuple(shape)}; pass a boolean/0-1 mask of that shape (or None for all items)"
        )


def masked_mean(
    values: Tensor, mask: Tensor | None = None, normalizer: float | Tensor | None = None
) -> Tensor:
    """Mean of `values` over the items where `mask` is set.

    values: (...) per-item losses. mask: same shape, bool or 0/1 float, None = all valid.
    normalizer: the denominator; default = number of valid items (local mean, see module doc).
    A batch with no valid item returns 0 that is still connected to the graph (so that every
    rank runs the same backward), never NaN.
    """
    check_mask(mask, values.shape)
    weights = torch.ones_like(values) if mask is None else mask.to(values.dtype)
    total = (values * weights).sum()
    if normalizer is None:
        # an integer count: 0 only when total is 0 too, so clamping to 1 keeps 0/0 -> 0
        return total / weights.sum().clamp_min(1.0)
    denom = torch.as_tensor(normalizer, dtype=total.dtype, device=total.device)
    if denom.numel() != 1 or bool(denom < 0):
        raise ValueError(f"normalizer must be one number >= 0, got {normalizer!r}")
    # a global count can legitimately be < 1 per rank (e.g. 1 token over 2 ranks): no clamp to 1
    return torch.where(denom > 0, total / denom.clamp_min(1e-12), total * 0.0)


def masked_stats(values: Tensor, mask: Tensor | None = None) -> tuple[float, float]:
    """(mean, population std) of the valid items of `values`, as floats (for metrics only)."""
    flat = values.detach().float().reshape(-1)
    if mask is not None:
        flat = flat[mask.reshape(-1).bool()]
    if flat.numel() == 0:
        return 0.0, 0.0
    return flat.mean().item(), flat.std(unbiased=False).item()


def randn(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """N(0, I) of `shape`, drawn on the generator's device in fp32, then moved to like's device/dtype.

    Drawing on the generator's device (not `like`'s) lets a CPU generator seed GPU tensors and
    keeps the stream identical whatever device the loss runs on.
    """
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device).to(like.device, like.dtype)


def metric(x: Tensor) -> float:
    """A detached Python float for the metrics dict (one device sync per metric)."""
    return float(x.detach().float().mean().item())
