"""Two-sample tests used to check that a fast sampler emits the same distribution as the reference one.

Both p-values come from label permutations (exact under the null for i.i.d. samples -- so both samples must be
i.i.d.: e.g. one fixed prompt, not the same list of prompts in both groups, which makes the groups look closer
than chance and the test conservative).

- `energy_test`: energy distance (Szekely & Rizzo 2004), E = 2 E|X - Y| - E|X - X'| - E|Y - Y'| >= 0, zero iff the
  laws agree. Sees every difference eventually, but in 8+ dimensions at a few thousand samples it is weak against a
  shift of one coordinate's mean or a change of one coordinate's spread.
- `moment_test`: the largest standardised difference of the per-coordinate first and second moments (max-|z|; the
  permutation distribution of the max corrects for the 2d comparisons). Much more powerful against exactly the
  errors a lossy acceptance rule makes (means pulled towards the draft's, spreads shrunk or widened).
- `two_sample_test`: both, Bonferroni-combined: p = min(1, 2 min(p_energy, p_moment)).
"""
from __future__ import annotations

import torch


def _check(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"{name} wants (n,d) and (m,d) samples, got {tuple(x.shape)} and {tuple(y.shape)}")


def _labels(total: int, n: int, permutations: int, seed: int) -> torch.Tensor:
    """(total, P+1) 0/1 membership of group x: column 0 the observed split, then P random ones."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.zeros(total, permutations + 1, dtype=torch.float64)
    labels[:n, 0] = 1.0
    for p in range(1, permutations + 1):
        labels[torch.randperm(total, generator=gen)[:n], p] = 1.0
    return labels


def _p_value(stat: torch.Tensor) -> float:
    return (float((stat[1:] >= stat[0]).sum()) + 1.0) / (stat.shape[0])


def energy_test(x: torch.Tensor, y: torch.Tensor, permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """Energy distance between samples x (n, d) and y (m, d) and its permutation p-value ((#perm >= obs)+1)/(P+1).

    Cost: one (n+m)^2 distance matrix and one (n+m)^2 x P matrix product.
    """
    _check(x, y, "energy_test")
    z = torch.cat([x, y]).double()
    n, total = x.shape[0], z.shape[0]
    m = total - n
    dist = torch.cdist(z, z)
    labels = _labels(total, n, permutations, seed)
    dl = dist @ labels  # (total, P+1)
    s_xx = (labels * dl).sum(0)
    s_xy = ((1.0 - labels) * dl).sum(0)
    s_yy = dist.sum() - s_xx - 2.0 * s_xy
    e = 2.0 * s_xy / (n * m) - s_xx / n**2 - s_yy / m**2
    return float(e[0]), _p_value(e)


def moment_test(x: torch.Tensor, y: torch.Tensor, permutations: int = 500, seed: int = 0) -> tuple[float, float]:
    """max over the 2d features (z_j, z_j^2) (z: pooled-standardised coordinates) of |mean_x - mean_y| / se, and
    its permutation p-value. se is the pooled standard error, the same for every permutation. Cost O((n+m) d P)."""
    _check(x, y, "moment_test")
    z = torch.cat([x, y]).double()
    n, total = x.shape[0], z.shape[0]
    m = total - n
    z = (z - z.mean(0)) / z.std(0).clamp_min(1e-12)
    feats = torch.cat([z, z**2], 1)  # (total, 2d)
    se = feats.std(0).clamp_min(1e-12) * (1.0 / n + 1.0 / m) ** 0.5
    labels = _labels(total, n, permutations, seed)
    sum_x = labels.T @ feats  # (P+1, 2d)
    mean_x = sum_x / n
    mean_y = (feats.sum(0) - sum_x) / m
    stat = ((mean_x - mean_y).abs() / se).amax(1)
    return float(stat[0]), _p_value(stat)


def two_sample_test(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> tuple[float, float, float]:
    """(energy p-value, moment p-value, combined p = min(1, 2 min of the two)); 200 energy permutations (the
    (n+m)^2 product dominates), 1000 moment ones, so the smallest combined p is 2/201 < 0.01."""
    _, p_e = energy_test(x, y, 200, seed)
    _, p_m = moment_test(x, y, 1000, seed)
    return p_e, p_m, min(1.0, 2.0 * min(p_e, p_m))
