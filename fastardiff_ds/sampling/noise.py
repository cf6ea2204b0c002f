"""Per-sample random streams.

Every sample owns one seeded `torch.Generator`, and every random draw for that sample comes from it. A sample's
draws then never depend on which other samples share its batch, so batched generation reproduces per-sample
generation with the same seeds (the test of that lives in tests/unit/test_speculative_batch.py). Rows that are
inactive in a given draw (finished, not drafting, already resampled) consume nothing from their stream.
"""
from __future__ import annotations

from typing import Sequence

import torch


def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, seeded with `seeds[b]`, living on `device` (draws are made there)."""
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    return gens


def _rows(gens: Sequence[torch.Generator], active: torch.Tensor | None) -> list[int]:
    if active is None:
        return list(range(len(gens)))
    if active.shape != (len(gens),):
        raise ValueError(f"active mask has shape {tuple(active.shape)}, expected ({len(gens)},) (one per generator)")
    return [int(i) for i in torch.nonzero(active.cpu(), as_tuple=False).flatten()]


def randn(gens: Sequence[torch.Generator], shape: Sequence[int], *, device=None, dtype=torch.float32,
          active: torch.Tensor | None = None) -> torch.Tensor:
    """Standard normal draws (B, *shape), row b from `gens[b]`; rows with active[b] False are zero and draw nothing."""
    out = torch.zeros((len(gens), *shape), device=device, dtype=dtype)
    for b in _rows(gens, active):
        g = gens[b]
        out[b] = torch.randn(tuple(shape), generator=g, device=g.device, dtype=dtype).to(device)
    return out


def rand(gens: Sequence[torch.Generator], shape: Sequence[int] = (), *, device=None, dtype=torch.float32,
         active: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform [0,1) draws (B, *shape), row b from `gens[b]`; inactive rows are 1.0 (never accept) and draw nothing."""
    out = torch.ones((len(gens), *shape), device=device, dtype=dtype)
    for b in _rows(gens, active):
        g = gens[b]
        out[b] = torch.rand(tuple(shape), generator=g, device=g.device, dtype=dtype).to(device)
    return out


def rand_varlen(gens: Sequence[torch.Generator], lengths: torch.Tensor, max_len: int, *, device=None,
                dtype=torch.float32) -> torch.Tensor:
    """Uniform draws (B, max_len) where row b draws exactly lengths[b] numbers from gens[b]; the rest are 1.0."""
    out = torch.ones((len(gens), max_len), device=device, dtype=dtype)
    for b, n in enumerate(lengths.tolist()):
        if n > 0:
            g = gens[b]
            out[b, :n] = torch.rand((n,), generator=g, device=g.device, dtype=dtype).to(device)
    return out


def check_generators(gens: Sequence[torch.Generator], batch_size: int) -> None:
    """Raise unless there is exactly one generator per sample."""
    if len(gens) != batch_size:
        raise ValueError(f"got {len(gens)} generators for {batch_size} samples: pass one seeded torch.Generator "
                         "per sample (sampling.noise.make_generators(seeds)) so results do not depend on batching")
