"""tests/gpu: need a CUDA device; every test here is marked `gpu` and skipped without one.

The root conftest points DeepSpeed at the CPU (DS_ACCELERATOR=cpu) for the rest of the suite; these tests start
their launchers with `_gpu.gpu_env()`, which points it at the GPU (and NCCL)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)

