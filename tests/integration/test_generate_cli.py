"""launcher/generate.py end to end: PNGs + grid + stats, determinism by seed, clear errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAST = ["inference.num_steps=3", "inference.cfg_scale=2", "model.ar.num_layers=2", "model.draft.num_layers=1",
        "model.head.depth=1", "--threads", "1"]


def _generate(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launcher" / "generate.py"), "--out", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["baseline", "fastardiff"])
def test_random_init_generation_is_seeded_and_writes_files(tmp_path, mode):
    args = ["--random-init", "--prompt", "a photo of a red circle", "--num-images", "2", "--mode", mode, *FAST]
    a, b = _generate(tmp_path / "a", *args), _generate(tmp_path / "b", *args)
    assert a.returncode == 0, a.stderr[-3000:]
    assert "random" in a.stdout.lower()  # the output says the weights are random
    pngs = sorted((tmp_path / "a").glob("0*.png"))
    assert len(pngs) == 2 and (tmp_path / "a" / "grid.png").is_file()
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["images"] == 2 and stats["random_init"] is True
    for p in pngs:  # same seed -> same image
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()
    assert pngs[0].read_bytes() != pngs[1].read_bytes()  # different seeds -> different images


def test_errors_name_the_fix(tmp_path):
    no_ckpt = _generate(tmp_path / "x", "--prompt", "a red circle")
    assert no_ckpt.returncode != 0 and "--random-init" in no_ckpt.stderr
    missing = _generate(tmp_path / "y", "--ckpt", str(tmp_path / "nope"), "--prompt", "a red circle")
    assert missing.returncode != 0 and "--ckpt" in missing.stderr
    too_long = _generate(tmp_path / "z", "--random-init", "--prompt", "a red circle " * 40, *FAST)
    assert too_long.returncode != 0 and "max_length" in too_long.stderr


def test_class_labels_with_a_mar_export(tmp_path):
    """--class-label on a MAR export: one PNG per image, seeded by class, errors for a bad label / key / mode."""
    from toy import tiny_mar_export

    tiny_mar_export(tmp_path / "ck")
    args = ["--ckpt", str(tmp_path / "ck"), "--class-label", "3", "--class-label", "39", "--num-images", "2",
            "sampling.num_iter=2", "sampling.num_sampling_steps=3", "--threads", "1"]
    a, b = _generate(tmp_path / "a", *args), _generate(tmp_path / "b", *args)
    assert a.returncode == 0, a.stderr[-3000:]
    pngs = sorted((tmp_path / "a").glob("0*_class*.png"))
    assert [p.name.split("_")[1] for p in pngs] == ["class3.png", "class3.png", "class39.png", "class39.png"]
    assert all(p.read_bytes() == (tmp_path / "b" / p.name).read_bytes() for p in pngs)
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["family"] == "mar" and stats["sampling"]["num_iter"] == 2
    bad = _generate(tmp_path / "c", "--ckpt", str(tmp_path / "ck"), "--class-label", "40")
    assert bad.returncode != 0 and "class_num" in bad.stderr
    key = _generate(tmp_path / "d", "--ckpt", str(tmp_path / "ck"), "--class-label", "1", "inference.cfg_scale=2")
    assert key.returncode != 0 and "sampling.KEY" in key.stderr
    mode = _generate(tmp_path / "e", "--ckpt", str(tmp_path / "ck"), "--class-label", "1", "--mode", "dmd")
    assert mode.returncode != 0 and "student_head" in mode.stderr
