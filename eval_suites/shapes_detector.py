"""A GenEval detector for the synthetic shapes domain (exact on renders, tolerant on generated images).

1. Every pixel takes the nearest of the palette colours and the background (`fastardiff_ds.data.shapes`);
   pixels farther than `tolerance` (RGB distance) from every palette colour count as background.
2. Connected components (8-connectivity) per colour; components under `min_area_frac` of the image
   are noise (blur fringes, speckles).
3. Shape and box = the template (each shape drawn by `render_scene`) whose box, fitted by coordinate
   descent from the component's box, gives the highest soft IoU with the colour's alpha map (how much of
   the colour each pixel holds over the background). Aliased templates at whole pixels first (exact on
   renders); if none fits well, templates drawn x4 and box-filtered, at quarter-pixel boxes (resized,
   JPEG'd or blurred images, i.e. what a model trained on the shapes set produces).
4. Score = softmax probability of that shape over the shapes' IoUs times an objectness term, so a clean
   render scores ~1.0 and an ambiguous or smeared blob scores low (GenEval keeps > 0.3; > 0.9 for counting).
Colour is the palette colour itself, so `clip_models.exact_colors` replaces CLIP for this domain.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np
from scipy import ndimage

from eval_suites.geneval_rules import Detection


@dataclass
class ShapesDetectorConfig:
    tolerance: float = 90.0       # max RGB distance to a palette colour (palette pairs are > 85 apart)
    min_area_frac: float = 0.008  # smallest object: 7x7 triangle (~28 px) of a 32x32 image = 0.027
    temperature: float = 0.02     # softmax over shape IoUs; clean renders win by > 0.1 IoU -> p > 0.99
    min_iou: float = 0.5          # below this best IoU the blob is not much of a shape: score shrinks
    refit_below: float = 0.97     # whole-pixel fits worse than this are refit at sub-pixel boxes
    upsample: int = 4             # resized / blurred edges sit between pixels: fit at quarter-pixel steps


def _palette():
    from fastardiff_ds.data import shapes  # the domain's single source of truth for colours/shapes
    return shapes


@lru_cache(maxsize=4096)
def _template(shape: str, width: int, height: int) -> np.ndarray:
    """(height, width) bool mask of `shape` rendered into a width x height box by the domain renderer."""
    sh = _palette()
    side = max(width, height)
    scene = {"resolution": side, "background": [0, 0, 0],
             "objects": [{"shape": shape, "color": "white", "bbox": [0, 0, width, height]}]}
    return np.asarray(sh.render_scene(scene).convert("L"))[:height, :width] > 127


def label_pixels(rgb: np.ndarray, tolerance: float) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int: index into COLOR_NAMES, or -1 for background/unassigned."""
    sh = _palette()
    palette = np.array([sh.BACKGROUND, *sh.COLORS.values()], dtype=np.float64)  # row 0 = background
    dist = np.linalg.norm(rgb.astype(np.float64)[:, :, None, :] - palette[None, None], axis=-1)  # (H, W, 1+C)
    nearest = dist.argmin(-1) - 1
    nearest[dist[:, :, 1:].min(-1) > tolerance] = -1
    return nearest


def colour_alpha(rgb: np.ndarray, color, background) -> np.ndarray:
    """(H, W) in [0, 1]: how much of `color` each pixel holds over the background, by projecting the
    pixel on the background->colour segment (a blurred edge pixel is a mix of the two)."""
    c, b = np.asarray(color, np.float64), np.asarray(background, np.float64)
    return np.clip(((rgb.astype(np.float64) - b) @ (c - b)) / ((c - b) @ (c - b)), 0.0, 1.0)


def soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Ruzicka similarity sum(min)/sum(max): IoU for masks, graceful for soft (blurred) ones."""
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-9))


class ShapesDetector:
    """`detect(image) -> {shape: [Detection]}` with boxes [x0, y0, x1, y1) in the image's pixels."""

    def __init__(self, cfg: ShapesDetectorConfig = ShapesDetectorConfig()):
        self.cfg = cfg
        self.classnames = list(_palette().SHAPES)

    def detect(self, image) -> dict[str, list[Detection]]:
        sh = _palette()
        rgb = np.asarray(image.convert("RGB"))
        labels = label_pixels(rgb, self.cfg.tolerance)
        min_area = self.cfg.min_area_frac * labels.size
        out: dict[str, list[Detection]] = {}
        for ci in np.unique(labels[labels >= 0]):
            name = sh.COLOR_NAMES[int(ci)]
            alpha = colour_alpha(rgb, sh.COLORS[name], sh.BACKGROUND)
            comps, _ = ndimage.label(labels == ci, structure=np.ones((3, 3), dtype=int))
            for k, sl in enumerate(ndimage.find_objects(comps), start=1):
                if (comps[sl] == k).sum() < min_area:
                    continue
                shape, box, score = self._fit_component(alpha * ndimage.binary_dilation(comps == k, iterations=2), sl)
                ib = [int(round(v)) for v in box]
                mask = np.zeros(labels.shape, dtype=bool)
                if ib[2] > ib[0] and ib[3] > ib[1]:
                    mask[ib[1]:ib[3], ib[0]:ib[2]] = _template(shape, ib[2] - ib[0], ib[3] - ib[1])
                out.setdefault(shape, []).append(Detection(box=np.array(box, dtype=np.float64), score=score,
                                                           mask=mask, color=name))
        return out

    def _fit_component(self, alpha: np.ndarray, sl) -> tuple[str, list[float], float]:
        """Fit aliased templates at whole-pixel boxes (exact for renders); if none fits well, refit soft
        templates at 1/`cfg.upsample`-pixel boxes, where resized or blurred edges sit between pixels.
        alpha: (H, W) in [0, 1], zero off the component; sl: the component's slices."""
        H, W = alpha.shape
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        wy0, wy1, wx0, wx1 = max(y0 - 2, 0), min(y1 + 2, H), max(x0 - 2, 0), min(x1 + 2, W)
        window = alpha[wy0:wy1, wx0:wx1]
        box0 = [x0 - wx0, y0 - wy0, x1 - wx0, y1 - wy0]
        fits, scale = self._fit(window, box0, _template_in_window, (1,)), 1
        if max(iou for _, iou in fits.values()) < self.cfg.refit_below:
            # Soft templates (rendered x`up`, box-filtered down) at quarter-pixel boxes: resized edges.
            up = self.cfg.upsample
            refits = self._fit(window, [v * up for v in box0], partial(_soft_template, up=up), (up, 1))
            if max(i for _, i in refits.values()) > max(i for _, i in fits.values()):
                fits, scale = refits, up
        ious = np.array([fits[s][1] for s in self.classnames])
        k = int(ious.argmax())
        prob = 1.0 / np.exp((ious - ious[k]) / self.cfg.temperature).sum()
        bx = fits[self.classnames[k]][0]
        box = [min(max(wx0 + bx[0] / scale, 0), W), min(max(wy0 + bx[1] / scale, 0), H),
               min(max(wx0 + bx[2] / scale, 0), W), min(max(wy0 + bx[3] / scale, 0), H)]  # inside the image
        return self.classnames[k], box, float(prob * min(1.0, ious[k] / self.cfg.min_iou))

    def _fit(self, window: np.ndarray, box0: list[int], render, steps) -> dict[str, tuple[list[int], float]]:
        """Per shape, the box (coordinate descent from `box0`, one side by +-step at a time) whose template
        `render(shape, box, window.shape)` has the highest soft IoU with `window` (alpha, zero off the object).

        Score (in `_fit_component`) = softmax over the shapes' IoUs (temperature `cfg.temperature`: how
        clearly this shape beats the others) times objectness min(1, IoU / cfg.min_iou).
        """
        fits = {}
        for shape in self.classnames:
            box, best = list(box0), soft_iou(render(shape, tuple(box0), window.shape), window)
            improved = True
            while improved:
                improved = False
                for side, step in ((sd, sg * st) for st in steps for sd in range(4) for sg in (-1, 1)):
                    cand = list(box)
                    cand[side] += step
                    if cand[2] - cand[0] < 2 or cand[3] - cand[1] < 2:
                        continue
                    iou = soft_iou(render(shape, tuple(cand), window.shape), window)
                    if iou > best + 1e-9:
                        box, best, improved = cand, iou, True
            fits[shape] = (box, best)
        return fits


def _template_in_window(shape: str, box: tuple, size: tuple) -> np.ndarray:
    """(h, w) float: the aliased template in `box` (pixels) on a zero window (clipped at its edges)."""
    h, w = size
    big = np.zeros((h + 2 * _PAD, w + 2 * _PAD))
    x0, y0, x1, y1 = (v + _PAD for v in box)
    if min(x0, y0) < 0 or x1 > w + 2 * _PAD or y1 > h + 2 * _PAD:
        return np.zeros(size)
    big[y0:y1, x0:x1] = _template(shape, x1 - x0, y1 - y0)
    return big[_PAD:_PAD + h, _PAD:_PAD + w]


@lru_cache(maxsize=65536)
def _soft_template(shape: str, box: tuple, size: tuple, up: int) -> np.ndarray:
    """(h, w) float: the template rendered at x`up` in `box` (1/up pixels), box-filtered to the window."""
    hi = _template_in_window(shape, box, (size[0] * up, size[1] * up))
    return hi.reshape(size[0], up, size[1], up).mean(axis=(1, 3))


_PAD = 16  # templates may overhang the window by this much while the fit moves a side


def detections_to_objects(detected: dict[str, list[Detection]]) -> list[dict]:
    """Detections as the scene's object dicts (shape, colour, bbox), sorted by (y0, x0) for comparison."""
    objs = [{"shape": cls, "color": d.color, "bbox": [int(round(v)) for v in d.box]}
            for cls, dets in detected.items() for d in dets]
    return sorted(objs, key=lambda o: (o["bbox"][1], o["bbox"][0], o["shape"]))
