"""The class-conditional (MAR) job's pieces: its config tree, class labels from foreign webdataset shards, MAR's
training step, the export round trip and seeded generation."""
import io
import math
import tarfile
import time

import pytest
import torch
from pathlib import Path

from PIL import Image

from fastardiff_ds.config.c2i import C2I_PRESETS, resolve_c2i_config
from fastardiff_ds.config.checks import ConfigError
from fastardiff_ds.data.loader import build_loader
from fastardiff_ds.models.mar import MAR
from fastardiff_ds.models.mar_checkpoint import load_mar_export, save_mar_export
from fastardiff_ds.training.mar_pretrain import MARTrainNet, mask_rate
from toy import MAR_SMALL, tiny_mar_export

SMALL = [*MAR_SMALL, "sampling.num_iter=4", "sampling.num_sampling_steps=5"]


def test_presets_resolve_and_bad_values_name_the_key():
    for name in C2I_PRESETS:
        cfg = resolve_c2i_config(name)
        assert cfg.data.conditioning == "class" and cfg.data.num_classes == cfg.model.class_num
        assert cfg.data.resolution == cfg.model.img_size
    assert resolve_c2i_config("mar-large").model.enc_dim == 1024
    for override, words in (("model.enc_heads=3", "enc_heads"), ("pretrain.mask_ratio_min=0", "mask_ratio_min"),
                            ("model.vae_embed_dim=16", "vae_embed_dim"), ("sampling.cfg_schedule=cosine", "linear"),
                            ("model.enc_dim_=3", "model.enc_dim"), ("image.tokenizer=kl16", "vae_stride")):
        with pytest.raises(ConfigError, match=words):
            resolve_c2i_config("mar-tiny", overrides=[override])
    with pytest.raises(ConfigError, match="mar-tiny"):
        resolve_c2i_config("mar-tinyy")


def _webdataset_shard(path, samples):
    """A shard the way webdataset's TarWriter writes ImageNet: KEY.cls (ASCII int) + KEY.jpg, members sorted by
    extension, no caption, no json."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext in sorted(members):
                data = members[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), time.time(), 0o444, "bigdata", "bigdata"
                tar.addfile(info, io.BytesIO(data))


def _jpg(color):
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_class_labels_from_webdataset_cls_members(tmp_path):
    samples = [(f"n01440764_{i:04d}", {"jpg": _jpg((10 * i, 0, 0)), "cls": str(i % 5).encode("ascii")})
               for i in range(12)]
    samples[2:2] = [("bad_text", {"jpg": _jpg((0, 0, 0)), "cls": b"tench"}),
                    ("too_big", {"jpg": _jpg((0, 0, 0)), "cls": b"7"}), ("no_label", {"jpg": _jpg((0, 0, 0))})]
    _webdataset_shard(tmp_path / "imagenet-000000.tar", samples)
    cfg = resolve_c2i_config("mar-tiny", overrides=[f"data.shards={tmp_path}", "data.batch_size=4",
                                                    "data.num_workers=0", "data.shuffle_buffer=0",
                                                    "data.shuffle_shards=false", "model.class_num=5",
                                                    "data.samples_per_epoch=12"])
    loader = build_loader(cfg.data, rank=0, world_size=1, tokenize=lambda s: [], pad_id=0)
    batches = list(loader)
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    assert labels == [i % 5 for i in range(12)]
    assert batches[0]["pixels"].shape == (4, 3, 32, 32)
    skipped = loader.skipped
    assert {"bad_cls", "label_out_of_range", "missing_label"} <= set(skipped), skipped


def test_mask_rate_is_the_truncated_normal():
    from scipy import stats

    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([mask_rate(g, 0.7) for _ in range(4000)])
    ref = stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
    assert draws.min() >= 0.7 and draws.max() <= 1.0
    assert abs(draws.mean().item() - ref.mean()) < 4 * ref.std() / math.sqrt(4000)
    assert abs(draws.std().item() - ref.std()) < 0.01
    assert mask_rate(g, 1.0) == 1.0


def test_training_step_trains_only_masked_tokens_and_the_net():
    cfg = resolve_c2i_config("mar-tiny", overrides=SMALL)
    torch.manual_seed(0)
    net = MARTrainNet(MAR(cfg.model))
    net.mar.init_weights()
    tokens, labels = torch.randn(3, cfg.model.seq_len, cfg.model.token_dim), torch.tensor([0, 5, 39])
    g = torch.Generator().manual_seed(1)
    loss, metrics = net.loss(tokens, labels, g, 2, 0.7, 0.1)
    loss.backward()
    assert math.isfinite(loss.item()) and 0.7 <= metrics["mar/mask_rate"] <= 1.0
    for name, p in net.named_parameters():
        if name not in ("mar.fake_latent",):  # the unconditional row: only when a label is dropped
            assert p.grad is not None, name
    again, _ = net.loss(tokens, labels, torch.Generator().manual_seed(1), 2, 0.7, 0.1)
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)  # every draw from the generator


def test_export_round_trip_and_seeded_generation(tmp_path):
    from fastardiff_ds.inference_c2i import MARPipeline

    cfg = resolve_c2i_config("mar-tiny", overrides=SMALL)
    torch.manual_seed(0)
    model = MAR(cfg.model)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_mar_export(tmp_path / "ck", cfg, model.state_dict(), meta={"stage": "test"})
    loaded, cfg2 = load_mar_export(tmp_path / "ck")
    assert cfg2.model == cfg.model
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    pipe = MARPipeline.from_pretrained(tmp_path / "ck")
    a = pipe.generate_tokens([1, 2], seed=3)
    assert torch.equal(a, pipe.generate_tokens([1, 2], seed=3))
    assert not torch.equal(a, pipe.generate_tokens([1, 2], seed=4))
    assert not torch.equal(a, pipe.generate_tokens([1, 3], seed=3))
    guided = pipe.generate_tokens([1, 2], seed=3, cfg=2.0)
    assert guided.shape == a.shape and not torch.equal(guided, a)
    images = pipe.generate([0, 39], seed=0)
    assert [im.size for im in images] == [(32, 32)] * 2
    with pytest.raises(ValueError, match="class_num"):
        pipe.generate_tokens([40], seed=0)
    with pytest.raises(FileNotFoundError, match="checkpoint-last.pth"):
        load_mar_export(tmp_path)


def test_ddpm_start_respaces_below_the_clipped_tail():
    from fastardiff_ds.sampling.diffloss import SpacedCosine

    full, low = SpacedCosine.make("50"), SpacedCosine.make("50", start=990)
    assert full.timestep_map[-1] == 999 and low.timestep_map[-1] == 990 and low.steps == 50
    abar_full, abar_low = 1 / float(full.sqrt_recip_abar[-1]) ** 2, 1 / float(low.sqrt_recip_abar[-1]) ** 2
    assert abar_full < 1e-8  # the official start: 2.4e-9
    assert abar_low > 1e-4  # from 990: 2e-4
    assert torch.equal(SpacedCosine.make("50", start=999).timestep_map, full.timestep_map)
    with pytest.raises(ValueError, match="start"):
        SpacedCosine.make("50", start=1000)


def test_sampling_overrides_are_typed_and_checked():
    from fastardiff_ds.inference_c2i import parse_sampling_overrides

    assert parse_sampling_overrides(["sampling.cfg=3", "sampling.num_iter=8", "sampling.num_sampling_steps=25"]) == \
        {"cfg": 3.0, "num_iter": 8, "num_sampling_steps": "25"}
    for bad, words in ((["sampling.cfg=x"], "float"), (["sampling.ddpm_start=2000"], "ddpm_start"),
                       (["inference.cfg_scale=3"], "sampling.KEY")):
        with pytest.raises(ValueError, match=words):
            parse_sampling_overrides(bad)


def test_distillation_masks_and_student_sampler():
    from fastardiff_ds.sampling.diffloss_flow import DiffLossFlow
    from fastardiff_ds.sampling.mar_loop import few_step_tokens, student_grid
    from fastardiff_ds.models.flow_head import SimpleMLPAdaLN
    from fastardiff_ds.training.mar_distill import schedule_mask, student_samples

    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # one masked count per batch (MAR's encoder drops the same number per row), >= 1
        m = schedule_mask(5, 64, g)
        counts = m.sum(1)
        assert (counts == counts[0]).all() and 1 <= counts[0] <= 64
    assert torch.allclose(student_grid(4, 0.05), torch.tensor([0.05, 0.2875, 0.525, 0.7625]))
    torch.manual_seed(0)
    net = SimpleMLPAdaLN(6, 8, 16, 1, mlp_ratio=1.0, out_dim=12)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    head = DiffLossFlow(net)
    z, noise = torch.randn(10, 8), torch.randn(10, 6)
    grid = student_grid(3, 0.05)
    x = student_samples(lambda a, s, c: head(a, s, c), z, noise, grid, torch.Generator().manual_seed(1), k=2)
    x.sum().backward()
    assert all(p.grad is not None for p in net.parameters())  # the trained step's graph reaches the net
    g2 = torch.Generator().manual_seed(1)
    draws = iter([noise, torch.randn(10, 6, generator=g2), torch.randn(10, 6, generator=g2)])
    with torch.no_grad():  # the sampler and the trainer's backward simulation walk the same chain
        y = few_step_tokens(head, z, 3, lambda shape: next(draws), s_min=0.05)
        ref = student_samples(lambda a, s, c: head(a, s, c), z, noise, grid, torch.Generator().manual_seed(1), k=2)
    assert torch.allclose(y, ref, atol=1e-6), (y - ref).abs().max()


def test_imagefolder_tree_to_shards_labels_as_torchvision(tmp_path):
    """Labels agree with torchvision's own ImageFolder on the same tree; a broken image is skipped and counted."""
    import json as _json

    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from data_pipelines.imagefolder_to_shards import convert

    root = tmp_path / "train"
    for k, name in enumerate(("n02085620", "n01440764", "b_other")):
        (root / name / "sub").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 36), (40 * k, 20 * i, 0)).save(root / name / f"img{i}.JPEG")
        Image.new("RGB", (40, 40), (0, 0, 9 * k)).save(root / name / "sub" / "deep.png")
        (root / name / "notes.txt").write_text("not an image")
    (root / "n01440764" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    summary = convert(str(root), str(tmp_path / "wds"), shard_size=5, seed=1)
    assert (summary["classes"], summary["samples"], summary["skipped_unreadable"]) == (3, 12, 1)
    ref = ImageFolder(str(root), is_valid_file=lambda p: p.lower().endswith(IMG_EXTENSIONS) and "broken" not in p)
    want = {str(Path(p).relative_to(root)): c for p, c in ref.samples}
    assert _json.loads((tmp_path / "wds" / "classes.json").read_text()) == ref.classes
    cfg = resolve_c2i_config("mar-tiny", overrides=[f"data.shards={tmp_path / 'wds'}", "data.batch_size=1",
                                                    "data.num_workers=0", "data.shuffle_buffer=0",
                                                    "model.class_num=3"])
    got = {}
    for shard in sorted((tmp_path / "wds").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = _json.loads(tar.extractfile(m).read())
                    cls = int(tar.extractfile(m.name[:-5] + ".cls").read())
                    assert cls == meta["label"]
                    got[meta["path"]] = cls
    assert got == want
    loader = build_loader(cfg.data, rank=0, world_size=1, tokenize=lambda s: [], pad_id=0)
    labels = sorted(int(b["labels"]) for b in loader)
    assert labels == sorted(want.values())


def test_c2i_eval_reports_fid_accuracy_and_speed(tmp_path):
    """eval_suites/c2i_eval.py on a tiny export: FID against real shapes, class accuracy with its s.e., speed;
    a reference .npz with mu / sigma (the ADM / MAR statistics format) is read as is."""
    import json as _json

    import numpy as np

    from eval_suites.c2i_eval import main as c2i_eval

    tiny_mar_export(tmp_path / "ck")
    common = ["--ckpt", str(tmp_path / "ck"), "--per-class", "2", "--classes", "3", "--threads", "1",
              "sampling.num_iter=2", "sampling.num_sampling_steps=3"]
    res = c2i_eval([*common, "--ref-n", "12", "--out", str(tmp_path / "r.json")])
    assert res["n"] == 6 and res["fid"] > 0 and 0 <= res["class_accuracy"] <= 1 and res["seconds_per_image"] > 0
    assert _json.loads((tmp_path / "r.json").read_text())["fid"] == res["fid"]
    feats = np.random.default_rng(0).normal(size=(300, 128))  # the shapes feature net is 128-d
    np.savez(tmp_path / "ref_stats.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    res2 = c2i_eval([*common, "--ref-stats", str(tmp_path / "ref_stats.npz"), "--out", str(tmp_path / "r2.json")])
    assert res2["reference"].endswith("ref_stats.npz") and "class_accuracy" not in res2
