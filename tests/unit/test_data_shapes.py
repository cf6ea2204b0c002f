"""Synthetic shapes: exact renders, GenEval-consistent scenes and metadata, on-disk layout, determinism."""
from __future__ import annotations

import io
import itertools
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from fastardiff_ds.data import shapes as S
from fastardiff_ds.data.metadata import count_samples, read_parquet, read_stats
from fastardiff_ds.data.shards import expand_shards
from fastardiff_ds.data.synthetic import EVAL_METADATA, write_shapes_dataset

GENEVAL_COLORS = {"red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"}


def detect(img: Image.Image, tol: float) -> list[tuple[str, list[int]]]:
    """Objects by colour: pixels within `tol` of a palette colour, connected components, their boxes."""
    a = np.asarray(img, dtype=np.float64)
    names = list(S.COLORS)
    palette = np.array([S.COLORS[n] for n in names] + [S.BACKGROUND], dtype=np.float64)
    d = np.linalg.norm(a[:, :, None, :] - palette[None, None], axis=-1)  # (H, W, K+1)
    nearest, dist = d.argmin(-1), d.min(-1)
    found = []
    for k, name in enumerate(names):
        lab, _ = ndimage.label((nearest == k) & (dist <= tol))
        for sl in ndimage.find_objects(lab):
            if (sl[0].stop - sl[0].start) * (sl[1].stop - sl[1].start) >= 4:  # ignore JPEG specks
                found.append((name, [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop]))
    return sorted(found)


def test_palette_contract():
    assert len(S.COLORS) >= 6 and set(S.COLORS) <= GENEVAL_COLORS and len(S.SHAPES) >= 4
    rgb = np.array(list(S.COLORS.values()) + [S.BACKGROUND], dtype=float)
    dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)]
    assert min(dists) > 80  # separable after JPEG + resize
    assert S.BACKGROUND not in S.COLORS.values()


@pytest.mark.parametrize("resolution", [32, 64])
def test_render_matches_scene_exactly(resolution):
    rng = np.random.default_rng(0)
    for i in range(120):
        scene = S.sample_scene(rng, resolution, S.TASKS[i % 6])
        img = S.render_scene(scene)
        assert img.mode == "RGB" and img.size == (resolution, resolution)
        expected = sorted((o["color"], o["bbox"]) for o in scene["objects"])
        assert detect(img, tol=0.0) == expected, scene
        used = {tuple(c) for c in np.unique(np.asarray(img).reshape(-1, 3), axis=0).tolist()}
        assert used <= {S.BACKGROUND} | {S.COLORS[o["color"]] for o in scene["objects"]}  # no anti-aliasing
        assert min(o["bbox"][2] - o["bbox"][0] for o in scene["objects"]) >= 0.2 * resolution


def test_scene_semantics_per_task():
    rng = np.random.default_rng(1)
    for task in S.TASKS:
        for _ in range(40):
            sc = S.sample_scene(rng, 32, task)
            objs, inc = sc["objects"], sc["include"]
            assert sc["task"] == task and sc["label"] == S.label_of(objs[0]["shape"], objs[0]["color"])
            assert 0 <= sc["label"] < S.NUM_CLASSES and 1 <= len(objs) <= 4
            assert sum(e["count"] for e in inc) == len(objs)
            assert sc["prompt"].endswith(S.phrase_for(task, inc))
            if task == "counting":
                assert len({o["shape"] for o in objs}) == 1 and sc["exclude"][0]["count"] == len(objs) + 1
            if task == "position":  # subject (objects[0]) vs reference (objects[1]) by GenEval's own rule
                rel, idx = inc[1]["position"]
                assert idx == 0 and S.relations(objs[0]["bbox"], objs[1]["bbox"]) == {rel}
            if task == "color_attr":
                assert objs[0]["color"] != objs[1]["color"] and objs[0]["shape"] != objs[1]["shape"]
    assert S.relations([0, 0, 10, 10], [20, 0, 30, 10]) == {"left of"}
    assert S.relations([0, 20, 10, 30], [0, 0, 10, 10]) == {"below"}


def test_sample_scene_is_deterministic_and_validates():
    a = S.sample_scene(np.random.default_rng([7, 3]), 64)
    assert a == S.sample_scene(np.random.default_rng([7, 3]), 64)
    with pytest.raises(ValueError, match="unknown task"):
        S.sample_scene(np.random.default_rng(0), 64, "pose")
    with pytest.raises(ValueError, match="resolution"):
        S.sample_scene(np.random.default_rng(0), 8)


def test_eval_metadata_follows_geneval_schema():
    prompts = S.eval_prompts(seed=0)
    assert {p["tag"] for p in prompts} == set(S.TASKS)
    for p in prompts:
        assert set(p) <= {"tag", "include", "exclude", "prompt"} and p["prompt"].startswith("a photo of ")
        for e in p["include"]:
            assert e["class"] in S.SHAPES and e["count"] >= 1 and e.get("color", "red") in S.COLORS
            if "position" in e:
                assert e["position"][0] in S.RELATIONS and e["position"][1] == 0
        if p["tag"] == "counting":
            assert p["exclude"] == [{"class": p["include"][0]["class"], "count": p["include"][0]["count"] + 1}]
    assert len({p["prompt"] for p in prompts}) == len(prompts)


def test_make_shapes_layout_metadata_and_pixels(tmp_path):
    out = tmp_path / "shapes"
    summary = write_shapes_dataset(str(out), num_samples=25, shard_size=10, resolution=64, seed=3)
    assert summary["shards"] == 3 and summary["samples"] == 25
    shards = expand_shards(str(out))
    assert [s.rsplit("/", 1)[1] for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert count_samples(shards) == 25 and json.load(open(out / "sizes.json"))["00002.tar"] == 5
    assert read_stats(shards[0])["successes"] == 10 and read_stats(shards[0])["count"] == 10
    table = read_parquet(shards)
    assert table.num_rows == 25 and set(table.column("status").to_pylist()) == {"success"}
    with tarfile.open(shards[1]) as tar:
        names = tar.getnames()
        assert names[:3] == ["000010000.jpg", "000010000.txt", "000010000.json"]
        for key in sorted({n.split(".")[0] for n in names}):
            meta = json.loads(tar.extractfile(f"{key}.json").read())
            img = Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read())).convert("RGB")
            assert tar.extractfile(f"{key}.txt").read().decode() == meta["prompt"] == meta["caption"]
            assert meta["key"] == key and meta["status"] == "success"
            found = detect(img, tol=60.0)  # through JPEG: same colours, boxes within 1 px
            want = sorted((o["color"], o["bbox"]) for o in meta["objects"])
            assert [c for c, _ in found] == [c for c, _ in want], key
            assert all(np.abs(np.subtract(b, w)).max() <= 1 for (_, b), (_, w) in zip(found, want)), key
    lines = [json.loads(x) for x in open(out / EVAL_METADATA)]
    assert lines == S.eval_prompts(seed=3)


def test_make_shapes_is_deterministic(tmp_path):
    import data_pipelines.make_shapes as cli

    for d, workers in (("a", "1"), ("b", "2")):  # and the same whatever the number of writing processes
        cli.main(["--out", str(tmp_path / d), "--num-samples", "12", "--shard-size", "5", "--seed", "9",
                  "--workers", workers])
    for name in ("00000.tar", "00002.tar", "00001.parquet", "sizes.json", EVAL_METADATA):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
