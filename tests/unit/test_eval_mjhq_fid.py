"""MJHQ FID suite end to end on a synthetic reference set in MJHQ layout (tiny preset's protocol)."""
import json

import numpy as np
import pytest
import torch
from PIL import ImageFilter

from fastardiff_ds.data import shapes as sh
from eval_suites import mjhq_fid
from eval_suites.fid_inception import fid_inception_v3
from eval_suites.generation import write_generation_folder
from eval_suites.shapes_data import render_view
from eval_suites.shapes_reference import write_shapes_reference


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return write_shapes_reference(tmp_path_factory.mktemp("ref"), n_per_category=40, seed=3)


def generate_like(reference, out, seed, blur=0.0):
    """One fresh scene per reference prompt, of the prompt's category (task), in the reference's
    (pipeline) view; optionally blurred."""
    meta = mjhq_fid.read_mjhq_meta(reference)
    rows = [{"prompt": m["prompt"], "category": m["category"]} for _, m in sorted(meta.items())]
    rng = np.random.default_rng(seed)
    by_prompt = {r["prompt"]: r["category"] for r in rows}

    def gen(prompt, n, s):
        imgs = [render_view(rng, "pipeline", 32, task=by_prompt[prompt])[0] for _ in range(n)]
        return [im.filter(ImageFilter.GaussianBlur(blur)) if blur else im for im in imgs]
    return write_generation_folder(rows, out, gen, n_per_prompt=1)


def score(images, reference, tmp_path, name, *extra):
    return mjhq_fid.main(["score", "--images", str(images), "--mjhq-root", str(reference), "--features", "shapes",
                          "--resolution", "32", "--stats-cache", str(tmp_path / "cache"),
                          "--out", str(tmp_path / f"{name}.json"), *extra])


def test_fid_ranks_faithful_above_blurred_and_writes_protocol(reference, tmp_path, monkeypatch):
    good = score(generate_like(reference, tmp_path / "good", 11), reference, tmp_path, "good")
    bad = score(generate_like(reference, tmp_path / "bad", 12, blur=1.0), reference, tmp_path, "bad")
    assert good["fid"] < 0.5 * bad["fid"]
    assert set(good["fid_per_category"]) == set(sh.TASKS)
    assert all(good["fid_per_category"][c] < bad["fid_per_category"][c] for c in sh.TASKS)
    saved = json.loads((tmp_path / "good.json").read_text())
    proto = saved["protocol"]
    assert proto["resolution"] == 32 and proto["features"] == "shapes" and proto["fid_dtype"] == "float64"
    assert saved["n_reference"] == {c: 40 for c in sh.TASKS} and sum(saved["n_generated"].values()) == 240
    assert (tmp_path / "good.png").is_file()
    assert len(list((tmp_path / "cache").glob("*.npz"))) == len(sh.TASKS) + 1


def test_reference_statistics_come_from_the_cache(reference, tmp_path, monkeypatch):
    gen = generate_like(reference, tmp_path / "gen", 13)
    first = score(gen, reference, tmp_path, "a")
    calls = []
    real = mjhq_fid.extract_features
    monkeypatch.setattr(mjhq_fid, "extract_features", lambda *a, **k: calls.append(k["desc"]) or real(*a, **k))
    second = score(gen, reference, tmp_path, "b")
    assert calls == ["generated features"]  # no reference pass
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-12)


def test_identical_sets_give_zero(reference, tmp_path):
    from PIL import Image
    from eval_suites.folders import write_prompt_entry
    for idx, (image_id, m) in enumerate(sorted(mjhq_fid.read_mjhq_meta(reference).items())):
        write_prompt_entry(tmp_path / "copy", idx, {"prompt": m["prompt"], "category": m["category"]},
                           [Image.open(reference / m["category"] / f"{image_id}.png")])
    res = score(tmp_path / "copy", reference, tmp_path, "copy")
    assert res["fid"] == pytest.approx(0.0, abs=1e-6)
    # N=40 < D=128 per category: singular covariances leave ~1e-5 of sqrtm error (as in pytorch-fid).
    assert all(v == pytest.approx(0.0, abs=1e-3) for v in res["fid_per_category"].values())


def test_missing_feature_weights_name_the_flag(reference, tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        mjhq_fid.main(["score", "--images", str(tmp_path), "--mjhq-root", str(reference), "--out", str(tmp_path / "r.json")])
    with pytest.raises(FileNotFoundError, match="--shapes-weights"):
        score(tmp_path, reference, tmp_path, "r", "--shapes-weights", str(tmp_path / "none.pt"))


@pytest.mark.slow
def test_inception_path_with_random_weights(tmp_path):
    """Random FID-Inception weights from a temp file; 3 reference + 3 generated images of one category."""
    from eval_suites.folders import write_prompt_entry
    torch.manual_seed(0)
    weights = tmp_path / "pt_inception.pth"
    torch.save(fid_inception_v3().state_dict(), weights)
    rng, meta = np.random.default_rng(0), {}
    (tmp_path / "ref" / "colors").mkdir(parents=True)
    for idx in range(3):
        ref, gen = sh.sample_scene(rng, 32, task="colors"), sh.sample_scene(rng, 32, task="colors")
        sh.render_scene(ref).save(tmp_path / "ref" / "colors" / f"r{idx}.png")
        meta[f"r{idx}"] = {"category": "colors", "prompt": ref["prompt"]}
        write_prompt_entry(tmp_path / "gen", idx, {"prompt": gen["prompt"], "category": "colors"},
                           [sh.render_scene(gen)])
    (tmp_path / "ref" / "meta_data.json").write_text(json.dumps(meta))
    res = mjhq_fid.main(["score", "--images", str(tmp_path / "gen"), "--mjhq-root", str(tmp_path / "ref"),
                         "--inception-weights", str(weights), "--resolution", "64", "--out", str(tmp_path / "r.json")])
    assert np.isfinite(res["fid"]) and set(res["fid_per_category"]) == {"colors"}
    assert res["protocol"]["features"] == "inception" and res["n_reference"] == {"colors": 3}
