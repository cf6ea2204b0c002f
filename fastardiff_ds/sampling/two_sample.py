"""Two-sample test used to check that a fast sampler emits the same distribution as the reference one.

Energy distance (Szekely & Rizzo 2004): E = 2 E|X - Y| - E|X - X'| - E|Y - Y'| >= 0, zero iff the laws agree;
the p-value comes from label permutations (exact under the null for i.i.d. samples -- so both samples must be
i.i.d.: e.g. one fixed prompt, not the same list of prompts in both groups, which makes the groups look closer
than chance and the test conservative).
"""
from __future__ import annotations

import torch


def energy_test(x: torch.Tensor, y: torch.Tensor, permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """Energy distance between samples x (n, d) and y (m, d) and its permutation p-value ((#perm >= obs)+1)/(P+1).

    Cost: one (n+m)^2 distance matrix and one (n+m)^2 x P matrix product.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"energy_test wants (n,d) and (m,d) samples, got {tuple(x.shape)} and {tuple(y.shape)}")
    z = torch.cat([x, y]).double()
    n, total = x.shape[0], z.shape[0]
    m = total - n
    dist = torch.cdist(z, z)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.zeros(total, permutations + 1, dtype=torch.float64)
    labels[:n, 0] = 1.0
    for p in range(1, permutations + 1):
        labels[torch.randperm(total, generator=gen)[:n], p] = 1.0
    dl = dist @ labels  # (total, P+1)
    s_xx = (labels * dl).sum(0)
    s_xy = ((1.0 - labels) * dl).sum(0)
    s_yy = dist.sum() - s_xx - 2.0 * s_xy
    e = 2.0 * s_xy / (n * m) - s_xx / n**2 - s_yy / m**2
    p_value = (float((e[1:] >= e[0]).sum()) + 1.0) / (permutations + 1.0)
    return float(e[0]), p_value
