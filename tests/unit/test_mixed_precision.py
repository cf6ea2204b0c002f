"""NextStep-1's precision recipe in the DeepSpeed dicts (bf16, fp32 gradient accumulation), the AR networks'
activation checkpointing, and how Eq. 9's alpha is split between losses and learning rates."""
from __future__ import annotations

import pytest
import torch

from fastardiff_ds.engines import load_ds_config, train_ds_config
from fastardiff_ds.schedules.alpha import ENGINE_TERM, eq9_weights


def _resolve(base, **kw):
    return train_ds_config(base, micro_batch=1, grad_accum=2, world_size=1, device_type="cpu", **kw)


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_shipped_configs_accumulate_bf16_gradients_in_fp32(name):
    base = load_ds_config(name)
    assert base["data_types"] == {"grad_accum_dtype": "fp32"}
    base["bf16"]["enabled"] = True  # what "auto" resolves to on a bf16 GPU
    cfg = _resolve(base)
    assert cfg["bf16"]["enabled"] is True and cfg["data_types"]["grad_accum_dtype"] == "fp32"


def test_bf16_defaults_to_fp32_accumulation_and_keeps_an_explicit_choice():
    cfg = _resolve({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}})
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    explicit = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 0},
                "data_types": {"grad_accum_dtype": "bf16"}}
    assert _resolve(explicit)["data_types"] == {"grad_accum_dtype": "bf16"}
    assert "data_types" not in _resolve({"zero_optimization": {"stage": 0}})  # fp32 run: nothing to add


def test_bf16_fp32_accumulation_at_zero_stage_0_is_refused_by_name():
    # DeepSpeed 0.19.8 raises NotImplementedError("unsupported mix ...") for this at initialize
    with pytest.raises(ValueError, match=r"ZeRO stage >= 1.*zero2.json"):
        _resolve(load_ds_config("zero3") | {"bf16": {"enabled": True}}, zero_stage=0)


def _ar_grads(cfg, checkpointing: bool):
    from fastardiff_ds.models import DraftAR

    torch.manual_seed(0)
    draft = DraftAR(cfg.model).train().activation_checkpointing(checkpointing)
    calls = []
    for layer in draft.layers:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))  # recompute may stop early: count entries
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 300, (2, 6), generator=g)
    tokens = torch.randn(2, cfg.model.image.num_tokens, cfg.model.image.token_dim, generator=g)
    out = draft.forward_train(ids, torch.ones_like(ids), tokens, explicit_layer=draft.entropy_layer)
    loss = out.hidden.pow(2).mean() + out.entropy.mean()  # the entropy term needs the explicit layer's probs
    loss.backward()
    return {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}, len(calls)


def test_activation_checkpointing_recomputes_layers_with_the_same_gradients(tiny_cfg):
    plain, n_plain = _ar_grads(tiny_cfg, False)
    ckpt, n_ckpt = _ar_grads(tiny_cfg, True)
    layers = tiny_cfg.model.draft.num_layers
    assert n_plain == layers and n_ckpt == 2 * layers  # each layer runs again in backward
    assert plain.keys() == ckpt.keys()
    err = max(float((plain[n] - ckpt[n]).abs().max()) for n in plain)
    print(f"[activation checkpointing] layer forwards {n_plain} -> {n_ckpt}, max grad diff {err:.1e}")
    assert err < 1e-6


@pytest.mark.parametrize("a", [0.95, 0.3, 0.05])
def test_eq9_weights_both_modes_give_eq9s_weight_per_engine(a):
    want = {"ar": a, "dist": 1 - a}
    for mode in ("lr", "loss"):
        w = eq9_weights(a, mode)
        for engine, term in ENGINE_TERM.items():  # SGD: lr factor x loss factor = Eq. 9's weight of the term
            assert w.lr[engine] * w.loss[term] == pytest.approx(want[term])
    assert eq9_weights(a, "lr").loss == {"ar": 1.0, "dist": 1.0}
    assert eq9_weights(a, "loss").lr == {"draft": 1.0, "student": 1.0, "target": 1.0}


def test_unknown_alpha_mode_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"train.alpha_mode='lrr'.*\('lr', 'loss'\)"):
        eq9_weights(0.5, "lrr")
