"""GenEval scoring rules on hand-made detections (djghosh13/geneval evaluate_images.py semantics)."""
import numpy as np
import pytest

from eval_suites.geneval_rules import (Detection, GenEvalRules, evaluate, relative_position, select_detections,
                                       summarize)


def det(x0, y0, x1, y1, score=0.99, color=None):
    return Detection(box=np.array([x0, y0, x1, y1], dtype=float), score=score, color=color)


def colors_of(image, dets, cls):
    return [d.color for d in dets]


def run(detected, meta, rules=GenEvalRules()):
    return evaluate(None, select_detections(detected, meta["tag"], rules), meta, colors_of, rules)[0]


# --- detection filtering -------------------------------------------------------------------------

def test_threshold_is_strict_and_counting_uses_its_own():
    raw = {"cat": [det(0, 0, 10, 10, 0.3), det(20, 0, 30, 10, 0.31), det(40, 0, 50, 10, 0.95)]}
    assert len(select_detections(raw, "single_object", GenEvalRules())["cat"]) == 2  # 0.3 itself is dropped
    assert len(select_detections(raw, "counting", GenEvalRules())["cat"]) == 1       # only > 0.9


def test_sorted_by_confidence_and_capped_at_max_objects():
    raw = {"dog": [det(i, 0, i + 5, 5, score=0.4 + 0.01 * i) for i in range(20)]}
    kept = select_detections(raw, "two_object", GenEvalRules())["dog"]
    assert len(kept) == 16
    assert [d.score for d in kept] == sorted((d.score for d in kept), reverse=True)
    assert kept[0].score == pytest.approx(0.59)


def test_empty_classes_are_dropped_and_nms_optional():
    raw = {"cat": [det(0, 0, 10, 10, 0.1)], "dog": [det(0, 0, 10, 10, 0.9), det(1, 1, 11, 11, 0.8)]}
    kept = select_detections(raw, "two_object", GenEvalRules())
    assert "cat" not in kept and len(kept["dog"]) == 2  # max_overlap 1.0: no NMS (official default)
    assert len(select_detections(raw, "two_object", GenEvalRules(max_overlap=0.5))["dog"]) == 1


# --- counting with exclude -----------------------------------------------------------------------

COUNT3 = {"tag": "counting", "prompt": "a photo of three oranges",
          "include": [{"class": "orange", "count": 3}], "exclude": [{"class": "orange", "count": 4}]}


@pytest.mark.parametrize("n,expected", [(2, False), (3, True), (4, False), (5, False)])
def test_counting_needs_exactly_n(n, expected):
    assert run({"orange": [det(10 * i, 0, 10 * i + 8, 8) for i in range(n)]}, COUNT3) is expected


def test_counting_ignores_low_confidence_extras():
    dets = [det(10 * i, 0, 10 * i + 8, 8) for i in range(3)] + [det(60, 0, 68, 8, score=0.85)]
    assert run({"orange": dets}, COUNT3) is True  # the 4th is below the 0.9 counting threshold


def test_two_object_is_an_and_of_includes():
    meta = {"tag": "two_object", "prompt": "a cat and a dog",
            "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    assert run({"cat": [det(0, 0, 5, 5)], "dog": [det(9, 9, 15, 15)]}, meta) is True
    assert run({"cat": [det(0, 0, 5, 5)]}, meta) is False
    assert run({"cat": [det(0, 0, 5, 5)], "dog": [det(9, 9, 15, 15, score=0.2)]}, meta) is False


# --- position ------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset,rel", [((-40, 0), "left of"), ((40, 0), "right of"),
                                        ((0, -40), "above"), ((0, 40), "below")])
def test_each_relation(offset, rel):
    b = [50, 50, 60, 60]
    a = [b[0] + offset[0], b[1] + offset[1], b[2] + offset[0], b[3] + offset[1]]
    assert relative_position(a, b) == {rel}
    meta = {"tag": "position", "prompt": f"a cat {rel} a dog",
            "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": [rel, 0]}]}
    assert run({"dog": [det(*b)], "cat": [det(*a)]}, meta) is True
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[rel]
    meta["include"][1]["position"] = [opposite, 0]
    assert run({"dog": [det(*b)], "cat": [det(*a)]}, meta) is False


def test_position_threshold_and_diagonals():
    # centres 12 px apart with boxes 10 wide: 0.1 * (10 + 10) = 2 px ignored -> still "right of"
    assert relative_position([62, 0, 72, 10], [50, 0, 60, 10]) == {"right of"}
    # overlapping centres within the threshold: no relation at all
    assert relative_position([51, 0, 61, 10], [50, 0, 60, 10]) == set()
    # a 45-degree diagonal: revised/|offset| ~ 0.68 on both axes -> two relations
    assert relative_position([100, 100, 110, 110], [0, 0, 10, 10]) == {"right of", "below"}
    # mostly horizontal: only the dominant axis passes 0.5
    assert relative_position([100, 20, 110, 30], [0, 0, 10, 10]) == {"right of"}


def test_position_without_target_fails():
    meta = {"tag": "position", "prompt": "a cat left of a dog",
            "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    assert run({"cat": [det(0, 0, 5, 5)]}, meta) is False


def test_position_uses_only_the_top_confidence_object():
    meta = {"tag": "position", "prompt": "a cat left of a dog",
            "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    cats = [det(0, 0, 10, 10, 0.99), det(200, 0, 210, 10, 0.5)]  # the second, less sure cat is on the right
    assert run({"dog": [det(100, 0, 110, 10)], "cat": cats}, meta) is True


# --- colour attribution --------------------------------------------------------------------------

def test_color_and_color_attribution():
    meta = {"tag": "color_attr", "prompt": "a red car and a blue bench",
            "include": [{"class": "car", "count": 1, "color": "red"}, {"class": "bench", "count": 1, "color": "blue"}]}
    good = {"car": [det(0, 0, 5, 5, color="red")], "bench": [det(9, 9, 15, 15, color="blue")]}
    swapped = {"car": [det(0, 0, 5, 5, color="blue")], "bench": [det(9, 9, 15, 15, color="red")]}
    assert run(good, meta) is True
    assert run(swapped, meta) is False


def test_colour_is_checked_on_the_top_objects_only():
    meta = {"tag": "colors", "prompt": "a photo of a green apple", "include": [{"class": "apple", "count": 1, "color": "green"}]}
    apples = [det(0, 0, 5, 5, 0.6, color="red"), det(9, 9, 15, 15, 0.9, color="green")]
    assert run({"apple": apples}, meta) is True
    apples[0].score = 0.95  # now the red one is the most confident
    assert run({"apple": apples}, meta) is False


# --- summary -------------------------------------------------------------------------------------

def test_overall_is_the_mean_of_task_accuracies_not_pooled():
    rows = ([{"tag": "single_object", "correct": True, "prompt_index": i} for i in range(10)]
            + [{"tag": "counting", "correct": i < 1, "prompt_index": 10 + i // 4} for i in range(4)])
    s = summarize(rows)
    assert s["tasks"] == {"single_object": 1.0, "counting": 0.25}
    assert s["overall"] == pytest.approx(0.625)           # task mean
    assert s["images_correct"] == pytest.approx(11 / 14)  # pooled, reported separately
    assert s["prompts_any_correct"] == pytest.approx(11 / 11)


def test_summarize_rejects_empty():
    with pytest.raises(ValueError, match="no per-image results"):
        summarize([])
