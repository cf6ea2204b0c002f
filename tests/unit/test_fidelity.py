"""The teacher-forced acceptance study: exact limits (perfect draft -> alpha 1) and agreement with the decoder."""
from __future__ import annotations

import pytest
import torch

from fastardiff_ds.config import apply_overrides, get_preset
from fastardiff_ds.inference import Pipeline, random_init_bundle
from fastardiff_ds.analysis.fidelity import FidelityPoint, acceptance_vs_fidelity, teacher_forced_conditions


@pytest.fixture(scope="module")
def setup():
    cfg = get_preset("tiny")
    apply_overrides(cfg, ["inference.student_final_std=0.5"])
    bundle = random_init_bundle(cfg, seed=3)
    with torch.no_grad():  # the head's zero-initialised output layers would make every condition give v = 0
        for prm in bundle.student.parameters():
            if not bool(prm.any()):
                prm.normal_(0.0, 0.2)
    pipe = Pipeline(bundle, "dmd")
    prompts = ["a red circle", "two blue squares"]
    tokens = pipe.generate_tokens(prompts, [0, 1]).tokens
    target, draft = pipe.student_flow(bundle.target), pipe.student_flow(bundle.draft)
    ids, mask = pipe.text.batch(prompts, cfg.model.image.grid)
    return target, draft, ids, mask, tokens


def test_teacher_forced_conditions_equal_the_decoding_loop(setup):
    target, _, ids, mask, tokens = setup
    cond = teacher_forced_conditions(target, ids, mask, tokens)
    cache = target.ar.new_cache(ids.shape[0], ids.shape[1] + tokens.shape[1])
    step = [target.ar.prefill(ids, mask, cache).cond[:, -1]]
    for i in range(3):  # token i+1's condition comes from decoding token i alone
        step.append(target.ar.decode(tokens[:, i:i + 1], cache).cond[:, -1])
    torch.testing.assert_close(cond[:, :4], torch.stack(step, 1), atol=1e-5, rtol=1e-5)


def test_perfect_draft_is_always_accepted_and_the_real_one_is_not(setup):
    target, draft, ids, mask, tokens = setup
    same = acceptance_vs_fidelity(target, target, ids, mask, tokens, mixes=(0.0,), rules=("exact", "cspd"))
    assert same[0].cosine == pytest.approx(1.0, abs=1e-6)
    assert same[0].alpha["exact"] == pytest.approx(1.0) and same[0].alpha["cspd"] == pytest.approx(1.0)
    pts = acceptance_vs_fidelity(target, draft, ids, mask, tokens, mixes=(0.0, 0.5, 1.0))
    assert pts[-1].alpha["exact"] == pytest.approx(1.0) and pts[-1].rel_error == pytest.approx(0.0, abs=1e-6)
    assert pts[0].alpha["exact"] < pts[1].alpha["exact"] < 1.0  # a 2-of-4-layer random draft is far off
    assert pts[0].cosine < pts[1].cosine < 1.0


def test_tokens_per_round_formula():
    pt = FidelityPoint(0.0, 1.0, 0.0, {"exact": 0.5, "cspd": 1.0, "none": 0.0})
    assert pt.tokens_per_round(3) == {"exact": 1 + 0.5 + 0.25 + 0.125, "cspd": 4.0, "none": 1.0}
