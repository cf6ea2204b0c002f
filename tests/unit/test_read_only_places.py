"""Read-only places: a VAE folder + home/cache that refuse writes convert in memory with one warning naming the
setting that moves the cache; a read-only run_dir is one error line naming run_dir and the fix. Each fault runs
twice: truly read-only (a read-only bind mount as root, chmod otherwise; skipped where neither works) and injected
(runs everywhere)."""
from __future__ import annotations

import errno
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from fastardiff_ds.models import vae_cache
from fastardiff_ds.models.image_tokenizers import load_vae
from nextstep_vae_fixture import write_official_vae_folder
from readonly_dirs import read_only

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launcher"))
import _common  # noqa: E402


def _load_warning_free_of_tracebacks(folder: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vae = load_vae(folder)
    mine = [str(w.message) for w in caught if "could not cache" in str(w.message)]
    return vae, mine


def _assert_in_memory(vae, messages, reference):
    assert len(messages) == 1, messages
    assert "XDG_CACHE_HOME" in messages[0] and "from memory" in messages[0]
    for k, v in reference.state_dict().items():
        assert torch.equal(v, vae.state_dict()[k]), k


def test_truly_read_only_vae_folder_and_cache_convert_in_memory(tmp_path, monkeypatch):
    folder, _ = write_official_vae_folder(tmp_path / "vae" / "NextStep-1-f8ch16-Tokenizer")
    reference = load_vae(folder, cache_dir=tmp_path / "writable")  # writes beside checkpoint.pt
    (folder / vae_cache.CACHE_NAME).unlink()
    (tmp_path / "cache").mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with read_only(folder), read_only(tmp_path / "cache"):
        vae, messages = _load_warning_free_of_tracebacks(folder)
    _assert_in_memory(vae, messages, reference)
    assert not (folder / vae_cache.CACHE_NAME).exists() and not any((tmp_path / "cache").iterdir())


def test_injected_read_only_everywhere_converts_in_memory(tmp_path, monkeypatch):
    folder, _ = write_official_vae_folder(tmp_path / "NextStep-1-f8ch16-Tokenizer")
    reference = load_vae(folder, cache_dir=tmp_path / "writable")
    (folder / vae_cache.CACHE_NAME).unlink()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def erofs(path, state, meta):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(vae_cache, "write_atomic", erofs)
    _assert_in_memory(*_load_warning_free_of_tracebacks(folder), reference)


def test_no_home_at_all_converts_in_memory(tmp_path, monkeypatch):
    """No HOME and no passwd entry: `~` cannot be expanded (Path.home raises RuntimeError); not a traceback."""
    folder, _ = write_official_vae_folder(tmp_path / "NextStep-1-f8ch16-Tokenizer")
    reference = load_vae(folder, cache_dir=tmp_path / "writable")
    (folder / vae_cache.CACHE_NAME).unlink()
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    real_write = vae_cache.write_atomic

    def folder_read_only(path, state, meta):
        if path.parent == folder.resolve():
            raise PermissionError(errno.EACCES, "Permission denied")
        real_write(path, state, meta)

    monkeypatch.setattr(vae_cache, "write_atomic", folder_read_only)
    _assert_in_memory(*_load_warning_free_of_tracebacks(folder), reference)


class _Rt:
    """One rank without a process group: what claim_run_dir needs of a Runtime."""
    rank, is_rank0 = 0, True

    @staticmethod
    def all_gather_object(obj):
        return [obj]


def _assert_one_line_naming_run_dir(exc, run_dir):
    msg = str(exc.value)
    assert msg.startswith(f"error: run_dir {run_dir} is not writable") and "\n" not in msg
    assert "run_dir=PATH" in msg


def test_truly_read_only_run_dir_is_refused(tmp_path):
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    cfg = type("Cfg", (), {"run_dir": str(run_dir / "r1")})()
    with read_only(run_dir):
        with pytest.raises(SystemExit) as exc:
            _common.claim_run_dir(cfg, _Rt())
    _assert_one_line_naming_run_dir(exc, run_dir / "r1")


def test_injected_read_only_run_dir_is_refused(tmp_path, monkeypatch):
    cfg = type("Cfg", (), {"run_dir": str(tmp_path / "r1")})()

    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", erofs)
    with pytest.raises(SystemExit) as exc:
        _common.claim_run_dir(cfg, _Rt())
    _assert_one_line_naming_run_dir(exc, tmp_path / "r1")
    assert "Read-only file system" in str(exc.value)
    assert not (tmp_path / "r1" / "run.lock").exists()  # no lock taken for a run that cannot start
