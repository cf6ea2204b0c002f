"""Synthetic "shapes" domain: coloured geometric objects on a grey background.

Everything the tiny preset needs to run offline: scenes that cover GenEval's six task types
(single_object, two_object, counting, colors, position, color_attr), exact renders (no
anti-aliasing, so every object pixel has exactly its colour's RGB value), captions from templates,
and GenEval-schema metadata (`include` / `exclude`) for each scene.

Scene dict (also the per-sample ``KEY.json`` payload, plus img2dataset's keys)::

    {"task": tag, "resolution": R, "background": [r, g, b],
     "objects": [{"shape", "color", "bbox": [x0, y0, x1, y1] (pixels, inclusive-exclusive),
                  "center": [cx, cy]}, ...],          # in the order the caption mentions them
     "label": int, "prompt": caption,
     "include": [...], "exclude": [...]}              # GenEval's metadata for this scene

Objects never overlap and are separated by at least ``min_gap(R)`` background pixels, so finding
the connected components of each colour recovers exactly the listed objects and boxes.

Class label (class-conditional presets): ``label = SHAPES.index(shape) * len(COLORS) +
COLOR_NAMES.index(color)`` of the *first-mentioned* object, so ``NUM_CLASSES = 40`` and a label
fully determines a single-object image's content.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# GenEval's colour words; RGB values chosen far apart (min pairwise distance > 85) and far from
# the background so colour stays recoverable after JPEG and 64 -> 32 px resizing.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "orange": (255, 140, 0),
    "yellow": (255, 235, 0),
    "green": (20, 160, 40),
    "blue": (30, 60, 230),
    "purple": (140, 30, 190),
    "pink": (255, 130, 210),
    "brown": (115, 65, 15),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
BACKGROUND: tuple[int, int, int] = (128, 128, 128)  # neutral mid-grey, not one of COLORS
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
PLURALS = {s: s + "s" for s in SHAPES}
NUM_CLASSES = len(SHAPES) * len(COLORS)

TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
PREFIXES = ("a photo of", "a picture of", "an image of", "a drawing of")
POSITION_THRESHOLD = 0.1  # GenEval's evaluate_images.py default


def label_of(shape: str, color: str) -> int:
    """Class id of a (shape, colour) pair; see the module docstring."""
    return SHAPES.index(shape) * len(COLORS) + COLOR_NAMES.index(color)


def min_gap(resolution: int) -> int:
    """Background pixels kept between object boxes (>= 2 px even after a 2x downsample)."""
    return max(2, resolution // 16)


def _odd(x: float) -> int:
    n = int(round(x))
    return n if n % 2 == 1 else n + 1


def _size_range(resolution: int, n_objects: int) -> tuple[int, int]:
    """Odd side lengths (odd keeps triangles/diamonds symmetric); >= 0.22 R, i.e. >= 7 px at 32 px."""
    hi_frac = {1: 0.45, 2: 0.36}.get(n_objects, 0.28)
    lo = max(5, _odd(0.22 * resolution))
    return lo, max(lo, _odd(hi_frac * resolution) - 2)


def relations(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of box_a relative to box_b by GenEval's rule; boxes are [x0, y0, x1, y1] in image coordinates.

    One implementation serves both sides: the generator must place objects exactly as the scorer will judge them.
    """
    from eval_suites.geneval_rules import relative_position

    return relative_position(box_a, box_b, threshold)


def _place(rng: np.random.Generator, resolution: int, n: int, tries: int = 200) -> list[list[int]]:
    """Non-overlapping square boxes, separated by min_gap; restarts on a dead end."""
    lo, hi = _size_range(resolution, n)
    gap, margin = min_gap(resolution), max(1, resolution // 32)
    for _ in range(tries):
        boxes: list[list[int]] = []
        for _ in range(tries):
            s = int(rng.integers(lo // 2, hi // 2 + 1)) * 2 + 1  # odd in [lo, hi]
            x0 = int(rng.integers(margin, resolution - s - margin + 1))
            y0 = int(rng.integers(margin, resolution - s - margin + 1))
            box = [x0, y0, x0 + s, y0 + s]
            if all(_apart(box, b, gap) for b in boxes):
                boxes.append(box)
                if len(boxes) == n:
                    return boxes
    raise RuntimeError(f"could not place {n} objects at resolution {resolution}; use resolution >= 24")


def _apart(a, b, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _objects_for_task(rng: np.random.Generator, task: str) -> tuple[list[tuple[str, str]], dict]:
    """(shape, colour) per object in caption order, and task extras (count, relation)."""
    pick = lambda seq, k: [seq[i] for i in rng.choice(len(seq), size=k, replace=False)]  # noqa: E731
    color = lambda: COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]  # noqa: E731
    if task in ("single_object", "colors"):
        return [(pick(SHAPES, 1)[0], color())], {}
    if task == "counting":
        n, shape = int(rng.integers(2, 5)), pick(SHAPES, 1)[0]
        return [(shape, color()) for _ in range(n)], {"count": n}
    shapes = pick(SHAPES, 2)
    if task == "color_attr":
        return list(zip(shapes, pick(COLOR_NAMES, 2))), {}
    extras = {"relation": RELATIONS[int(rng.integers(4))]} if task == "position" else {}
    if task not in ("two_object", "position"):
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return [(shapes[0], color()), (shapes[1], color())], extras


def sample_scene(rng: np.random.Generator, resolution: int, task: str | None = None) -> dict:
    """Draw a random scene (see module docstring) for `task` (uniform over TASKS when None)."""
    if resolution < 24:
        raise ValueError(f"resolution {resolution} too small for the shapes set; use >= 24 (render, then resize)")
    task = TASKS[int(rng.integers(len(TASKS)))] if task is None else task
    specs, extras = _objects_for_task(rng, task)
    for _ in range(1000):
        boxes = _place(rng, resolution, len(specs))
        # position: subject (objects[0]) vs reference (objects[1]) must be unambiguous by GenEval's rule
        if task != "position" or relations(boxes[0], boxes[1]) == {extras["relation"]}:
            break
    else:
        raise RuntimeError(f"could not place a {extras['relation']!r} scene at resolution {resolution}")
    objects = [
        {"shape": s, "color": c, "bbox": b, "center": [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]}
        for (s, c), b in zip(specs, boxes)
    ]
    scene = {"task": task, "resolution": resolution, "background": list(BACKGROUND), "objects": objects,
             "label": label_of(objects[0]["shape"], objects[0]["color"])}
    scene.update(geneval_metadata(scene, extras.get("relation")))
    scene["prompt"] = caption_for(scene, rng)
    return scene


def geneval_metadata(scene: dict, relation: str | None = None) -> dict:
    """GenEval `include` / `exclude` lists describing `scene` (position: include[1] relative to include[0])."""
    task, objs = scene["task"], scene["objects"]
    ent = lambda o, **kw: {"class": o["shape"], "count": 1, **kw}  # noqa: E731
    if task == "single_object":
        return {"include": [ent(objs[0])]}
    if task == "colors":
        return {"include": [ent(objs[0], color=objs[0]["color"])]}
    if task == "counting":
        n, shape = len(objs), objs[0]["shape"]
        return {"include": [{"class": shape, "count": n}], "exclude": [{"class": shape, "count": n + 1}]}
    if task == "two_object":
        return {"include": [ent(objs[0]), ent(objs[1])]}
    if task == "color_attr":
        return {"include": [ent(o, color=o["color"]) for o in objs]}
    if task == "position":
        relation = relation or sorted(relations(objs[0]["bbox"], objs[1]["bbox"]))[0]
        return {"include": [ent(objs[1]), ent(objs[0], position=[relation, 0])]}
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def phrase_for(tag: str, include: list[dict]) -> str:
    """The object phrase of a GenEval entry, e.g. 'a red circle and a blue square'."""
    if tag == "counting":
        return f"{NUMBER_WORDS[include[0]['count']]} {PLURALS[include[0]['class']]}"
    if tag == "position":
        ref, subj = include
        return f"{_a(subj['class'])} {subj['position'][0]} {_a(ref['class'])}"
    words = [_a(f"{e['color']} {e['class']}" if "color" in e else e["class"]) for e in include]
    return " and ".join(words)


def caption_for(scene: dict, rng: np.random.Generator) -> str:
    """Template caption, e.g. 'a photo of a green triangle right of a square'; prefix drawn from rng."""
    meta = scene if "include" in scene else geneval_metadata(scene)
    prefix = PREFIXES[int(rng.integers(len(PREFIXES)))]
    return f"{prefix} {phrase_for(scene['task'], meta['include'])}"


def render_scene(scene: dict) -> Image.Image:
    """Render `scene` as an RGB image, aliased (every object pixel is exactly COLORS[color])."""
    r = scene["resolution"]
    img = Image.new("RGB", (r, r), tuple(scene.get("background", BACKGROUND)))
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        fill = COLORS[o["color"]]
        x0, y0, x1, y1 = o["bbox"]
        xe, ye, cx, cy = x1 - 1, y1 - 1, (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
        if o["shape"] == "square":
            draw.rectangle([x0, y0, xe, ye], fill=fill)
        elif o["shape"] == "circle":
            draw.ellipse([x0, y0, xe, ye], fill=fill, outline=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(x0, ye), (xe, ye), (cx, y0)], fill=fill, outline=fill)
        elif o["shape"] == "diamond":
            draw.polygon([(cx, y0), (xe, cy), (cx, ye), (x0, cy)], fill=fill, outline=fill)
        else:
            raise ValueError(f"unknown shape {o['shape']!r}; expected one of {SHAPES}")
    return img


def prompt_seeds(n: int, seed: int = 0, prompts: list[str] | None = None) -> tuple[list[str], list[int]]:
    """n prompts and their image seeds for a study or benchmark: `prompts` (default: the held-out set of
    `eval_prompts(seed)`) cycled to n, with seeds seed, seed + 1, ..."""
    prompts = prompts if prompts is not None else [m["prompt"] for m in eval_prompts(seed=seed)]
    prompts = (prompts * (n // max(len(prompts), 1) + 1))[:n]
    return prompts, [seed + i for i in range(len(prompts))]


def eval_prompts(seed: int = 0, per_task: int = 48) -> list[dict]:
    """Held-out prompt set in GenEval's metadata schema ('a photo of ...'), at most `per_task` per tag.

    Enumerates every distinct prompt of each tag and keeps a seeded subset where there are more.
    """
    rng = np.random.default_rng(seed)
    one = lambda s, **kw: {"class": s, "count": 1, **kw}  # noqa: E731
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    table = {
        "single_object": [{"include": [one(s)]} for s in SHAPES],
        "two_object": [{"include": [one(a), one(b)]} for a, b in pairs],
        "counting": [{"include": [{"class": s, "count": n}], "exclude": [{"class": s, "count": n + 1}]}
                     for s in SHAPES for n in NUMBER_WORDS],
        "colors": [{"include": [one(s, color=c)]} for s in SHAPES for c in COLOR_NAMES],
        "position": [{"include": [one(b), one(a, position=[r, 0])]} for a, b in pairs for r in RELATIONS],
        "color_attr": [{"include": [one(a, color=c), one(b, color=d)]}
                       for a, b in pairs for c in COLOR_NAMES for d in COLOR_NAMES if c != d],
    }
    out = []
    for tag in TASKS:
        entries = table[tag]
        if len(entries) > per_task:
            entries = [entries[i] for i in sorted(rng.choice(len(entries), per_task, replace=False))]
        for e in entries:
            out.append({"tag": tag, **e, "prompt": f"a photo of {phrase_for(tag, e['include'])}"})
    return out
