"""Detector plug-ins for GenEval: anything with `detect(image: PIL.Image) -> dict[class, list[Detection]]`.

`MMDetDetector` is the official Mask2Former (Swin-S, COCO) through mmdet, imported lazily and built
from local config and checkpoint paths (this project never downloads weights). The shapes-domain
detector lives in `eval_suites.shapes_detector`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from eval_suites.geneval_rules import Detection

GENEVAL_DETECTOR = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco"


class Detector(Protocol):
    classnames: list[str]

    def detect(self, image) -> dict[str, list[Detection]]:
        """All detections of an RGB image, per class name, in any order (rules filter them)."""


def _require_file(path, flag: str, what: str) -> Path:
    if path is None:
        raise FileNotFoundError(f"{what} is not set; pass {flag} PATH (a local file; nothing is downloaded)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist; pass an existing local file with {flag}")
    return path


class MMDetDetector:
    """GenEval's detector: mmdet `init_detector` + `inference_detector` (mmdet 2.x tuples or 3.x samples).

    config: the mmdet config `.py` (e.g. configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py);
    checkpoint: the matching `.pth`. GenEval pins mmdet 2.27 / mmcv-full 1.7 (geneval issue #8).
    """

    def __init__(self, config, checkpoint, classnames: list[str], device: str = "cuda"):
        config = _require_file(config, "--detector-config", "the mmdet detector config")
        checkpoint = _require_file(checkpoint, "--detector-ckpt", "the Mask2Former checkpoint")
        try:
            from mmdet.apis import inference_detector, init_detector
        except ImportError as err:
            raise ImportError("the mask2former detector needs mmdet (GenEval pins mmdet==2.27.0 with "
                              "mmcv-full==1.7.1); install it, or use --detector shapes for the synthetic "
                              f"domain ({err})") from err
        self._infer = inference_detector
        self.model = init_detector(str(config), str(checkpoint), device=device)
        self.classnames = list(classnames)

    def detect(self, image) -> dict[str, list[Detection]]:
        result = self._infer(self.model, np.asarray(image.convert("RGB"))[:, :, ::-1])  # mmdet wants BGR
        if hasattr(result, "pred_instances"):  # mmdet 3.x DetDataSample
            return self._from_instances(result.pred_instances)
        bbox = result[0] if isinstance(result, tuple) else result
        segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
        out = {}
        for k, cls in enumerate(self.classnames):
            out[cls] = [Detection(box=row[:4].astype(np.float64), score=float(row[4]),
                                  mask=None if segm is None else np.asarray(segm[k][j], dtype=bool))
                        for j, row in enumerate(bbox[k])]
        return out

    def _from_instances(self, inst) -> dict[str, list[Detection]]:
        boxes, scores, labels = (inst.bboxes.cpu().numpy(), inst.scores.cpu().numpy(), inst.labels.cpu().numpy())
        masks = inst.masks.cpu().numpy().astype(bool) if "masks" in inst else None
        out: dict[str, list[Detection]] = {}
        for j in range(len(scores)):
            det = Detection(box=boxes[j].astype(np.float64), score=float(scores[j]),
                            mask=None if masks is None else masks[j])
            out.setdefault(self.classnames[int(labels[j])], []).append(det)
        return out
