"""The teacher recipe's pieces: AR input noise, the NextStep-shaped cost-matched preset, object counts in the
GenEval summary (crowding), and half-precision packing of the shipped checkpoints."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from eval_suites.geneval_rules import asked_objects, summarize
from fastardiff_ds.benchmark import flops_per_token, large_preset_split
from fastardiff_ds.config import get_preset
from fastardiff_ds.models import build_head, build_target, load_pretrained, save_pretrained
from fastardiff_ds.training.pretrain import noisy_inputs, pretrain_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from pack_checkpoint import pack  # noqa: E402


def test_input_noise_off_is_identity_and_on_draws_one_scale_per_sample():
    tokens = torch.zeros(4000, 64, 16)
    assert noisy_inputs(tokens, torch.Generator().manual_seed(0), 0.0) is tokens
    out = noisy_inputs(tokens, torch.Generator().manual_seed(0), 0.5)
    std = out.std(dim=(1, 2))  # per-sample scale s ~ U[0, 0.5]
    assert float(std.max()) < 0.5 * 1.12 and float(std.min()) < 0.02
    assert float(std.mean()) == pytest.approx(0.25, abs=0.01)
    same = noisy_inputs(tokens, torch.Generator().manual_seed(0), 0.5)
    assert torch.equal(out, same)


def test_input_noise_reaches_the_ar_only():
    """The AR reads noisy tokens, the head's flow-matching target stays the clean token."""
    cfg = get_preset("tiny")
    cfg.model.ar.num_layers = 1
    target, head = build_target(cfg), build_head(cfg)
    seen = {}
    orig = target.forward_train

    def spy(ids, mask, tokens, *a, **k):
        seen["tokens"] = tokens
        return orig(ids, mask, tokens, *a, **k)

    target.forward_train = spy
    ids, mask = torch.randint(5, 100, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    tokens = torch.rand(2, cfg.model.image.grid ** 2, cfg.model.image.token_dim) * 2 - 1
    pretrain_loss(target, head, ids, mask, tokens, torch.Generator().manual_seed(1), 1, input_noise=0.0)
    assert torch.equal(seen["tokens"], tokens)
    pretrain_loss(target, head, ids, mask, tokens, torch.Generator().manual_seed(1), 1, input_noise=0.3)
    assert not torch.allclose(seen["tokens"], tokens) and float((seen["tokens"] - tokens).abs().max()) < 2.0


def test_cost_matched_preset_is_shaped_like_nextstep1():
    cfg = get_preset("tiny-bench")
    assert cfg.model.ar.num_layers == 8 * cfg.model.draft.num_layers  # NextStep-1: 6 of 48 layers
    assert abs(flops_per_token(cfg)["ar_share"] - large_preset_split()["ar_share"]) < 0.03  # about 63 : 37
    assert cfg.pretrain.input_noise > 0 and cfg.train.teacher == "assets/tiny_teacher"


def test_summary_counts_objects_against_the_prompt():
    meta1 = {"tag": "single_object", "include": [{"class": "circle", "count": 1}]}
    meta3 = {"tag": "counting", "include": [{"class": "square", "count": 3}],
             "exclude": [{"class": "square", "count": 4}]}
    assert asked_objects(meta1) == 1 and asked_objects(meta3) == 3
    rows = [{"tag": "single_object", "correct": True, "prompt_index": 0, "n_objects": 5, "n_asked": 1},
            {"tag": "single_object", "correct": True, "prompt_index": 0, "n_objects": 1, "n_asked": 1},
            {"tag": "counting", "correct": True, "prompt_index": 1, "n_objects": 3, "n_asked": 3},
            {"tag": "counting", "correct": False, "prompt_index": 1, "n_objects": 2, "n_asked": 3}]
    s = summarize(rows)
    assert s["exact_count_per_task"] == {"single_object": 0.5, "counting": 0.5}
    assert s["exact_object_count"] == 0.5 and s["objects_per_image"] == pytest.approx(11 / 4)
    assert "exact_object_count" not in summarize([{k: v for k, v in r.items() if k != "n_objects"} for r in rows])


def test_packed_checkpoint_loads_as_the_rounded_source(tmp_path):
    cfg = get_preset("tiny")
    cfg.model.ar.num_layers = cfg.model.draft.num_layers = 1
    torch.manual_seed(0)
    target, head = build_target(cfg), build_head(cfg)
    save_pretrained(tmp_path / "src", cfg, target, head, meta={"stage": "pretrain"})
    sizes = pack(tmp_path / "src", tmp_path / "dst")
    assert sizes["bytes_after"] < 0.6 * sizes["bytes_before"]
    assert json.loads((tmp_path / "dst/meta.json").read_text()) == {"stage": "pretrain", "stored_dtype": "float16"}
    packed = load_pretrained(tmp_path / "dst")
    assert next(packed.target.parameters()).dtype == torch.float32
    for name, p in target.state_dict().items():
        assert torch.equal(packed.target.state_dict()[name], p.half().float()), name
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pack(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "dst" / "stale.png").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        pack(tmp_path / "src", tmp_path / "dst")
    pack(tmp_path / "src", tmp_path / "dst", meta={"trained_with": "x"}, overwrite=True)
    assert not (tmp_path / "dst" / "stale.png").exists()
    assert json.loads((tmp_path / "dst/meta.json").read_text())["trained_with"] == "x"


def test_shapes_table_rows_and_noise(tmp_path):
    from eval_suites.shapes_table import table

    for name, overall, fid in (("a", 0.8, 100.0), ("b", 0.75, 120.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "geneval.json").write_text(json.dumps(
            {"overall": overall, "tasks": {"single_object": 1.0}, "exact_count_per_task": {"single_object": 0.9},
             "objects_per_image": 1.9, "n_images": 8}))
        (tmp_path / name / "fid.json").write_text(json.dumps({"fid": fid}))
    out = table([("A", str(tmp_path / "a")), ("B", str(tmp_path / "b"))], (str(tmp_path / "a"), str(tmp_path / "b")))
    lines = out.splitlines()
    assert lines[2].startswith("| A | 0.800 | 1.00 | - |") and "| 0.90 | 1.90 | 100 | - |" in lines[2]
    assert lines[4].startswith("| noise") and "| 0.050 |" in lines[4] and "| 20 |" in lines[4]
