"""Detector and colour plug-ins: the mmdet adapter (with a stand-in mmdet) and CLIP colour attribution."""
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from eval_suites.clip_models import COLOR_TEMPLATES, ClipBundle, ClipColorClassifier, masked_crop
from eval_suites.detectors import MMDetDetector
from eval_suites.geneval_rules import COLORS, Detection

PALETTE = {"red": (230, 25, 25), "green": (20, 160, 40), "blue": (30, 60, 230), "yellow": (255, 235, 0)}


class StubClip(torch.nn.Module):
    """Text -> one-hot of the colour word in it; image -> one-hot of the nearest palette colour to its
    mean non-grey pixel. Enough to check templates, masking and cropping end to end."""

    def encode_text(self, tokens):
        return tokens.float()

    def encode_image(self, images):
        out = torch.zeros(len(images), len(COLORS))
        for i, img in enumerate(images):
            px = img.reshape(3, -1).T * 255
            px = px[(px - 153).abs().max(1).values > 20]  # drop the #999 background
            mean = px.mean(0)
            name = min(PALETTE, key=lambda c: float(((mean - torch.tensor(PALETTE[c])) ** 2).sum()))
            out[i, COLORS.index(name)] = 1
        return out


def stub_bundle():
    def tokenizer(texts):
        return torch.tensor([[float(c in t.split(" ") or f"{c}-colored" in t) for c in COLORS] for t in texts])

    def preprocess(im):
        return torch.from_numpy(np.array(im.resize((8, 8), Image.NEAREST))).permute(2, 0, 1).float() / 255
    return ClipBundle(StubClip(), preprocess, tokenizer, "cpu")


def two_object_image():
    img = Image.new("RGB", (64, 64), (128, 128, 128))
    arr = np.array(img)
    arr[4:20, 4:20] = PALETTE["red"]
    arr[30:50, 30:50] = PALETTE["blue"]
    arr[30:34, 30:34] = PALETTE["green"]  # a small green patch inside the blue box, outside its mask
    return Image.fromarray(arr)


def test_masked_crop_pastes_on_grey_and_crops_the_box():
    img = two_object_image()
    mask = np.zeros((64, 64), bool)
    mask[34:50, 34:50] = True
    crop = np.asarray(masked_crop(img, Detection(np.array([30, 30, 50, 50.0]), 0.9, mask)))
    assert crop.shape == (20, 20, 3)
    assert tuple(crop[0, 0]) == (0x99, 0x99, 0x99) and tuple(crop[10, 10]) == PALETTE["blue"]


def test_clip_colour_attribution_per_detection():
    img = two_object_image()
    m_red, m_blue = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    m_red[4:20, 4:20] = True
    m_blue[34:50, 34:50] = True
    dets = [Detection(np.array([4, 4, 20, 20.0]), 0.9, m_red), Detection(np.array([30, 30, 50, 50.0]), 0.8, m_blue)]
    clf = ClipColorClassifier(stub_bundle())
    assert clf(img, dets, "car") == ["red", "blue"]
    assert "car" in clf._weights and clf._weights["car"].shape == (len(COLORS), len(COLORS))
    assert len(COLOR_TEMPLATES) == 3


@pytest.fixture
def fake_mmdet(monkeypatch):
    seen = {}

    def init_detector(config, checkpoint, device):
        seen.update(config=config, checkpoint=checkpoint, device=device)
        return "model"

    def inference_detector(model, image):
        seen["image"] = image
        bbox = [np.array([[1, 2, 11, 12, 0.95], [5, 5, 9, 9, 0.2]], dtype=np.float32), np.zeros((0, 5), np.float32)]
        segm = [[np.ones((16, 16), bool), np.zeros((16, 16), bool)], []]
        return bbox, segm

    apis = types.ModuleType("mmdet.apis")
    apis.init_detector, apis.inference_detector = init_detector, inference_detector
    monkeypatch.setitem(sys.modules, "mmdet", types.ModuleType("mmdet"))
    monkeypatch.setitem(sys.modules, "mmdet.apis", apis)
    return seen


def test_mmdet_adapter_converts_v2_results(tmp_path, fake_mmdet):
    cfg, ckpt = tmp_path / "m2f.py", tmp_path / "m2f.pth"
    cfg.write_text("#")
    ckpt.write_bytes(b"0")
    det = MMDetDetector(cfg, ckpt, ["cat", "dog"], device="cpu")
    img = Image.new("RGB", (16, 16), (255, 0, 0))
    out = det.detect(img)
    assert fake_mmdet["checkpoint"] == str(ckpt) and tuple(fake_mmdet["image"][0, 0]) == (0, 0, 255)  # BGR
    assert list(out) == ["cat", "dog"] and out["dog"] == []
    assert [d.score for d in out["cat"]] == pytest.approx([0.95, 0.2])
    assert out["cat"][0].box.tolist() == [1, 2, 11, 12] and out["cat"][0].mask.all()


def test_mmdet_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    cfg, ckpt = tmp_path / "m2f.py", tmp_path / "m2f.pth"
    cfg.write_text("#")
    ckpt.write_bytes(b"0")
    monkeypatch.setitem(sys.modules, "mmdet", None)  # import fails
    with pytest.raises(ImportError, match="mmdet==2.27.0"):
        MMDetDetector(cfg, ckpt, ["cat"])
