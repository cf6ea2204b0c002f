"""Pickles only from files the run wrote: a planted or swapped pickle in a checkpoint is refused, never run.

Each malicious file here writes a marker when unpickled (``__reduce__`` -> ``exec``): it is put into a
checkpoint whose manifest does not match it, whose manifest has no checksums, or which was verified before the
swap, and loaded via resume, a direct ``load_checkpoint`` (same world size: client files; another world size:
the ZeRO files the re-split reads) and ``load_resharded``. A source scan keeps ``trusted.load_verified`` the only
``weights_only=False`` in the library."""
from __future__ import annotations

import ast
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastardiff_ds.engines.checkpoint import capture_rng_state, load_checkpoint, resolve_resume
from fastardiff_ds.engines.manifest import hash_files, write_manifest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = [ROOT / d for d in ("fastardiff_ds", "launcher", "eval_suites", "data_pipelines", "scripts")]
ALLOWED = ("fastardiff_ds/engines/trusted.py", "load_verified")  # the one function that may unpickle fully
OPTIM, MODEL = "zero_pp_rank_{}_mp_rank_00_optim_states.pt", "zero_pp_rank_{}_mp_rank_00_model_states.pt"


class Boom:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pickle ran')",)


def _ckpt(root: Path, world: int = 1, step: int = 3, manifest: str = "checksums") -> Path:
    """A checkpoint of one engine ('draft') written by ``world`` ranks, as the saver lays it out."""
    d = root / f"step_{step:06d}"
    (d / "draft").mkdir(parents=True)
    (d / "client").mkdir()
    for r in range(world):
        torch.save({"optimizer_state_dict": {"fp32_flat_groups": [torch.randn(8)]}}, d / "draft" / OPTIM.format(r))
        torch.save({"param_shapes": [{"w": torch.Size([4])}]}, d / "draft" / MODEL.format(r))
        torch.save({"client_state": {"step": step, "rank": r}, "rng": capture_rng_state()},
                   d / "client" / f"rank_{r:05d}.pt")
    meta = {"step": step, "engines": ["draft"], "modules": [], "world_size": world}
    if manifest == "checksums":
        write_manifest(d, meta, hash_files(d))
    elif manifest == "legacy":
        (d / "manifest.json").write_text(json.dumps(meta))  # format 1: no checksums
    return d


def _plant(path: Path, marker: Path) -> None:
    torch.save({"client_state": Boom(marker), "optimizer_state_dict": Boom(marker)}, path)


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "pickle_ran"
    yield m
    assert not m.exists(), "a planted pickle was unpickled: its code ran"


@pytest.fixture
def one_rank(monkeypatch):
    """torch.distributed answers as a world of one (the re-split asks its optimizer's group)."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)


def _engine() -> SimpleNamespace:
    """A ZeRO-3 engine as far as the re-split looks before it reads files."""
    ds = SimpleNamespace(zero_optimization_stage=lambda: 3, zero_nvme_offload_optimizer=lambda: False,
                         optimizer=SimpleNamespace(dp_process_group=None))
    return SimpleNamespace(name="draft", ds=ds)


@pytest.mark.parametrize("manifest", ["checksums", "legacy"])
def test_a_planted_client_file_is_refused_by_a_direct_load(tmp_path, marker, manifest):
    ckpt = _ckpt(tmp_path, manifest=manifest)
    victim = ckpt / "client" / "rank_00000.pt"
    _plant(victim, marker)
    with pytest.raises(FileNotFoundError) as err:
        load_checkpoint(ckpt, {})
    msg = str(err.value)
    assert type(err.value).__name__ == "UntrustedCheckpoint" and str(ckpt) in msg
    if manifest == "checksums":
        assert f"{victim}: " in msg and "the manifest says" in msg and "resume=none" in msg
    else:
        assert "no checksums" in msg and f"python -m fastardiff_ds.engines.trusted {ckpt}" in msg


def test_a_resplit_of_a_checkpoint_without_a_manifest_is_refused_before_unpickling(tmp_path, marker, one_rank):
    """load_checkpoint stops at the missing manifest; a direct re-split must refuse on its own."""
    from fastardiff_ds.engines.reshard import load_resharded

    ckpt = _ckpt(tmp_path, world=2, manifest="none")
    _plant(ckpt / "draft" / OPTIM.format(0), marker)
    with pytest.raises(FileNotFoundError, match=r"manifest.json is unreadable.*not loaded"):
        load_resharded(_engine(), ckpt / "draft", 2)


def test_a_file_swapped_after_resume_verified_the_checkpoint_is_refused(tmp_path, marker):
    ckpt = _ckpt(tmp_path)
    assert resolve_resume(tmp_path, "auto") == ckpt  # verified (deep) in this process
    victim = ckpt / "client" / "rank_00000.pt"
    _plant(victim, marker)
    with pytest.raises(FileNotFoundError, match=rf"{victim} changed after checkpoint .* was verified"):
        load_checkpoint(ckpt, {})
    with pytest.raises(FileNotFoundError, match="no intact checkpoint"):  # a fresh resume sees the mismatch
        resolve_resume(tmp_path, "auto")


def test_a_planted_zero_file_is_refused_by_the_resplit(tmp_path, marker, one_rank):
    ckpt = _ckpt(tmp_path, world=2)
    victim = ckpt / "draft" / OPTIM.format(0)
    _plant(victim, marker)
    with pytest.raises(FileNotFoundError, match=rf"{victim}: .*the manifest says"):
        load_checkpoint(ckpt, {"draft": _engine()})  # saved on 2 ranks, loaded on 1: the re-split path
    from fastardiff_ds.engines.reshard import load_resharded

    with pytest.raises(FileNotFoundError, match=rf"{victim}: .*the manifest says"):
        load_resharded(_engine(), ckpt / "draft", 2)


def test_a_zero_file_the_manifest_does_not_list_is_refused(tmp_path, marker, one_rank):
    ckpt = _ckpt(tmp_path, world=1)
    from fastardiff_ds.engines.reshard import load_resharded

    planted = ckpt / "draft" / OPTIM.format(1)  # a second rank's file, added after the save
    _plant(planted, marker)
    torch.save({}, ckpt / "draft" / MODEL.format(1))
    with pytest.raises(FileNotFoundError, match=rf"does not list .*{planted}"):
        load_resharded(_engine(), ckpt / "draft", 2)


def test_an_intact_client_file_loads_without_full_unpickling(tmp_path, monkeypatch):
    """The RNG state (numpy arrays) loads with weights_only=True; nothing falls back to the verified unpickler."""
    from fastardiff_ds.engines import trusted

    ckpt = _ckpt(tmp_path)
    monkeypatch.setattr(trusted, "load_verified", lambda *a, **k: pytest.fail("full unpickling was used"))
    saved = torch.load(ckpt / "client" / "rank_00000.pt", weights_only=False)
    random.random(), np.random.rand(), torch.rand(1)
    client = load_checkpoint(ckpt, {})
    assert client == {"step": 3, "rank": 0}
    assert random.getstate() == saved["rng"]["python"] and torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
    assert np.array_equal(np.random.get_state()[1], saved["rng"]["numpy"][1])


# -- the source scan -------------------------------------------------------------------------------------------
def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _call_name(call: ast.Call) -> str:
    f = call.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return f"{f.value.id}.{f.attr}"
    return f.id if isinstance(f, ast.Name) else ""


def _problem(call: ast.Call, torch_load_names: set[str]) -> str | None:
    name, weights_only = _call_name(call), _kw(call, "weights_only")
    if weights_only is not None and not _is_true(weights_only):
        return f"{name}(weights_only={ast.unparse(weights_only)})"
    if (name == "torch.load" or name in torch_load_names) and not _is_true(weights_only):
        return f"{name}() without weights_only=True"
    if name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads"):
        return f"{name}()"
    if _is_true(_kw(call, "allow_pickle")):
        return f"{name}(allow_pickle=True)"
    return None


def violations(source: str, rel: str) -> list[str]:
    tree = ast.parse(source, filename=rel)
    torch_load_names = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                        and n.module == "torch" for a in n.names if a.name == "load"}
    allowed = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and (rel, f.name) == ALLOWED
               for n in ast.walk(f)}
    return [f"{rel}:{n.lineno} {p}" for n in ast.walk(tree) if isinstance(n, ast.Call) and id(n) not in allowed
            and (p := _problem(n, torch_load_names))]


CAUGHT = ["import torch\ntorch.load(p)\n", "import torch\ntorch.load(p, weights_only=False)\n",
          "from torch import load\nload(p)\n", "from torch import load as L\nL(p, weights_only=flag)\n",
          "import pickle\npickle.loads(b)\n", "import numpy as np\nnp.load(p, allow_pickle=True)\n",
          "def load_verified(p):\n    import torch\n    return torch.load(p, weights_only=False)\n"]


def test_only_the_verified_loader_unpickles_fully():
    for source in CAUGHT:  # the scan sees each kind, and exempts only the one function of trusted.py
        assert violations(source, "fastardiff_ds/other.py"), source
    assert violations(CAUGHT[-1], ALLOWED[0]) == []
    assert violations("import torch\nx = torch.load(p, map_location='cpu', weights_only=True)\n", "x.py") == []
    files = [p for d in SCANNED for p in d.rglob("*.py")]
    assert len(files) > 50  # the scan sees the library, not an empty folder
    bad = [v for p in files for v in violations(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert not bad, ("full unpickling outside fastardiff_ds/engines/trusted.py::load_verified (load with "
                     "weights_only=True, or a checkpoint's files through trusted.load_verified):\n" + "\n".join(bad))
    assert "weights_only=False" in (ROOT / ALLOWED[0]).read_text()  # the exempt function exists


def test_checksums_added_to_a_format_1_checkpoint_make_it_loadable(tmp_path, capsys):
    """The fix the format-1 refusal names: `python -m fastardiff_ds.engines.trusted DIR`, then it loads."""
    from fastardiff_ds.engines.trusted import main

    ckpt = _ckpt(tmp_path, manifest="legacy")
    with pytest.raises(FileNotFoundError, match="no checksums"):
        load_checkpoint(ckpt, {})
    main([str(ckpt)])
    assert json.loads(capsys.readouterr().out) == {"checkpoint": str(ckpt), "checksums_added": True}
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["world_size"] == 1 and "client/rank_00000.pt" in manifest["files"]
    assert load_checkpoint(ckpt, {}) == {"step": 3, "rank": 0}
    main([str(ckpt)])
    assert json.loads(capsys.readouterr().out)["checksums_added"] is False
