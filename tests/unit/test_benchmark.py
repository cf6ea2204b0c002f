"""The benchmark's bookkeeping: FLOP split of the presets, summed decode stats, speedup bounds."""
from __future__ import annotations

import pytest

from fastardiff_ds.benchmark import ModeResult, flops_per_token, large_preset_split, summarize
from fastardiff_ds.config import get_preset


def test_cost_matched_preset_has_the_large_models_ar_head_split():
    large, bench = large_preset_split(), flops_per_token(get_preset("tiny-bench"))
    assert 0.55 < large["ar_share"] < 0.7  # 14B AR x2 (CFG) vs 157M head x 50 steps x2
    assert abs(bench["ar_share"] - large["ar_share"]) < 0.03
    assert flops_per_token(get_preset("tiny"))["ar_share"] < 0.1  # the tiny preset is head-bound


def _stats(tf, df, rows, drafted=0, accepted=0):
    return {"target_forwards": tf, "draft_forwards": df, "target_head": {"calls": rows, "rows": rows},
            "draft_head": {"calls": 0, "rows": 0}, "mean_accepted_length": 1 + accepted / max(tf, 1),
            "acceptance_rate": accepted / drafted if drafted else 0.0, "early_stop_rate": 0.0, "fallbacks": 0}


def test_summary_speedup_and_count_bound():
    base = ModeResult([2.0, 2.0, 2.2], _stats(64, 0, 640), ar_seconds=1.0, head_seconds=1.0)
    fast = ModeResult([0.5, 0.5, 0.6], _stats(16, 48, 320, 48, 40), ar_seconds=0.2, head_seconds=0.3)
    out = summarize({"baseline": base, "fastardiff": fast}, images=1)
    assert out["fastardiff"]["speedup_vs_baseline"] == pytest.approx(4.0)
    # AR share 0.5: 4x fewer target forwards, 2x fewer head rows -> 1 / (0.5/4 + 0.5/2)
    assert out["fastardiff"]["count_implied_speedup_upper_bound"] == pytest.approx(1 / (0.125 + 0.25))
    assert out["baseline"]["count_implied_speedup_upper_bound"] == pytest.approx(1.0)
    assert out["fastardiff"]["time_share_head"] == pytest.approx(0.6)
