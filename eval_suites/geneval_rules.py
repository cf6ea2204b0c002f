"""GenEval's scoring rules as pure functions over detections.

Follows djghosh13/geneval `evaluation/evaluate_images.py` (detection filtering, `evaluate`,
`relative_position`) and `evaluation/summary_scores.py` (overall = mean of the six task accuracies).
Detections come from any detector plug-in (`eval_suites.detectors`); colours from any colour
classifier `(image, detections, classname) -> list[str]`.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")


@dataclass
class Detection:
    """One detected object. box: (4,) [x0, y0, x1, y1] pixels; mask: (H, W) bool or None."""

    box: np.ndarray
    score: float
    mask: np.ndarray | None = None
    color: str | None = None  # set by detectors that know the colour exactly (shapes domain)


@dataclass
class GenEvalRules:
    """The official options (`--options` of evaluate_images.py) and their defaults."""

    threshold: float = 0.3           # detection confidence for every task but counting
    counting_threshold: float = 0.9  # stricter confidence for the counting task
    max_objects: int = 16            # per class, top-confidence first
    max_overlap: float = 1.0         # NMS IoU; 1.0 = off (official default)
    position_threshold: float = 0.1  # fraction of summed box sizes ignored in the position rule


ColorFn = Callable[[object, list[Detection], str], list[str]]


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU with GenEval's inclusive (+1) pixel areas."""
    area = lambda x: max(x[2] - x[0] + 1, 0) * max(x[3] - x[1] + 1, 0)  # noqa: E731
    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select_detections(raw: dict[str, list[Detection]], tag: str, rules: GenEvalRules) -> dict[str, list[Detection]]:
    """Threshold (strictly above), sort by confidence, cap at max_objects, optional NMS; empty classes dropped."""
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    kept = {}
    for cls, dets in raw.items():
        order = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)[: rules.max_objects]
        chosen = []
        while order:
            best = order.pop(0)
            chosen.append(best)
            if rules.max_overlap < 1:
                order = [d for d in order if box_iou(best.box, d.box) < rules.max_overlap]
        if chosen:
            kept[cls] = chosen
    return kept


def relative_position(box_a, box_b, position_threshold: float = 0.1) -> set[str]:
    """Relations of A relative to B from box centres, ignoring `threshold * (dim_a + dim_b)` of the offset.

    Image coordinates: y grows downwards, so "above" means a smaller y centre.
    """
    boxes = np.array([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - position_threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _check_position(found, targets, expected_rel, classname, threshold) -> str | None:
    """Every found object must stand in `expected_rel` to every target object; returns a reason or None."""
    for obj in found:
        for target in targets:
            rels = relative_position(obj.box, target.box, threshold)
            if expected_rel not in rels:
                return f"expected {classname} {expected_rel} target, found {' and '.join(rels)} target"
    return None


def evaluate(image, detected: dict[str, list[Detection]], metadata: dict, color_fn: ColorFn,
             rules: GenEvalRules = GenEvalRules()) -> tuple[bool, str]:
    """GenEval's `evaluate`: includes are ANDed, excludes ORed; colour/position use the top objects only.

    `detected` must already be filtered and sorted by `select_detections`.
    """
    correct, reasons, groups = True, [], []
    for req in metadata.get("include", []):
        cls, count = req["class"], req["count"]
        found = detected.get(cls, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        elif "color" in req:
            colors = color_fn(image, found, cls)
            if colors.count(req["color"]) < count:
                matched = False
                reasons.append(f"expected {req['color']} {cls}>={count}, found {colors.count(req['color'])} "
                               f"{req['color']}; and " + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors))
        if matched and "position" in req:
            rel, target_idx = req["position"]
            if groups[target_idx] is None:
                matched = False
                reasons.append(f"no target for {cls} to be {rel}")
            else:
                why = _check_position(found, groups[target_idx], rel, cls, rules.position_threshold)
                matched = why is None
                reasons += [why] if why else []
        correct &= matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        n = len(detected.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, "\n".join(reasons)


def asked_objects(metadata: dict) -> int:
    """Objects a prompt asks for: the sum of its `include` counts (counting: n; two objects: 2)."""
    return int(sum(int(e.get("count", 1)) for e in metadata.get("include", [])))


def _object_counts(results: list[dict]) -> dict:
    """Detected objects vs asked-for objects (crowding: extra objects GenEval's single_object rule does not
    punish); empty when the rows carry no counts."""
    rows = [r for r in results if "n_objects" in r and "n_asked" in r]
    if not rows:
        return {}
    by_task = defaultdict(list)
    for r in rows:
        by_task[r["tag"]].append(int(r["n_objects"]) == int(r["n_asked"]))
    return {"objects_per_image": float(np.mean([r["n_objects"] for r in rows])),
            "objects_asked": float(np.mean([r["n_asked"] for r in rows])),
            "exact_object_count": float(np.mean([int(r["n_objects"]) == int(r["n_asked"]) for r in rows])),
            "exact_count_per_task": {t: float(np.mean(v)) for t, v in sorted(by_task.items(),
                                                                            key=lambda kv: _task_order(kv[0]))}}


def summarize(results: list[dict]) -> dict:
    """Per-task accuracy (mean image `correct`), overall = mean of task accuracies (summary_scores.py).

    results: per-image dicts with "tag", "correct" and "prompt_index".
    """
    if not results:
        raise ValueError("no per-image results to summarise; the image folder held no samples")
    by_task, by_prompt = defaultdict(list), defaultdict(list)
    for r in results:
        by_task[r["tag"]].append(bool(r["correct"]))
        by_prompt[r["prompt_index"]].append(bool(r["correct"]))
    tasks = {t: float(np.mean(v)) for t, v in sorted(by_task.items(), key=lambda kv: _task_order(kv[0]))}
    return {
        "overall": float(np.mean(list(tasks.values()))),
        "tasks": tasks,
        "images_per_task": {t: len(v) for t, v in by_task.items()},
        "images_correct": float(np.mean([bool(r["correct"]) for r in results])),
        "prompts_any_correct": float(np.mean([any(v) for v in by_prompt.values()])),
        "n_images": len(results),
        "n_prompts": len(by_prompt),
        **_object_counts(results),
    }


def _task_order(tag: str) -> int:
    return TASKS.index(tag) if tag in TASKS else len(TASKS)
