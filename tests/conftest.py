"""Shared fixtures: tiny models built from the `tiny` preset, shrunk further where a test only needs shapes."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture
def tiny_cfg():
    from fastardiff_ds.config import get_preset

    cfg = get_preset("tiny")
    cfg.model.ar.hidden_size, cfg.model.ar.intermediate_size = 64, 128
    cfg.model.ar.num_layers, cfg.model.draft.num_layers = 3, 2
    cfg.model.head.width, cfg.model.head.depth = 32, 2
    return cfg


@pytest.fixture
def tiny_models(tiny_cfg):
    from fastardiff_ds.models import build_draft, build_head, build_target

    torch.manual_seed(0)
    target = build_target(tiny_cfg).eval()
    head = build_head(tiny_cfg).eval()
    return tiny_cfg, target, build_draft(tiny_cfg, target).eval(), head
