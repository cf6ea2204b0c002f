"""Checkpoint manifests without processes: checksums written last, verification, fallback to the newest intact
checkpoint with a warning naming the bad file, a clear error when none is intact, pre-manifest checkpoints.

Fixture checkpoints are written the way DeepSpeed and our saver write them (``torch.save`` zip archives,
safetensors), by this file, not by ``save_checkpoint`` (which needs DeepSpeed engines; the 2-rank round trip
is tests/distributed/test_checkpoint_resume.py)."""
from __future__ import annotations

import json

import pytest
import torch

from fastardiff_ds.engines.checkpoint import latest_intact, resolve_resume
from fastardiff_ds.engines.manifest import hash_files, list_files, verify, write_manifest


def fake_ckpt(root, step: int, manifest: bool = True, legacy: bool = False):
    d = root / f"step_{step:06d}"
    (d / "draft").mkdir(parents=True)
    (d / "client").mkdir()
    torch.save({"optimizer_state_dict": {"fp32_flat_groups": [torch.randn(5000)]}},
               d / "draft" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"client_state": {"step": step}}, d / "client" / "rank_00000.pt")
    from safetensors.torch import save_file

    (d / "modules").mkdir()
    save_file({"w": torch.randn(64, 64)}, str(d / "modules" / "ema.safetensors"))
    meta = {"step": step, "engines": ["draft"], "modules": ["ema"], "world_size": 1}
    if manifest and legacy:
        (d / "manifest.json").write_text(json.dumps(meta))  # format 1: no per-file entries
    elif manifest:
        write_manifest(d, meta, hash_files(d))
    return d


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_manifest_covers_every_file_and_a_clean_checkpoint_verifies(tmp_path):
    d = fake_ckpt(tmp_path, 1)
    m = json.loads((d / "manifest.json").read_text())
    assert m["format"] == "fastardiff-ds-checkpoint" and m["version"] == 2 and m["hash"] == "xxh3_128"
    assert set(m["files"]) == set(list_files(d)) == {"draft/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                     "client/rank_00000.pt", "modules/ema.safetensors"}
    assert all(len(e["xxh3_128"]) == 32 and e["size"] > 0 for e in m["files"].values())
    assert verify(d) == []


def test_truncated_latest_falls_back_with_a_warning_naming_the_file(tmp_path, caplog):
    good, bad = fake_ckpt(tmp_path, 1), fake_ckpt(tmp_path, 2)
    (tmp_path / "latest").write_text(bad.name)
    victim = bad / "draft" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    truncate(victim)
    with caplog.at_level("WARNING"):
        assert resolve_resume(tmp_path, "auto") == good
    assert str(victim) in caplog.text and "truncated" in caplog.text
    with pytest.raises(FileNotFoundError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt.*manifest says"):
        resolve_resume(tmp_path, bad.name)  # asked for by name: an error, never a silent substitute


def test_flipped_byte_is_a_checksum_mismatch(tmp_path):
    d = fake_ckpt(tmp_path, 1)
    victim = d / "modules" / "ema.safetensors"
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0x40
    victim.write_bytes(bytes(data))
    assert verify(d, deep=False) == []  # same size
    problems = verify(d)
    assert len(problems) == 1 and "ema.safetensors" in problems[0] and "checksum" in problems[0]


def test_missing_file_and_interrupted_save_are_skipped(tmp_path, caplog):
    good = fake_ckpt(tmp_path, 1)
    gone = fake_ckpt(tmp_path, 2)
    (gone / "client" / "rank_00000.pt").unlink()
    fake_ckpt(tmp_path, 3, manifest=False)  # a save that died before its manifest
    with caplog.at_level("WARNING"):
        assert latest_intact(tmp_path) == good
    assert "rank_00000.pt: missing" in caplog.text and "step_000003 is incomplete" in caplog.text


def test_no_intact_checkpoint_is_a_clear_error_naming_the_folder_and_the_fix(tmp_path):
    truncate(fake_ckpt(tmp_path, 1) / "client" / "rank_00000.pt")
    with pytest.raises(FileNotFoundError) as err:
        resolve_resume(tmp_path, "auto")
    msg = str(err.value)
    assert f"no intact checkpoint in {tmp_path}" in msg and "rank_00000.pt" in msg and "resume=none" in msg
    assert latest_intact(tmp_path / "empty") is None  # nothing at all: a fresh run


def test_pre_manifest_checkpoint_is_accepted_after_a_structural_check(tmp_path, caplog):
    old = fake_ckpt(tmp_path, 1, legacy=True)
    with caplog.at_level("WARNING"):
        assert latest_intact(tmp_path) == old
    assert "predates checksummed manifests" in caplog.text
    newer = fake_ckpt(tmp_path, 2, legacy=True)
    truncate(newer / "draft" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")  # the PytorchStreamReader case
    truncate(newer / "modules" / "ema.safetensors")
    problems = verify(newer)
    assert len(problems) == 2 and "central directory" in problems[0] and "safetensors" in problems[1]
    assert latest_intact(tmp_path) == old
