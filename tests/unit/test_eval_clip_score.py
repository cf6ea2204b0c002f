"""CLIP score (torchmetrics' definition) on fixed embeddings, and the shipped shapes CLIP."""
import json

import numpy as np
import pytest
import torch

from eval_suites import clip_score
from eval_suites.clip_models import load_open_clip
from eval_suites.clip_score import clip_score_from_embeddings


def test_identical_and_orthogonal_embeddings():
    e = torch.eye(4)
    assert clip_score_from_embeddings(e, e)["clip_score"] == pytest.approx(100.0)
    assert clip_score_from_embeddings(e, e.roll(1, dims=0))["clip_score"] == pytest.approx(0.0)


def test_known_values_and_scale_invariance():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    txt = torch.tensor([[1.0, 1.0], [0.0, -5.0], [1.0, 0.0]])
    res = clip_score_from_embeddings(img, txt)
    expected = 100 * np.array([1 / np.sqrt(2), -1.0, 1 / np.sqrt(2)])
    assert res["per_sample"] == pytest.approx(expected.tolist())
    assert res["clip_score_unclamped_mean"] == pytest.approx(expected.mean())
    assert res["clip_score"] == pytest.approx(max(expected.mean(), 0))
    assert clip_score_from_embeddings(7 * img, 0.1 * txt)["clip_score"] == pytest.approx(res["clip_score"])


def test_clamp_applies_to_the_mean_not_each_sample():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [-1.0, 0.1]])  # +100 and about -99.5
    res = clip_score_from_embeddings(img, txt)
    assert res["clip_score"] == pytest.approx(max(0.0, (100 - 100 / np.sqrt(1.01)) / 2))
    per_sample_clamped = np.mean([max(s, 0) for s in res["per_sample"]])
    assert res["clip_score"] < per_sample_clamped - 40  # a per-sample clamp would report ~50
    neg = clip_score_from_embeddings(img, -img)
    assert neg["clip_score"] == 0.0 and neg["clip_score_unclamped_mean"] == pytest.approx(-100.0)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="paired"):
        clip_score_from_embeddings(torch.zeros(3, 4), torch.zeros(2, 4))


def test_missing_checkpoint_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--clip-ckpt"):
        load_open_clip("ViT-L-14", None)
    with pytest.raises(FileNotFoundError, match="--clip-ckpt"):
        load_open_clip("ViT-L-14", tmp_path / "missing.pt")


def test_shipped_shapes_clip_prefers_matching_captions(tmp_path):
    from fastardiff_ds.data import shapes as sh
    from eval_suites.generation import write_generation_folder

    rng = np.random.default_rng(99)
    scenes = [sh.sample_scene(rng, 32) for _ in range(24)]
    meta = [{"prompt": s["prompt"]} for s in scenes]
    by_prompt = {s["prompt"]: s for s in scenes}
    write_generation_folder(meta, tmp_path / "match", lambda p, n, seed: [sh.render_scene(by_prompt[p])] * n, 1)
    shifted = {scenes[i]["prompt"]: scenes[(i + 1) % len(scenes)] for i in range(len(scenes))}
    write_generation_folder(meta, tmp_path / "mismatch", lambda p, n, seed: [sh.render_scene(shifted[p])] * n, 1)
    good = clip_score.main(["score", "--images", str(tmp_path / "match"), "--out", str(tmp_path / "m.json")])
    bad = clip_score.main(["score", "--images", str(tmp_path / "mismatch"), "--out", str(tmp_path / "x.json")])
    assert good["clip_score"] > bad["clip_score"] + 10
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["protocol"]["library"] == "open_clip" and saved["n_images"] == 24
    assert (tmp_path / "m.jsonl").is_file() and (tmp_path / "m.png").is_file()
