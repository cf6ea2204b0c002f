"""Attention-entropy loss L_ent and the early-stop threshold τ (Fast-ARDiff Eqs. 5, 10, 11).

From post-softmax attention probabilities A (B, heads, R, K) of one layer (the draft's
penultimate layer in training, a shallow layer for the early-stop statistic):
  1. head-average first: Ā = mean_heads A                       (B, R, K)  (Drift-AR entropy.py)
  2. keep only valid keys (causal + padding + optional prefix strip) and renormalise each row
     over them (Drift-AR strips buffer columns and renormalises; a no-op for causal masks);
  3. E_r = −Σ_c Ā_rc log Ā_rc / log n_r, n_r = valid keys of row r; rows with n_r < 2 carry no
     information (log 1 = 0) and are excluded; E_r is clamped to [0, 1];
  4. L_ent = −mean of E_r over the selected rows, so minimising L_ent raises the entropy
     (uniform rows give L_ent = −1, one-hot rows give 0).
Reduction: mean over all selected rows of the local batch (row-weighted; equal to Drift-AR's
per-sample −(1/R)Σ_r then batch mean when every sample has the same rows); see
`common.masked_mean` for data-parallel invariance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastardiff_ds.losses.common import masked_mean, masked_stats, metric

_EPS = 1e-8  # Drift-AR clamps probabilities at 1e-8 before the log


def row_entropy(attn: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Normalised per-row entropy of the head-averaged attention map.

    attn: (B, heads, R, K) post-softmax probabilities (grad flows through them).
    key_mask: bool/0-1 key validity, broadcastable to (B, R, K) — e.g. a causal (R, K) mask, a
      (B, 1, K) padding mask, or their product; None = all keys valid.
    Returns (entropy (B, R) in [0, 1], fp32; valid (B, R) bool, False where n_r < 2).
    """
    if attn.dim() != 4:
        raise ValueError(f"attn must be (B, heads, R, K) probabilities, got shape {tuple(attn.shape)}")
    probs = attn.float().mean(dim=1)  # head-average first (Eq. 11 sums heads inside the mean)
    if key_mask is None:
        keys = torch.ones_like(probs, dtype=torch.bool)
    else:
        try:
            keys = key_mask.to(device=probs.device, dtype=torch.bool).expand_as(probs)
        except RuntimeError as err:
            raise ValueError(
                f"key_mask of shape {tuple(key_mask.shape)} does not broadcast to (B, R, K) = "
                f"{tuple(probs.shape)}"
            ) from err
    probs = probs * keys
    probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(_EPS)  # renormalise over valid keys
    # clamp inside the log keeps d/dA finite at A = 0 (xlogy's gradient there is -inf)
    neg_sum = -(probs * probs.clamp_min(_EPS).log()).sum(dim=-1)
    n_keys = keys.sum(dim=-1)
    valid = n_keys >= 2
    entropy = neg_sum / n_keys.clamp_min(2).float().log()
    entropy = torch.where(valid, entropy.clamp(0.0, 1.0), torch.zeros_like(entropy))
    return entropy, valid


def entropy_loss(
    attn: Tensor,
    key_mask: Tensor | None = None,
    row_mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float], Tensor]:
    """L_ent = −mean_r E_r over selected rows (Fast-ARDiff Eq. 5 with Drift-AR's normalisation).

    attn (B, heads, R, K); key_mask broadcastable to (B, R, K); row_mask (B, R) selects rows
    (image positions for NextStep), None = all rows with >= 2 valid keys.
    Returns (loss, {"ent/loss", "ent/mean", "ent/std", "ent/rows"}, selected row entropies as a
    detached 1-D tensor — feed them to `EntropyStats` / `early_stop_threshold`).
    """
    entropy, valid = row_entropy(attn, key_mask)
    if row_mask is not None:
        if row_mask.shape != valid.shape:
            raise ValueError(f"row_mask has shape {tuple(row_mask.shape)}, expected (B, R) = {tuple(valid.shape)}")
        valid = valid & row_mask.to(device=valid.device, dtype=torch.bool)
    loss = -masked_mean(entropy, valid, normalizer)
    mean, std = masked_stats(entropy, valid)
    metrics = {"ent/loss": metric(loss), "ent/mean": mean, "ent/std": std, "ent/rows": float(valid.sum())}
    return loss, metrics, entropy.detach()[valid]


def entropy_alignment_loss(
    attn: Tensor,
    target_entropy: Tensor,
    key_mask: Tensor | None = None,
    row_mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float], Tensor]:
    """Entropy alignment (beyond the paper): mean_r (E_r − E*_r)², pulling each row's normalised attention entropy
    toward the target's E*_r (B, R) at the corresponding layer, instead of maximising it. Same inputs and returns as
    `entropy_loss` (metrics add "ent/gap" = mean |E_r − E*_r|); E* carries no gradient."""
    entropy, valid = row_entropy(attn, key_mask)
    if target_entropy.shape != valid.shape:
        raise ValueError(f"target_entropy has shape {tuple(target_entropy.shape)}, expected (B, R) = "
                         f"{tuple(valid.shape)}")
    if row_mask is not None:
        valid = valid & row_mask.to(device=valid.device, dtype=torch.bool)
    diff = entropy - target_entropy.detach().to(entropy.device, torch.float32)
    loss = masked_mean(diff.pow(2), valid, normalizer)
    mean, std = masked_stats(entropy, valid)
    gap, _ = masked_stats(diff.abs(), valid)
    metrics = {"ent/loss": metric(loss), "ent/mean": mean, "ent/std": std, "ent/rows": float(valid.sum()),
               "ent/gap": gap}
    return loss, metrics, entropy.detach()[valid]


def early_stop_threshold(entropies: Tensor | list[float], mean_coef: float = 0.3, std_coef: float = 0.1) -> float:
    """τ = 0.3·mean − 0.1·std of entropy values (Fast-ARDiff Eq. 10), population std (ddof 0)."""
    values = torch.as_tensor(entropies, dtype=torch.float64).reshape(-1)
    if values.numel() == 0:
        raise ValueError("early_stop_threshold needs at least one entropy value; collect statistics first")
    return mean_coef * values.mean().item() - std_coef * values.std(unbiased=False).item()


@dataclass
class EntropyStats:
    """Streaming count/sum/sum-of-squares of entropy values, for τ over a whole training set.

    `to_tensor()` gives a (3,) float64 tensor to all-reduce (SUM) across ranks; `from_tensor`
    rebuilds the stats; `state_dict()` is plain floats for the checkpoint.
    """

    count: float = 0.0
    total: float = 0.0
    total_sq: float = 0.0

    def update(self, values: Tensor) -> None:
        v = values.detach().to(torch.float64).reshape(-1)
        self.count += float(v.numel())
        self.total += v.sum().item()
        self.total_sq += v.pow(2).sum().item()

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        if not self.count:
            return 0.0
        return math.sqrt(max(self.total_sq / self.count - self.mean**2, 0.0))

    def threshold(self, mean_coef: float = 0.3, std_coef: float = 0.1) -> float:
        """τ of Eq. 10 from the accumulated statistics."""
        if not self.count:
            raise ValueError("EntropyStats is empty; update() it with row entropies before asking for τ")
        return mean_coef * self.mean - std_coef * self.std

    def to_tensor(self, device: torch.device | str | None = None) -> Tensor:
        return torch.tensor([self.count, self.total, self.total_sq], dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, t: Tensor) -> "EntropyStats":
        count, total, total_sq = (float(x) for x in t.detach().cpu().tolist())
        return cls(count, total, total_sq)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "total": self.total, "total_sq": self.total_sq}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.total, self.total_sq = state["count"], state["total"], state["total_sq"]
