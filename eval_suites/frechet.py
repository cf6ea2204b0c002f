"""Fréchet distance between Gaussian fits of features, in float64, and `.npz` statistics caches.

FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})  (Heusel et al. 2017; pytorch-fid's
`calculate_frechet_distance`, including its epsilon retry for singular products).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import linalg


@dataclass
class FeatureStats:
    mu: np.ndarray     # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    n: int


def feature_stats(features: np.ndarray) -> FeatureStats:
    """Mean and unbiased covariance (rowvar=False, ddof=1, as pytorch-fid) of (N, D) features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N>=2, D) features for a covariance, got shape {features.shape}")
    return FeatureStats(features.mean(0), np.cov(features, rowvar=False), features.shape[0])


def frechet_distance(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """FID between two Gaussian fits, all in float64."""
    mu1, mu2 = np.atleast_1d(a.mu).astype(np.float64), np.atleast_1d(b.mu).astype(np.float64)
    s1, s2 = np.atleast_2d(a.sigma).astype(np.float64), np.atleast_2d(b.sigma).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"feature statistics disagree in shape: {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}; "
                         "were they computed with the same feature network?")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        # A singular product has no finite root: nudge both covariances (pytorch-fid does the same).
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm; statistics are degenerate")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def save_stats(path, stats: FeatureStats, **meta) -> None:
    """Write `mu`, `sigma` (pytorch-fid's keys), `n` and string metadata (protocol, network) to `.npz`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n), **{f"meta_{k}": str(v) for k, v in meta.items()})


def load_stats(path) -> tuple[FeatureStats, dict]:
    """Read a `.npz` written by `save_stats` or by `pytorch_fid --save-stats` (no `n` there: n = -1)."""
    with np.load(path) as f:
        n = int(f["n"]) if "n" in f else -1
        meta = {k[5:]: str(f[k]) for k in f.files if k.startswith("meta_")}
        return FeatureStats(f["mu"].astype(np.float64), f["sigma"].astype(np.float64), n), meta
