"""Pipeline wiring of the official samplers and the negative / positive prompts (tiny random-init models)."""
from __future__ import annotations

import pytest
import torch

from fastardiff_ds.config import apply_overrides, get_preset
from fastardiff_ds.inference import Pipeline, random_init_bundle


def bundle_with(overrides):
    cfg = get_preset("tiny")
    apply_overrides(cfg, ["inference.num_steps=3", "inference.cfg_scale=3.0", *overrides])
    bundle = random_init_bundle(cfg, seed=5)
    with torch.no_grad():  # zero-initialised output layers would make every velocity 0 (prompts would not matter)
        for prm in bundle.head.parameters():
            if not bool(prm.any()):
                prm.normal_(0.0, 0.2)
    return bundle


def test_negative_and_positive_prompts_fill_the_cfg_rows():
    pipe = Pipeline(bundle_with(["inference.negative_prompt=a blue square", "inference.positive_prompt=red"]),
                    "baseline")
    grid = pipe.bundle.cfg.model.image.grid
    ids, mask = pipe.prompt_batch(["a circle", "two squares"], cfg_rows=True)
    want_ids, want_mask = pipe.text.batch(["a circle red", "two squares red", "a blue square", "a blue square"], grid)
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
    assert pipe.prompt_batch(["a circle"], cfg_rows=False)[0].shape[0] == 1


@pytest.mark.parametrize("sampler", ["nextstep", "nextstep-1.1"])
def test_baseline_runs_the_official_sampler_and_the_negative_prompt_matters(sampler):
    a = Pipeline(bundle_with([f"inference.sampler={sampler}"]), "baseline")
    assert a.teacher_flow(a.bundle.target).sampler.kind == sampler
    assert a.teacher_flow(a.bundle.target).sampler.noise_level == (0.8 if sampler == "nextstep-1.1" else 1.0)
    res = a.generate_tokens(["a red circle"], [0])
    n = a.bundle.cfg.model.image.num_tokens
    assert torch.isfinite(res.tokens).all() and res.stats.target_head.calls == 3 * n
    assert torch.equal(a.generate_tokens(["a red circle"], [0]).tokens, res.tokens)  # seeded
    b = Pipeline(bundle_with([f"inference.sampler={sampler}", "inference.negative_prompt=a blue square"]), "baseline")
    assert not torch.allclose(b.generate_tokens(["a red circle"], [0]).tokens, res.tokens)


def test_sd_refuses_the_nextstep_1_sampler_but_takes_1_1():
    with pytest.raises(ValueError, match="nextstep-1.1"):
        Pipeline(bundle_with(["inference.sampler=nextstep"]), "sd")
    pipe = Pipeline(bundle_with(["inference.sampler=nextstep-1.1", "inference.noise_level=0.9"]), "sd")
    assert pipe.inf.noise_level == 0.9 and isinstance(pipe.inf.noise_level, float)  # `float | None` parses
    assert pipe.teacher_flow(pipe.bundle.draft).sampler.noise_level == 0.9
    apply_overrides(pipe.bundle.cfg, ["inference.noise_level=none"])
    assert pipe.teacher_flow(pipe.bundle.draft).sampler.noise_level == 0.8  # unset: the sampler's own default
