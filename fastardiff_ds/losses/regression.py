"""Draft feature regression L_reg (EAGLE's v-loss; Fast-ARDiff Eq. 4).

L_reg = SmoothL1(f̂, sg(f)) where f̂ is the draft's feature and f the target AR's final-norm
feature at the same (already aligned) position. The caller does the EAGLE shift (draft output at
i is compared with the target feature at i + 1) before calling; this function only compares
equal-shape tensors. Per-position value = mean over the hidden dimension of SmoothL1(β);
reduction = masked mean over image positions (EAGLE: sum(mean_H(mask·l)) / mask.sum()).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastardiff_ds.losses.common import check_mask, check_same_shape, masked_mean, masked_stats, metric


def feature_regression_loss(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    beta: float = 1.0,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """SmoothL1 between draft features and stop-gradient target features.

    pred: (B, L, H) draft features (grad flows here). target: (B, L, H), detached inside — the
    target AR receives no gradient from L_reg even when it is trainable. mask: (B, L) image
    positions (bool / 0-1), None = all. beta: SmoothL1's quadratic-to-linear switch (1.0 as in
    EAGLE's nn.SmoothL1Loss). Returns (loss, {"reg/loss", "reg/cos"}), cos = mean cosine
    similarity over valid positions (a scale-free alignment diagnostic).
    """
    check_same_shape("pred", pred, "target", target)
    check_mask(mask, pred.shape[:-1])
    if beta <= 0:
        raise ValueError(f"SmoothL1 beta must be > 0, got {beta}")
    target = target.detach()
    per_pos = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=beta).mean(dim=-1)
    loss = masked_mean(per_pos, mask, normalizer)
    with torch.no_grad():
        cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)
        cos_mean, _ = masked_stats(cos, mask)
    return loss, {"reg/loss": metric(loss), "reg/cos": cos_mean}
