"""DMD2's ingredients on the joint step (issue 25): the GAN term on the fake score's features, the backward
simulation switch, and the config rules that refuse impossible combinations."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fastardiff_ds.config import ConfigError, resolve_config
from fastardiff_ds.config.schema import HeadConfig
from fastardiff_ds.losses.gan import gan_discriminator_loss, gan_generator_loss
from fastardiff_ds.models.flow_head import FlowHead
from test_train_step import _batch, _setup


def _disc_head(seed=0, trained_logits=True):
    torch.manual_seed(seed)
    head = FlowHead(HeadConfig(width=16, depth=2), token_dim=4, cond_dim=8, discriminator=True)
    if trained_logits:  # a classifier that is not the init's constant 0
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return head


def test_a_fresh_classifier_says_one_half_and_a_plain_head_has_none():
    head = _disc_head(trained_logits=False)
    x, cond = torch.randn(5, 4), torch.randn(5, 8)
    assert torch.equal(head.discriminate(x, torch.rand(5), cond), torch.zeros(5))
    plain = FlowHead(HeadConfig(width=16, depth=2), token_dim=4, cond_dim=8)
    assert plain.cls_head is None
    with pytest.raises(ValueError, match="discriminator=True"):
        plain.discriminate(x, torch.rand(5), cond)
    # the trunk is the velocity's: discriminate and forward share every weight but the classifier's
    names = {n for n, _ in head.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert names and all(n.startswith("cls_head.") for n in names)


def test_generator_term_is_the_plain_autograd_gradient_and_spares_the_classifier():
    head = _disc_head()
    cond = torch.randn(6, 8)
    disc = lambda xx, tt: head.discriminate(xx, tt, cond)  # noqa: E731
    x = torch.randn(6, 4, requires_grad=True)
    loss, m = gan_generator_loss(disc, x, torch.Generator().manual_seed(5))
    loss.backward()
    # reference: the same draws (t per row, then eps), the loss differentiated end to end
    g = torch.Generator().manual_seed(5)
    t = torch.rand(6, generator=g) * 0.96 + 0.02
    eps = torch.randn(6, 4, generator=g)
    xr = x.detach().clone().requires_grad_(True)
    ref = F.softplus(-head.discriminate(t[:, None] * xr + (1 - t[:, None]) * eps, t, cond)).mean()
    (g_ref,) = torch.autograd.grad(ref, xr)
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-6) and m["gan/g_loss"] == pytest.approx(float(ref))
    torch.testing.assert_close(x.grad, g_ref)
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in head.parameters())  # the fake-score network takes no gradient from it


def test_discriminator_learns_data_from_student_tokens_and_trains_only_itself():
    head = _disc_head(trained_logits=False)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(64, 8, generator=gen)
    disc = lambda xx, tt: head.discriminate(xx, tt, cond)  # noqa: E731
    for _ in range(150):
        real = torch.randn(64, 4, generator=gen) * 0.3 + 0.8
        fake = (torch.randn(64, 4, generator=gen) * 0.3 - 0.8).requires_grad_(True)
        loss, m = gan_discriminator_loss(disc, real, fake, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert fake.grad is None  # detached: the classifier's loss never trains the student
    assert m["gan/d_real"] > 0.75 and m["gan/d_fake"] < 0.25, m
    assert m["gan/d_loss"] < 2 * F.softplus(torch.tensor(0.0)).item() - 0.4  # well below chance (2 log 2)


def _grads(engine):
    return torch.cat([p.grad.flatten() for p in engine.module.parameters() if p.grad is not None])


def test_joint_generator_step_adds_the_weighted_gan_gradient(tiny_cfg):
    """train.gan_weight: the student's gradient is the DMD gradient + weight x the GAN term's (the GAN draws come
    after DMD's), so it is affine in the weight; the fake-score engine's classifier is trained in the same step."""
    grads, metrics, cls_moved = {}, {}, {}
    for lam in (0.0, 1.0, 3.0):
        cfg = copy.deepcopy(tiny_cfg)
        cfg.train.gan_weight = lam
        cfg, step_fn, engines, _ = _setup(cfg)
        fake = engines["fake"].module.inner
        assert (fake.cls_head is not None) == (lam > 0)
        if lam > 0:  # a classifier past its init, so that its gradient wrt the samples is not 0
            for p in fake.cls_head.parameters():
                torch.nn.init.normal_(p, std=0.3)
        before = copy.deepcopy(fake.cls_head.state_dict()) if lam > 0 else {}
        student = engines["student"]
        student.step = lambda: None  # keep the gradient of this one generator step
        ids, mask, tokens = _batch(cfg)
        metrics[lam] = step_fn(ids, mask, tokens, 3, torch.Generator().manual_seed(0), stage="dmd")
        grads[lam] = _grads(student)
        cls_moved[lam] = any(not torch.equal(v, fake.cls_head.state_dict()[n]) for n, v in before.items())
    assert "gan/g_loss" not in metrics[0.0] and "gan/d_loss" not in metrics[0.0]
    assert metrics[1.0]["gan/g_loss"] > 0 and metrics[1.0]["gan/d_loss"] > 0
    assert metrics[1.0]["dmd/loss"] == pytest.approx(metrics[3.0]["dmd/loss"])
    g_gan = grads[1.0] - grads[0.0]
    assert g_gan.abs().sum() > 0
    torch.testing.assert_close(grads[3.0] - grads[0.0], 3.0 * g_gan, rtol=1e-4, atol=1e-7)
    assert cls_moved == {0.0: False, 1.0: True, 3.0: True}


@pytest.mark.parametrize("bsim", [True, False])
def test_backward_simulation_switch_reaches_the_generator(tiny_cfg, monkeypatch, bsim):
    import fastardiff_ds.training.joint as J

    seen = []
    real = J.few_step_generate

    def spy(*a, **kw):
        seen.append((kw["backward_simulation"], kw["data"]))
        return real(*a, **kw)

    monkeypatch.setattr(J, "few_step_generate", spy)
    cfg = copy.deepcopy(tiny_cfg)
    cfg.train.backward_simulation = bsim
    cfg, step_fn, _, _ = _setup(cfg)
    ids, mask, tokens = _batch(cfg)
    step_fn(ids, mask, tokens, 3, torch.Generator().manual_seed(0), stage="dmd")
    assert len(seen) == 1 and seen[0][0] is bsim
    torch.testing.assert_close(seen[0][1], tokens.reshape(-1, tokens.shape[-1]))  # data tokens, for bsim off


@pytest.mark.parametrize("overrides, key", [
    (["train.gan_weight=0.005", "train.cd_steps=60", "train.steps=60"], "train.gan_weight"),
    (["train.gan_weight=0.005", "train.gan_disc_weight=0"], "train.gan_disc_weight"),
    (["train.gan_weight=-1"], "train.gan_weight"),
    (["train.gen_every=0"], "train.gen_every"),  # a two-time-scale ratio below 1
])
def test_impossible_dmd2_combinations_are_config_errors_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config("tiny", overrides=overrides)
    assert resolve_config("tiny", overrides=["train.gan_weight=0.005"]).train.gan_weight == 0.005


def test_lr_disc_gives_the_classifier_its_own_lr_group():
    from fastardiff_ds.training.trainer import _specs

    cfg = resolve_config("tiny", overrides=["train.gan_weight=0.005", "train.lr_disc=0.001"])
    assert _specs(cfg)["fake"][0].lr_groups == (("inner.cls_head.", 0.001),)
    assert _specs(resolve_config("tiny", overrides=["train.gan_weight=0.005"]))["fake"][0].lr_groups == ()
    assert _specs(resolve_config("tiny", overrides=["train.lr_disc=0.001"]))["fake"][0].lr_groups == ()  # no GAN
