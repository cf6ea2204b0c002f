"""Flow-matching and feature-regression losses, and the shared masked reduction."""

import pytest
import torch

from fastardiff_ds.losses import (
    FlowMatchingConfig,
    feature_regression_loss,
    flow_matching_loss,
    head_flow_matching_loss,
    make_flow_matching_inputs,
    masked_mean,
)


def point_mass_head(mu):
    """Exact velocity of data = δ_mu: v(x, t) = (mu − x)/(1 − t) (t = 1 data)."""

    def head(x, t, cond, guidance=None):
        return (mu - x) / (1 - t)[:, None]

    return head


def test_masked_mean_known_value_and_empty():
    v = torch.tensor([1.0, 4.0, 9.0])
    assert masked_mean(v, torch.tensor([True, False, True])).item() == pytest.approx(5.0)
    assert masked_mean(v).item() == pytest.approx(14 / 3)
    empty = masked_mean(v.requires_grad_(), torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="mask"):
        masked_mean(v, torch.ones(2, dtype=torch.bool))


def test_masked_mean_normalizer_makes_sharding_invariant():
    g = torch.Generator().manual_seed(0)
    values, mask = torch.rand(10, generator=g), torch.rand(10, generator=g) > 0.3
    global_mean = values[mask].mean().item()
    shards = [(values[:3], mask[:3]), (values[3:], mask[3:])]  # uneven valid counts per rank
    world, count = 2, mask.sum().item()
    local = sum(masked_mean(v, m).item() for v, m in shards) / world
    invariant = sum(masked_mean(v, m, normalizer=count / world).item() for v, m in shards) / world
    assert invariant == pytest.approx(global_mean, abs=1e-6)
    assert abs(local - global_mean) > 1e-3  # the default local mean is not invariant here


def test_flow_matching_loss_known_values():
    pred = torch.zeros(3, 2)
    target = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    loss, metrics = flow_matching_loss(pred, target, torch.tensor([1, 0, 1]))
    assert loss.item() == pytest.approx(5.0) and metrics["fm/loss"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="shape"):
        flow_matching_loss(pred, target[:2])


def test_make_inputs_tiles_and_interpolates():
    tokens = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    cfg = FlowMatchingConfig(batch_mul=4)
    b = make_flow_matching_inputs(tokens, torch.Generator().manual_seed(2), cfg)
    assert b.x_t.shape == (20, 3) and b.t.shape == (20,)
    x = b.target + b.noise  # target = x − ε
    assert torch.allclose(x, tokens.repeat(4, 1))  # copy k of token i at row k·N + i
    assert torch.allclose(b.x_t, b.t[:, None] * x + (1 - b.t[:, None]) * b.noise)
    assert len(set(b.t.tolist())) == 20  # fresh t per copy
    b2 = make_flow_matching_inputs(tokens, torch.Generator().manual_seed(2), cfg)
    assert torch.equal(b.x_t, b2.x_t)


def test_exact_velocity_gives_zero_loss_and_wrong_one_does_not():
    mu = torch.tensor([0.5, -1.0, 2.0, 0.0])
    tokens = mu.expand(64, 4).clone()
    cond = torch.zeros(64, 1)
    g = torch.Generator().manual_seed(0)
    loss, _ = head_flow_matching_loss(point_mass_head(mu), tokens, cond, g)
    assert loss.item() < 1e-10
    zero_head = lambda x, t, c, w=None: torch.zeros_like(x)  # noqa: E731
    loss0, _ = head_flow_matching_loss(zero_head, tokens, cond, torch.Generator().manual_seed(0))
    # E|mu − ε|²/D = |mu|²/D + 1 = 1.328; 256 rows of 4-d noise: loose statistical bound
    assert loss0.item() == pytest.approx((mu.pow(2).mean() + 1).item(), rel=0.15)


def test_head_loss_masks_and_trains_only_the_head():
    torch.manual_seed(0)
    head_net = torch.nn.Linear(3 + 1 + 2, 3)
    encoder = torch.nn.Linear(2, 2)  # stands for the AR producing cond (gets grad: joint training)

    def head(x, t, cond, guidance=None):
        return head_net(torch.cat([x, t[:, None], cond], dim=-1))

    tokens = torch.randn(6, 3, requires_grad=True)
    cond = encoder(torch.randn(6, 2))
    mask = torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)
    cfg = FlowMatchingConfig(batch_mul=2)
    loss, _ = head_flow_matching_loss(head, tokens, cond, torch.Generator().manual_seed(3), mask, cfg)
    same, _ = head_flow_matching_loss(head, tokens, cond, torch.Generator().manual_seed(3), mask, cfg, normalizer=3)
    assert loss.item() == pytest.approx(same.item())  # normalizer counts tokens before tiling
    loss.backward()
    assert head_net.weight.grad.abs().sum() > 0 and encoder.weight.grad.abs().sum() > 0
    assert tokens.grad is not None and tokens.grad[~mask].abs().sum() == 0  # masked tokens: no gradient
    with pytest.raises(ValueError, match="cond"):
        head_flow_matching_loss(head, tokens, cond[:3], None)


def test_smooth_l1_known_values_with_mask():
    pred = torch.zeros(1, 3, 2, requires_grad=True)
    target = torch.tensor([[[0.5, 2.0], [1.0, 1.0], [4.0, 0.0]]], requires_grad=True)
    mask = torch.tensor([[True, False, True]])
    loss, metrics = feature_regression_loss(pred, target, mask)
    # SmoothL1(β=1): 0.5·0.25 = 0.125 and 2 − 0.5 = 1.5 → 0.8125; 4 − 0.5 = 3.5, 0 → 1.75
    assert loss.item() == pytest.approx((0.8125 + 1.75) / 2)
    assert metrics["reg/loss"] == pytest.approx(loss.item())
    loss.backward()
    assert target.grad is None  # stop-gradient target
    assert pred.grad[0, 1].abs().sum() == 0 and pred.grad[0, 0].abs().sum() > 0
    # β = 2: |d| < 2 is quadratic 0.5 d²/β
    l2, _ = feature_regression_loss(torch.zeros(1, 1, 2), torch.tensor([[[1.0, 3.0]]]), beta=2.0)
    assert l2.item() == pytest.approx((0.25 + 2.0) / 2)


def test_regression_rejects_misaligned_inputs():
    with pytest.raises(ValueError, match="shift"):
        feature_regression_loss(torch.zeros(2, 4, 8), torch.zeros(2, 5, 8))
    with pytest.raises(ValueError, match="mask"):
        feature_regression_loss(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), torch.ones(2, 5))
    _, metrics = feature_regression_loss(torch.ones(2, 4, 8), 2 * torch.ones(2, 4, 8))
    assert metrics["reg/cos"] == pytest.approx(1.0)
