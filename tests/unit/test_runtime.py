"""The Runtime is the only door to torch.distributed / DeepSpeed: a source scan proves nothing else imports them
(or calls the engines' module-level collectives), and a Runtime without a process group is a world of one."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# Scanned: the package (except engines/, the one layer allowed to) and every app around it.
SCANNED = [ROOT / "fastardiff_ds", ROOT / "launcher", ROOT / "eval_suites", ROOT / "data_pipelines"]
ALLOWED = ROOT / "fastardiff_ds" / "engines"
FORBIDDEN_MODULES = ("torch.distributed", "deepspeed")
# Collectives reached through `fastardiff_ds.engines` instead of a Runtime (E.barrier(), all_reduce(...)).
FORBIDDEN_CALLS = {"all_reduce", "all_gather_object", "barrier", "init_distributed", "broadcast_object"}


def _forbidden_module(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in FORBIDDEN_MODULES)


def violations(path: Path) -> list[str]:
    """'file:line what' for every import of torch.distributed / deepspeed and every module-level collective call
    imported from fastardiff_ds.engines in one source file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    engine_names = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and (node.module or "").split(".")[-1] == "engines" for a in node.names if a.name in FORBIDDEN_CALLS}
    found = []
    for node in ast.walk(tree):
        what = _what(node, engine_names)
        if what:
            found.append(f"{path.relative_to(ROOT) if ROOT in path.parents else path}:{node.lineno} {what}")
    return found


def _what(node: ast.AST, engine_names: set[str]) -> str | None:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names if _forbidden_module(a.name)]
        return f"import {names[0]}" if names else None
    if isinstance(node, ast.ImportFrom):
        mod = node.module or ""
        if _forbidden_module(mod):
            return f"from {mod} import ..."
        if mod == "torch" and any(a.name == "distributed" for a in node.names):
            return "from torch import distributed"
        return None
    if isinstance(node, ast.Attribute) and node.attr == "distributed" and getattr(node.value, "id", "") == "torch":
        return "torch.distributed"
    if isinstance(node, ast.Call):
        fn = node.func
        if isinstance(fn, ast.Attribute) and fn.attr in FORBIDDEN_CALLS and getattr(fn.value, "id", "") == "E":
            return f"E.{fn.attr}(...)"
        if isinstance(fn, ast.Name) and fn.id in engine_names:
            return f"{fn.id}(...) imported from fastardiff_ds.engines"
    return None


def test_no_distributed_imports_outside_engines():
    files = [p for d in SCANNED for p in d.rglob("*.py") if ALLOWED not in p.parents]
    assert len(files) > 50  # the scan sees the package, not an empty folder
    bad = [v for p in files for v in violations(p)]
    assert not bad, ("torch.distributed / deepspeed used outside fastardiff_ds/engines (go through "
                     "engines.Runtime):\n" + "\n".join(bad))


@pytest.mark.parametrize("source", [
    "import torch.distributed as dist\n", "from torch import distributed\n", "import deepspeed\n",
    "from deepspeed.accelerator import get_accelerator\n", "import torch\ntorch.distributed.barrier()\n",
    "from fastardiff_ds import engines as E\nE.all_reduce(x)\n", "from fastardiff_ds.engines import barrier\nbarrier()\n",
])
def test_the_scan_catches_each_kind(tmp_path, source):
    bad, clean = tmp_path / "bad.py", tmp_path / "clean.py"
    bad.write_text(source)
    clean.write_text("import torch\nfrom fastardiff_ds.engines import Runtime\nrt = Runtime()\nrt.barrier()\n")
    assert violations(bad), source
    assert violations(clean) == []


def test_runtime_alone_is_a_world_of_one():
    from fastardiff_ds.engines import Runtime

    rt = Runtime()
    assert (rt.rank, rt.world_size, rt.is_rank0, rt.initialized) == (0, 1, True, False)
    assert rt.comm_device() == torch.device("cpu")
    x = torch.tensor([1.0, 2.0])
    y = rt.all_reduce(x, "max")
    assert torch.equal(y, x) and y is not x and y.device == x.device
    assert rt.reduce_scalar(3, "min") == 3.0
    assert rt.all_finite(torch.ones(3)) and not rt.all_finite(torch.tensor([1.0, float("nan")]))
    assert rt.any_rank(True) and not rt.any_rank(False)
    assert rt.all_gather_object({"a": 1}) == [{"a": 1}] and rt.broadcast_object(5) == 5
    with pytest.raises(ValueError, match="all_reduce op='mean'"):
        rt.all_reduce(x, "mean")
    rt.barrier()
    rt.close()  # no process group: nothing to tear down


def test_ema_decay_warms_up_to_its_ceiling():
    from fastardiff_ds.engines import ema_decay

    assert ema_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_decay(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay(0.999, 100_000) == 0.999
