"""Consistency distillation and DMD on toys whose velocity fields are known in closed form.

Data N(mu, s²·I) under x_t = t·x + (1 − t)·ε has marginal N(t·mu, σ_t²·I), σ_t² = t²s² + (1 − t)²,
exact velocity v(x, t) = mu + (t·s² − (1 − t))/σ_t² · (x − t·mu) and ODE flow map to t = 1
Φ(x, t) = mu + (s/σ_t)·(x − t·mu). s = 0 is a point mass (straight trajectories, Φ = mu).
"""

import pytest
import torch

from fastardiff_ds.losses import (
    ConsistencyConfig,
    DMDConfig,
    consistency_distillation_loss,
    dmd_fake_score_loss,
    dmd_generator_loss,
    few_step_generate,
    pseudo_huber,
)
from fastardiff_ds.schedules import time_grid


def gaussian_velocity(mu, s):
    def v(x, t):
        t = t.to(x.dtype)[:, None]
        var = t**2 * s**2 + (1 - t) ** 2
        return mu + (t * s**2 - (1 - t)) / var * (x - t * mu)

    return v


def flow_map_head(mu_of_w, s):
    """Exact consistency function as a velocity head: v = (Φ(x, t) − x)/(1 − t); mean depends on w."""

    def head(x, t, cond, w=None):
        mu = mu_of_w(w)
        t_ = t.to(x.dtype)[:, None]
        phi = mu + s / (t_**2 * s**2 + (1 - t_) ** 2).sqrt() * (x - t_ * mu)
        return (phi - x) / (1 - t_)

    return head


MU_C, MU_U = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 0.5, 0.0])


def guided_mean(w):
    """CFG of two point masses is the point mass at mu_u + w(mu_c − mu_u)."""
    return MU_U + w[:, None] * (MU_C - MU_U)


def guided_teacher(x, t, w):
    v_c, v_u = gaussian_velocity(MU_C, 0.0)(x, t), gaussian_velocity(MU_U, 0.0)(x, t)
    return v_u + w[:, None] * (v_c - v_u)


def test_pseudo_huber_values():
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([3.0, 0.0])
    assert pseudo_huber(a, b, 4.0).tolist() == pytest.approx([1.0, 0.0])  # √(9 + 16) − 4


def test_cd_zero_for_exact_consistency_function_on_straight_flow():
    # point masses have straight trajectories: a single large teacher step is exact, so CD is 0
    n = 256
    tokens, cond = MU_C.expand(n, 3).clone(), torch.zeros(n, 1)
    exact = flow_map_head(guided_mean, 0.0)
    cfg = ConsistencyConfig(delta=0.2, t_max=0.8, guidance_min=1.0, guidance_max=6.0)
    loss, m = consistency_distillation_loss(exact, exact, guided_teacher, tokens, cond, torch.Generator().manual_seed(0), config=cfg)
    assert loss.item() < 1e-6 and m["cd/w_mean"] == pytest.approx(3.5, abs=0.3)


def test_cd_with_cfg_needs_the_guided_consistency_function():
    # CFG of N(mu_c, s²) and N(mu_u, s²) is exactly the flow of N(mu_u + w(mu_c − mu_u), s²)
    s, n = 0.5, 512
    teacher = lambda x, t, w: gaussian_velocity(MU_U, s)(x, t) + w[:, None] * (  # noqa: E731
        gaussian_velocity(MU_C, s)(x, t) - gaussian_velocity(MU_U, s)(x, t)
    )
    tokens = MU_C + s * torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond = torch.zeros(n, 1, dtype=torch.float64)
    cfg = ConsistencyConfig(delta=1e-3, t_max=0.999, guidance_min=1.0, guidance_max=6.0)
    exact = flow_map_head(guided_mean, s)
    loss, _ = consistency_distillation_loss(exact, exact, teacher, tokens, cond, torch.Generator().manual_seed(0), config=cfg)
    assert loss.item() < 1e-7
    # a student that ignores w (the unguided conditional flow) drifts along the guided trajectory
    blind = flow_map_head(lambda w: MU_C, s)
    bad, _ = consistency_distillation_loss(blind, blind, teacher, tokens, cond, torch.Generator().manual_seed(0), config=cfg)
    assert bad.item() > 1e-5


def test_cd_near_zero_on_gaussian_flow_and_positive_for_non_consistent_student():
    mu, s, n = torch.tensor([0.5, -1.0]), 0.6, 512
    data = mu + s * torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond = torch.zeros(n, 1, dtype=torch.float64)
    teacher = lambda x, t, w: gaussian_velocity(mu, s)(x, t)  # noqa: E731
    cfg = ConsistencyConfig(delta=1e-3, t_max=0.999, guidance_min=1.0, guidance_max=1.0)
    exact = flow_map_head(lambda w: mu, s)
    loss, _ = consistency_distillation_loss(exact, exact, teacher, data, cond, torch.Generator().manual_seed(2), config=cfg)
    # the teacher's Euler step leaves the trajectory by O(Δ²) ≈ 1e-6 ≪ c: loss ≈ d²/2c ~ 1e-9
    assert loss.item() < 1e-7
    velocity_student = lambda x, t, c, w=None: teacher(x, t, w)  # noqa: E731  (curved flow: f ≠ Φ)
    bad, _ = consistency_distillation_loss(
        velocity_student, velocity_student, teacher, data, cond, torch.Generator().manual_seed(2), config=cfg
    )
    assert bad.item() > 100 * max(loss.item(), 1e-9)


def test_cd_gradients_only_reach_the_student_and_w_is_shared():
    torch.manual_seed(0)
    nets = {k: torch.nn.Linear(3 + 1 + 2 + 1, 3) for k in ("student", "target", "teacher")}
    seen = {}

    def make(name):
        def head(x, t, cond, w):
            seen[name] = w.clone()
            return nets[name](torch.cat([x, t[:, None], cond, w[:, None]], dim=-1))

        return head

    teacher = lambda x, t, w: make("teacher")(x, t, torch.zeros(x.shape[0], 2), w)  # noqa: E731
    tokens, cond = torch.randn(8, 3), torch.randn(8, 2, requires_grad=True)
    cfg = ConsistencyConfig(guidance_min=2.0, guidance_max=5.0)
    loss, _ = consistency_distillation_loss(make("student"), make("target"), teacher, tokens, cond, torch.Generator().manual_seed(4), config=cfg)
    loss.backward()
    assert nets["student"].weight.grad.abs().sum() > 0 and cond.grad.abs().sum() > 0
    assert nets["target"].weight.grad is None and nets["teacher"].weight.grad is None
    assert torch.equal(seen["student"], seen["teacher"]) and torch.equal(seen["student"], seen["target"])
    assert seen["student"].min() >= 2.0 and seen["student"].max() <= 5.0
    fixed = torch.full((8,), 3.0)
    consistency_distillation_loss(make("student"), make("target"), teacher, tokens, cond, None, config=cfg, guidance=fixed)
    assert torch.equal(seen["teacher"], fixed)
    with pytest.raises(ValueError, match="t_max"):
        ConsistencyConfig(delta=0.1, t_max=1.0)
    with pytest.raises(ValueError, match="solver_steps"):
        ConsistencyConfig(solver_steps=0)


def test_dmd_gradient_value_and_fixed_point():
    mu_r, mu_g = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.0])
    x = (mu_g + 0.8 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0))).requires_grad_()
    real, fake = gaussian_velocity(mu_r, 1.0), gaussian_velocity(mu_g, 0.8)
    loss, m = dmd_generator_loss(x, real, fake, torch.Generator().manual_seed(1))
    loss.backward()
    # replay the draws (t, then ε') and check ∂L/∂x = grad / numel, grad = (x̂_fake − x̂_real)/mean|x − x̂_real|
    g = torch.Generator().manual_seed(1)
    t = 0.02 + 0.96 * torch.rand(64, generator=g)
    x_t = t[:, None] * x.detach() + (1 - t[:, None]) * torch.randn(64, 2, generator=g)
    x_real = x_t + (1 - t[:, None]) * real(x_t, t)
    x_fake = x_t + (1 - t[:, None]) * fake(x_t, t)
    grad = (x_fake - x_real) / (x.detach() - x_real).abs().mean(-1, keepdim=True)
    assert torch.allclose(x.grad * x.numel(), grad, atol=1e-5)
    assert loss.item() == pytest.approx(0.5 * grad.pow(2).mean().item(), rel=1e-5)
    x.grad = None
    same, _ = dmd_generator_loss(x, real, real, torch.Generator().manual_seed(1))  # fake = real: no signal
    same.backward()
    assert same.item() == 0.0 and x.grad.abs().max() == 0.0


@pytest.mark.parametrize("shape, lr, steps", [((256, 16, 2), 0.2, 40), ((1024, 16), 0.1, 80)])
def test_dmd_moves_student_samples_to_the_real_distribution(shape, lr, steps):
    """Fake score = exact score of the current student samples (refit each step): descending L_G
    must pull the samples' mean and spread to the real N(mu_r, s_r²). (B, L, D) normalises per
    image, (N, D) per token. (Per token with D = 2 diverges: mean|x − x̂_real| over two numbers
    is near 0 for some samples, and those get huge steps — hence per-image normalisation.)"""
    d = shape[-1]
    mu_r, s_r = torch.tensor([2.0, -1.0]).repeat(d // 2).double(), 0.5
    x = 1.5 * torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x.requires_grad_()
        flat = x.detach().reshape(-1, d)
        loss, _ = dmd_generator_loss(x, gaussian_velocity(mu_r, s_r), gaussian_velocity(flat.mean(0), flat.std(0)), g)
        loss.backward()
        x = (x - lr * x.numel() * x.grad).detach()  # plain descent on the per-sample DMD gradient
    flat = x.reshape(-1, d)
    assert (flat.mean(0) - mu_r).norm().item() < 0.05
    assert torch.allclose(flat.std(0), torch.full((d,), s_r, dtype=torch.float64), atol=0.04)


def test_dmd_per_image_normaliser_ignores_masked_tokens():
    real, fake = gaussian_velocity(torch.tensor([1.0, 0.0]), 0.5), gaussian_velocity(torch.zeros(2), 1.0)
    x = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    grads = []
    for junk in (0.0, 100.0):
        xx = torch.where(mask[..., None], x, torch.full_like(x, junk)).requires_grad_()
        loss, _ = dmd_generator_loss(xx, real, fake, torch.Generator().manual_seed(2), mask)
        loss.backward()
        grads.append(xx.grad)
    assert torch.allclose(grads[0], grads[1]) and grads[0][~mask].abs().max() == 0
    # (N, D) is the L = 1 case of (B, L, D)
    flat = x[:, 0]
    a, _ = dmd_generator_loss(flat, real, fake, torch.Generator().manual_seed(3))
    b, _ = dmd_generator_loss(flat[:, None], real, fake, torch.Generator().manual_seed(3))
    assert a.item() == pytest.approx(b.item())


def test_fake_score_loss_trains_only_the_fake_head():
    torch.manual_seed(0)
    student_net, fake_net, ar = torch.nn.Linear(2, 2), torch.nn.Linear(2 + 1 + 3, 2), torch.nn.Linear(3, 3)
    cond = ar(torch.randn(16, 3))
    samples = student_net(torch.randn(16, 2))
    fake_head = lambda x, t, c, w=None: fake_net(torch.cat([x, t[:, None], c], -1))  # noqa: E731
    loss, m = dmd_fake_score_loss(fake_head, samples, cond, torch.Generator().manual_seed(0))
    loss.backward()
    assert fake_net.weight.grad.abs().sum() > 0 and "fake/loss" in m
    assert student_net.weight.grad is None and ar.weight.grad is None
    mu = torch.tensor([0.3, -0.7])  # exact velocity of a point-mass student → zero loss
    exact = lambda x, t, c, w=None: (mu - x) / (1 - t)[:, None]  # noqa: E731
    zero, _ = dmd_fake_score_loss(exact, mu.expand(16, 2), cond, torch.Generator().manual_seed(0))
    assert zero.item() < 1e-10


def test_few_step_generator_backward_simulation():
    mu, s, n = torch.tensor([1.0, -0.5]), 0.7, 20000
    exact = flow_map_head(lambda w: mu, s)
    grid = time_grid(4)[:-1]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x1, k = few_step_generate(exact, torch.zeros(n, 1), noise, grid, g, step_index=3)
    # an exact flow map re-noised on the grid keeps the marginals exact: samples ~ N(mu, s²)
    assert k == 3 and torch.allclose(x1.mean(0), mu.double(), atol=0.03)
    assert x1.std(0).tolist() == pytest.approx([s, s], abs=0.02)
    grad_calls = []
    net = torch.nn.Linear(2, 2)

    def student(x, t, cond, w=None):
        grad_calls.append(torch.is_grad_enabled())
        return net(x.float())

    out, k = few_step_generate(student, torch.zeros(4, 1), torch.randn(4, 2), grid, torch.Generator().manual_seed(5))
    assert grad_calls == [False] * k + [True] and out.requires_grad  # only the last step has a graph
    with pytest.raises(ValueError, match="data"):
        few_step_generate(student, torch.zeros(4, 1), torch.randn(4, 2), grid, None, step_index=2, backward_simulation=False)
    with pytest.raises(ValueError, match="t_grid"):
        few_step_generate(student, torch.zeros(4, 1), torch.randn(4, 2), time_grid(4)[1:], None)
    with pytest.raises(ValueError, match="t_max"):
        DMDConfig(t_max=1.0)


def test_cd_skip_to_the_end_with_a_multistep_teacher_solver():
    """Δ = 1: every target is the teacher's ODE endpoint. Exact on a curved (Gaussian) flow once the solver has
    enough steps; one Euler step across the whole interval is far off the trajectory."""
    mu, s, n = torch.tensor([0.5, -1.0], dtype=torch.float64), 0.6, 512
    data = mu + s * torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond = torch.zeros(n, 1, dtype=torch.float64)
    teacher = lambda x, t, w: gaussian_velocity(mu, s)(x, t)  # noqa: E731
    exact = flow_map_head(lambda w: mu, s)
    losses = {}
    for steps in (1, 400):
        cfg = ConsistencyConfig(delta=1.0, solver_steps=steps, t_max=0.9, guidance_min=1.0, guidance_max=1.0)
        losses[steps], _ = consistency_distillation_loss(exact, exact, teacher, data, cond,
                                                         torch.Generator().manual_seed(2), config=cfg)
    assert losses[400].item() < 2e-3 * losses[1].item() and losses[1].item() > 1e-2
