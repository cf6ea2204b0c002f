"""Losses of Fast-ARDiff training: pure functions `(pred, target, mask, ...) -> (loss, metrics)`.

flow_matching: rectified flow for the head (NextStep-1); regression: L_reg (Eq. 4);
entropy: L_ent and τ (Eqs. 5, 10); consistency: CD stage (Eq. 6); dmd: DMD stage (Eq. 7).
Reductions are masked means over valid items; see `common.masked_mean` for data parallelism.
"""

from fastardiff_ds.losses.common import masked_mean
from fastardiff_ds.losses.consistency import (
    ConsistencyConfig,
    consistency_distillation_loss,
    consistency_function,
    pseudo_huber,
)
from fastardiff_ds.losses.dmd import DMDConfig, dmd_fake_score_loss, dmd_generator_loss, few_step_generate
from fastardiff_ds.losses.entropy import (EntropyStats, early_stop_threshold, entropy_alignment_loss, entropy_loss,
                                         row_entropy)
from fastardiff_ds.losses.flow_matching import (
    FlowMatchingBatch,
    FlowMatchingConfig,
    flow_matching_loss,
    head_flow_matching_loss,
    interpolate,
    make_flow_matching_inputs,
    tile,
)
from fastardiff_ds.losses.regression import feature_regression_loss

__all__ = [
    "masked_mean",
    "ConsistencyConfig",
    "consistency_distillation_loss",
    "consistency_function",
    "pseudo_huber",
    "DMDConfig",
    "dmd_fake_score_loss",
    "dmd_generator_loss",
    "few_step_generate",
    "EntropyStats",
    "early_stop_threshold",
    "entropy_alignment_loss",
    "entropy_loss",
    "row_entropy",
    "FlowMatchingBatch",
    "FlowMatchingConfig",
    "flow_matching_loss",
    "head_flow_matching_loss",
    "interpolate",
    "make_flow_matching_inputs",
    "tile",
    "feature_regression_loss",
]
