"""eval_suites/tag_compare.py: failure kinds read from the reasons GenEval's rules write, paired per-tag differences."""
from __future__ import annotations

import numpy as np
import pytest

from eval_suites.geneval_rules import Detection, evaluate
from eval_suites.tag_compare import compare, failure_kind


def _det(x0, y0, color="red"):
    return Detection(np.array([x0, y0, x0 + 4, y0 + 4], dtype=float), 0.99, color=color)


COLOR = lambda image, dets, cls: [d.color for d in dets]  # noqa: E731


@pytest.mark.parametrize("meta, found, kind", [
    ({"include": [{"class": "circle", "count": 1}]}, {"square": [_det(0, 0)]}, "missing"),
    ({"include": [{"class": "circle", "count": 3}]}, {"circle": [_det(0, 0), _det(10, 0)]}, "too_few"),
    ({"include": [{"class": "circle", "count": 1, "color": "blue"}]}, {"circle": [_det(0, 0, "red")]}, "colour"),
    ({"include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}]},
     {"square": [_det(0, 0)], "circle": [_det(20, 0)]}, "position"),
    ({"include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}]},
     {"circle": [_det(20, 0)]}, "missing"),
    ({"include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}]},
     {"circle": [_det(0, 0), _det(10, 0), _det(20, 0)]}, "extra"),
])
def test_failure_kind_reads_the_rules_own_reasons(meta, found, kind):
    correct, reason = evaluate(None, found, meta, COLOR)
    assert not correct
    assert failure_kind(reason) == kind, reason


def test_an_unknown_reason_is_an_error():
    with pytest.raises(ValueError, match="does not know"):
        failure_kind("the detector crashed")


def _rows(correct_by_prompt, tags):
    return [{"prompt_index": i, "tag": tags[i], "correct": c, "reason": "" if c else "expected circle>=1, found 0"}
            for i, cs in enumerate(correct_by_prompt) for c in cs]


def test_paired_difference_and_failures():
    tags = ["single_object"] * 4 + ["colors"] * 4
    a = _rows([[True] * 4] * 8, tags)
    b = _rows([[True, True, False, False]] * 4 + [[True] * 4] * 4, tags)
    res = compare([a, a], [b, b], boot=200)
    assert res["tags"]["single_object"]["diff"] == pytest.approx(-0.5)
    assert res["tags"]["colors"]["diff"] == pytest.approx(0.0)
    assert res["tags"]["overall"]["diff"] == pytest.approx(-0.25)  # mean of the task means
    assert res["tags"]["single_object"]["ci95"] == pytest.approx([-0.5, -0.5])  # no spread over prompts
    assert res["tags"]["single_object"]["a"] == {"mean": 1.0, "seed_sd": 0.0}
    assert res["failures"]["b"]["single_object"]["missing"] == pytest.approx(0.5)
    assert res["failures"]["a"]["single_object"]["missing"] == 0.0
