"""Attention-entropy loss (Eq. 5/11) and the early-stop threshold (Eq. 10)."""

import math

import pytest
import torch

from fastardiff_ds.losses import EntropyStats, early_stop_threshold, entropy_loss, row_entropy


def causal_mask(r):
    return torch.tril(torch.ones(r, r, dtype=torch.bool))


def uniform_causal_attn(b, h, r):
    m = causal_mask(r).float()
    return (m / m.sum(-1, keepdim=True)).expand(b, h, r, r).clone()


def test_uniform_rows_have_entropy_one_and_loss_minus_one():
    attn = uniform_causal_attn(2, 3, 6)
    ent, valid = row_entropy(attn, causal_mask(6))
    assert valid[:, 0].sum() == 0 and valid[:, 1:].all()  # row 0 has a single key: excluded
    assert torch.allclose(ent[:, 1:], torch.ones(2, 5), atol=1e-6)
    loss, metrics, rows = entropy_loss(attn, causal_mask(6))
    assert loss.item() == pytest.approx(-1.0, abs=1e-6)
    assert metrics["ent/rows"] == 10 and rows.shape == (10,)


def test_one_hot_rows_have_entropy_zero():
    attn = torch.zeros(1, 2, 4, 4)
    attn[..., 0] = 1.0  # every row attends to key 0 only
    ent, _ = row_entropy(attn, causal_mask(4))
    assert torch.allclose(ent, torch.zeros(1, 4), atol=1e-6)
    loss, _, _ = entropy_loss(attn, causal_mask(4))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_known_intermediate_value_and_head_average_first():
    attn = torch.tensor([0.5, 0.25, 0.25]).view(1, 1, 1, 3)
    ent, _ = row_entropy(attn)
    assert ent.item() == pytest.approx(1.5 * math.log(2) / math.log(3), abs=1e-6)
    # two one-hot heads on different keys: the head average is uniform (entropy 1), whereas the
    # mean of per-head entropies would be 0 — the spec averages heads first
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    assert row_entropy(two)[0].item() == pytest.approx(1.0, abs=1e-6)


def test_key_mask_strips_prefix_and_renormalises():
    # row over 4 keys; the first is a prefix column that is stripped: the rest [.2,.2,.2] → uniform
    attn = torch.tensor([0.4, 0.2, 0.2, 0.2]).view(1, 1, 1, 4)
    keys = torch.tensor([False, True, True, True]).view(1, 1, 4)
    ent, valid = row_entropy(attn, keys)
    assert valid.item() and ent.item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="broadcast"):
        row_entropy(attn, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="heads"):
        row_entropy(attn[0])


def test_row_mask_selects_rows():
    attn = uniform_causal_attn(1, 1, 4)
    attn[0, 0, 3] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # last row one-hot
    rows = torch.tensor([[False, False, True, True]])
    loss, metrics, ent = entropy_loss(attn, causal_mask(4), rows)
    assert loss.item() == pytest.approx(-0.5, abs=1e-6) and ent.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert metrics["ent/mean"] == pytest.approx(0.5, abs=1e-6) and metrics["ent/std"] == pytest.approx(0.5, abs=1e-6)


def test_minimising_loss_raises_entropy_with_finite_gradients():
    torch.manual_seed(0)
    r = 8
    logits = (3 * torch.randn(2, 2, r, r)).requires_grad_()
    mask = causal_mask(r)
    opt = torch.optim.SGD([logits], lr=50.0)  # L_ent's gradient is averaged over rows: small
    first = None
    for _ in range(40):
        attn = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)  # exact zeros above diagonal
        loss, _, _ = entropy_loss(attn, mask)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(logits.grad).all()
        opt.step()
    assert first > -0.8 and loss.item() < -0.9  # entropy went up towards 1


def test_early_stop_threshold_known_values():
    assert early_stop_threshold([0.0, 1.0]) == pytest.approx(0.3 * 0.5 - 0.1 * 0.5)
    vals = [0.2, 0.4, 0.6]
    std = math.sqrt((0.2**2 * 2) / 3)  # population std
    assert early_stop_threshold(torch.tensor(vals)) == pytest.approx(0.3 * 0.4 - 0.1 * std)
    with pytest.raises(ValueError, match="at least one"):
        early_stop_threshold([])


def test_entropy_stats_merge_matches_batch_threshold():
    values = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    a, b = EntropyStats(), EntropyStats()
    a.update(values[:300])
    b.update(values[300:])
    merged = EntropyStats.from_tensor(a.to_tensor() + b.to_tensor())  # what an all-reduce SUM gives
    assert merged.threshold() == pytest.approx(early_stop_threshold(values), abs=1e-9)
    restored = EntropyStats()
    restored.load_state_dict(merged.state_dict())
    assert restored.threshold() == merged.threshold()
    with pytest.raises(ValueError, match="empty"):
        EntropyStats().threshold()


def test_entropy_alignment_loss_is_zero_at_the_target_and_its_gradient_points_there():
    from fastardiff_ds.losses.entropy import entropy_alignment_loss, row_entropy

    logits = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    causal = torch.ones(5, 5).tril().bool()
    attn = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    ent, valid = row_entropy(attn, causal)
    loss, m, rows = entropy_alignment_loss(attn, ent.detach(), causal)
    assert loss.item() < 1e-12 and m["ent/gap"] < 1e-6 and rows.numel() == int(valid.sum())
    lower = (ent.detach() - 0.2).clamp(min=0)
    loss, m, _ = entropy_alignment_loss(attn, lower, causal)
    loss.backward()
    with torch.no_grad():  # a small step down the gradient lowers the entropy toward the (lower) target
        stepped = (logits - 0.5 * logits.grad).masked_fill(~causal, float("-inf")).softmax(-1)
    assert float(row_entropy(stepped, causal)[0][valid].mean()) < float(ent.detach()[valid].mean())
    with pytest.raises(ValueError, match="target_entropy"):
        entropy_alignment_loss(attn, lower[:, :3], causal)
