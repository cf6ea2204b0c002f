"""The losses of the joint step (paper Eqs. 4-9) against independent plain-torch implementations of their formulas.

tests/unit/test_alpha_eq9.py checks that Eq. 9 reaches every engine, against a reference built from the same library
losses: it checks routing only. Here every loss is rewritten from its formula (the paper, and the module docstrings
of fastardiff_ds/losses for the choices the paper leaves open) in float64 plain torch -- no library loss, helper or
sampler is called -- and the library's value and gradients are compared on small random inputs with fixed seeds.
Random draws: the library documents the order in which each loss draws from its generator (t, w, eps, ...); the
references draw the same numbers from a generator with the same seed with torch.rand / torch.randn directly.

  L_reg   (Eq. 4)  SmoothL1_beta(f_hat, sg f): mean over H, masked mean over positions
  L_ent   (Eq. 5)  -mean_r E_r, E_r = -sum_c A_rc log A_rc / log n_r of the head-averaged, key-masked,
                   renormalised map (rows with n_r < 2 excluded); alignment variant mean_r (E_r - E*_r)^2
  L_CD    (Eq. 6)  pseudo-Huber(f_theta(x_t, t), sg f_ema(x_t', t')), f(x, t) = x + (1 - t) v, x_t' = teacher's CFG
                   Euler solve from t to t' = min(t + delta, 1); f(x, 1) = x
  L_DMD   (Eq. 7)  0.5 ||x - sg(x - g)||^2, g = (x_fake - x_real) / mean|x - x_real| per sample, so dL/dx = g / numel
  fake score       rectified-flow MSE ||v_phi(x_t, t) - (x - eps)||^2 on detached samples
  flow matching    the head's rectified flow (batch_mul tiling, logit-normal t) -- the pretraining / fake loss
  generator        few-step student samples with backward simulation, the gradient through step k only
  Eq. 8, 9         alpha(t) = a0 - (a0 - aT) t / T; L = alpha (L_reg + lambda L_ent) + (1 - alpha) L_dist
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastardiff_ds.losses.consistency import ConsistencyConfig, consistency_distillation_loss
from fastardiff_ds.losses.dmd import DMDConfig, dmd_fake_score_loss, dmd_generator_loss, few_step_generate
from fastardiff_ds.losses.entropy import entropy_alignment_loss, entropy_loss
from fastardiff_ds.losses.flow_matching import FlowMatchingConfig, head_flow_matching_loss
from fastardiff_ds.losses.regression import feature_regression_loss
from fastardiff_ds.schedules.alpha import AlphaSchedule, total_loss

F64 = torch.float64
TOL = {"rtol": 1e-5, "atol": 1e-6}  # the library computes in fp32, the references in fp64; atol x max|ref|


def close(lib: torch.Tensor, ref: torch.Tensor, rtol=TOL["rtol"], atol=TOL["atol"], what=""):
    """assert_close with the scale of the reference: atol relative to max|ref| (gradients can be tiny)."""
    scale = float(ref.detach().abs().max()) if ref.numel() else 1.0
    torch.testing.assert_close(lib.detach().to(F64), ref.detach().to(F64), rtol=rtol, atol=atol * max(scale, 1e-3),
                               msg=lambda m: f"{what}: {m}")


class LinearHead(nn.Module):
    """A small smooth flow head with the head protocol head(x (N, D), t (N,), cond (N, C), w (N,) | None)."""

    def __init__(self, d: int, c: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(0.3 * torch.randn(d, d, generator=g))
        self.b = nn.Parameter(0.3 * torch.randn(c, d, generator=g))
        self.t = nn.Parameter(torch.randn(d, generator=g))
        self.w = nn.Parameter(0.1 * torch.randn(d, generator=g))

    def forward(self, x, t, cond, w=None):
        a, b, u, v = (p.to(x.dtype) for p in (self.a, self.b, self.t, self.w))
        out = torch.tanh(x @ a + cond.to(x.dtype) @ b) + t.to(x.dtype)[:, None] * u
        return out if w is None else out + w.to(x.dtype)[:, None] * v

    def f64(self):
        """A float64 copy that shares nothing with self (for the reference's own gradients)."""
        twin = LinearHead(self.a.shape[0], self.b.shape[0], 0)
        twin.load_state_dict({k: v.detach().clone() for k, v in self.state_dict().items()})
        return twin.double()


def grads(module: nn.Module) -> dict:
    return {n: grad_of(p) for n, p in module.named_parameters()}


def grad_of(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()


# -- L_reg, Eq. 4 ---------------------------------------------------------------------------------------------------
def ref_smooth_l1(pred, target, beta, mask=None):
    d = (pred - target.detach()).abs()
    per_elem = torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
    per_pos = per_elem.sum(-1) / pred.shape[-1]
    m = torch.ones_like(per_pos) if mask is None else mask.to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum()


@pytest.mark.parametrize("beta", [1.0, 0.3])
@pytest.mark.parametrize("masked", [False, True])
def test_feature_regression_matches_plain_smooth_l1(beta, masked):
    g = torch.Generator().manual_seed(0)
    pred = (1.5 * torch.randn(3, 5, 8, generator=g)).requires_grad_()
    target = torch.randn(3, 5, 8, generator=g).requires_grad_()
    mask = (torch.rand(3, 5, generator=g) > 0.3) if masked else None
    d = (pred - target).abs()
    assert bool((d < beta).any()) and bool((d > beta).any())  # both branches of SmoothL1 are exercised
    loss, _ = feature_regression_loss(pred, target, mask, beta=beta)
    loss.backward()
    p64 = pred.detach().to(F64).requires_grad_()
    ref = ref_smooth_l1(p64, target.detach().to(F64), beta, mask)
    ref.backward()
    close(loss, ref, what="L_reg")
    close(pred.grad, p64.grad, what="dL_reg/dpred")
    assert target.grad is None  # sg(f): the target AR gets no gradient from L_reg


# -- L_ent, Eq. 5 (and the alignment variant) -----------------------------------------------------------------------
def ref_row_entropy(attn, keys):
    """E_r of the head-averaged map renormalised over `keys` (B, R, K); (entropy (B, R), rows with >= 2 keys)."""
    p = attn.mean(1) * keys
    total = p.sum(-1, keepdim=True)
    p = p / torch.where(total > 0, total, torch.ones_like(total))  # a row without keys stays 0 (and excluded)
    plogp = torch.where(keys, p * torch.where(keys, p, torch.ones_like(p)).log(), torch.zeros_like(p))
    n = keys.sum(-1)
    ent = -plogp.sum(-1) / torch.log(n.clamp_min(2).to(p.dtype))
    return torch.where(n >= 2, ent, torch.zeros_like(ent)), n >= 2


def _attention(seed):
    """Post-softmax attention (B=2, heads=3, R=6, K=6) under a causal + padding mask, from leaf logits, and a key
    mask that also strips key 0 (so rows need renormalising); row 0 has no second key, row 1 one key."""
    g = torch.Generator().manual_seed(seed)
    B, H, R = 2, 3, 6
    logits = (2.0 * torch.randn(B, H, R, R, generator=g)).requires_grad_()
    causal = torch.ones(R, R, dtype=torch.bool).tril()
    pad = torch.ones(B, 1, R, dtype=torch.bool)
    pad[1, 0, 4:] = False  # sample 1: its last two keys are padding
    allowed = causal & pad  # (B, R, K)
    allowed = allowed | torch.eye(R, dtype=torch.bool)  # every row attends to itself (no empty softmax)
    attn = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), -1)
    keys = allowed.clone()
    keys[:, :, 0] = False  # a stripped prefix column: the library must renormalise over the remaining keys
    return logits, allowed, attn, keys


def _ref_attention(logits, allowed):
    l64 = logits.detach().to(F64).requires_grad_()
    return l64, torch.softmax(l64.masked_fill(~allowed[:, None], float("-inf")), -1)


@pytest.mark.parametrize("row_select", [False, True])
def test_entropy_loss_matches_plain_normalised_entropy(row_select):
    logits, allowed, attn, keys = _attention(1)
    rows = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 1, 1]], dtype=torch.bool) if row_select else None
    loss, metrics, ents = entropy_loss(attn, keys, rows)
    (lib_grad,) = torch.autograd.grad(loss, logits)
    l64, a64 = _ref_attention(logits, allowed)
    ent, valid = ref_row_entropy(a64, keys)
    if rows is not None:
        valid = valid & rows
    ref = -(ent * valid).sum() / valid.sum()
    (ref_grad,) = torch.autograd.grad(ref, l64)
    assert int(valid.sum()) == metrics["ent/rows"] and not bool(valid[:, :2].any())  # rows 0, 1: < 2 keys
    assert -1.0 <= float(ref.detach()) < 0.0
    close(loss, ref, what="L_ent")
    close(ents, ent[valid], what="row entropies")
    close(lib_grad, ref_grad, what="dL_ent/dlogits")
    assert float(ref_grad.abs().max()) > 0


def test_entropy_loss_extremes():
    """Uniform rows give L_ent = -1, one-hot rows 0 (Eq. 5 normalised by log n)."""
    R = 5
    keys = torch.ones(R, R, dtype=torch.bool).tril()
    uniform = (keys.double() / keys.sum(-1, keepdim=True)).expand(1, 2, R, R)
    one_hot = torch.eye(R, dtype=F64).expand(1, 2, R, R)
    assert float(entropy_loss(uniform, keys)[0]) == pytest.approx(-1.0, abs=1e-6)
    assert float(entropy_loss(one_hot, keys)[0]) == pytest.approx(0.0, abs=1e-6)


def test_entropy_alignment_matches_plain_squared_gap():
    logits, allowed, attn, keys = _attention(2)
    target = torch.rand(2, 6, generator=torch.Generator().manual_seed(5), dtype=F64).requires_grad_()
    loss, metrics, _ = entropy_alignment_loss(attn, target, keys)
    (lib_grad,) = torch.autograd.grad(loss, logits)
    l64, a64 = _ref_attention(logits, allowed)
    ent, valid = ref_row_entropy(a64, keys)
    ref = (((ent - target.detach()) ** 2) * valid).sum() / valid.sum()
    (ref_grad,) = torch.autograd.grad(ref, l64)
    close(loss, ref, what="L_align")
    close(lib_grad, ref_grad, what="dL_align/dlogits")
    gap = ((ent.detach() - target.detach()).abs() * valid).sum() / valid.sum()
    assert metrics["ent/gap"] == pytest.approx(float(gap), rel=1e-5)
    assert target.grad is None  # E* carries no gradient


# -- L_CD, Eq. 6 ----------------------------------------------------------------------------------------------------
def ref_cd_loss(student, target, teacher, x, cond, seed, cfg: ConsistencyConfig, guidance=None, mask=None):
    """Plain consistency distillation; draws (t, w, eps) in the library's documented order from `seed`."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    t = (cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(n, generator=g)).to(F64)
    w = (cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(n, generator=g)).to(F64)
    if guidance is not None:
        w = guidance.to(F64).expand(n)
    eps = torch.randn(x.shape, generator=g).to(F64)
    x_t = t[:, None] * x + (1 - t[:, None]) * eps
    t_next = torch.minimum(t + cfg.delta, torch.ones_like(t))
    with torch.no_grad():
        h = (t_next - t) / cfg.solver_steps
        y = x_t
        for i in range(cfg.solver_steps):
            y = y + h[:, None] * teacher(y, t + i * h, w)
        f_tgt = y + (1 - t_next[:, None]) * target(y, t_next, cond.detach(), w)
        f_tgt = torch.where((t_next >= 1)[:, None], y, f_tgt)
    f_s = x_t + (1 - t[:, None]) * student(x_t, t, cond, w)
    c = cfg.huber_c
    per_tok = (torch.sqrt((f_s - f_tgt) ** 2 + c * c) - c).mean(-1)
    m = torch.ones(n, dtype=F64) if mask is None else mask.to(F64)
    return (per_tok * m).sum() / m.sum()


def _teacher(d):
    g = torch.Generator().manual_seed(11)
    m = 0.5 * torch.randn(d, d, generator=g, dtype=F64)
    u = torch.randn(d, generator=g, dtype=F64)

    def v(x, t, w):  # a guided "velocity": nonlinear in x, depends on t and on the guidance scale
        x64 = x.to(F64)
        return (torch.tanh(x64 @ m) * (1 + 0.1 * w.to(F64)[:, None]) + t.to(F64)[:, None] * u).to(x.dtype)
    return v


CD_CASES = {  # (ConsistencyConfig kwargs, fixed guidance, masked)
    "lcm": (dict(delta=0.02, solver_steps=1, guidance_min=1.0, guidance_max=6.0), None, False),
    "multi_step_clamped": (dict(delta=0.5, solver_steps=3, t_max=0.9, huber_c=0.05), None, True),
    "endpoint": (dict(delta=1.0, solver_steps=2), 3.0, False),  # t' = 1 everywhere: target = teacher's endpoint
}


@pytest.mark.parametrize("case", list(CD_CASES))
def test_consistency_loss_matches_plain_cd(case):
    kwargs, guidance, masked = CD_CASES[case]
    cfg = ConsistencyConfig(**kwargs)
    N, D, C = 12, 6, 4
    g = torch.Generator().manual_seed(3)
    x, cond = torch.randn(N, D, generator=g), torch.randn(N, C, generator=g).requires_grad_()
    mask = (torch.rand(N, generator=g) > 0.25) if masked else None
    student, target = LinearHead(D, C, 1), LinearHead(D, C, 2)
    teacher = _teacher(D)
    w_fixed = None if guidance is None else torch.full((N,), guidance)
    loss, m = consistency_distillation_loss(student, target, teacher, x, cond, torch.Generator().manual_seed(9),
                                            mask, cfg, guidance=w_fixed)
    loss.backward()
    s64, t64 = student.f64(), target.f64()
    c64 = cond.detach().to(F64).requires_grad_()
    ref = ref_cd_loss(s64, t64, teacher, x.to(F64), c64, 9, cfg, w_fixed, mask)
    ref.backward()
    close(loss, ref, what=f"L_cd[{case}]")
    for name, gr in grads(student).items():
        close(gr, grad_of(s64.get_parameter(name)), what=f"dL_cd/d{name}")
    close(cond.grad, c64.grad, what="dL_cd/dcond")
    assert all(p.grad is None for p in target.parameters())  # sg(f_ema)
    if case == "multi_step_clamped":  # rows with t' = 1 take f = x exactly: the target network is not read there
        clamped = torch.Generator().manual_seed(9)
        assert bool((torch.rand(N, generator=clamped) * cfg.t_max + cfg.delta >= 1).any())

        def nan_at_one(x_, t_, c_, w_):
            return torch.where((t_ >= 1)[:, None], float("nan"), target(x_, t_, c_, w_))

        again, _ = consistency_distillation_loss(student, nan_at_one, teacher, x, cond, torch.Generator().manual_seed(9),
                                                 mask, cfg, guidance=w_fixed)
        assert torch.equal(again, loss)


# -- L_DMD, Eq. 7 ---------------------------------------------------------------------------------------------------
def ref_dmd_generator(x, real_v, fake_v, seed, cfg: DMDConfig, mask=None):
    """DMD2's generator loss with per-sample t and normaliser. x: (B, L, D) float64. Returns (loss, g (B, L, D))."""
    gen = torch.Generator().manual_seed(seed)
    b, l, d = x.shape
    t = (cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(b, generator=gen)).to(F64)
    eps = torch.randn(b * l, d, generator=gen).to(F64).view(b, l, d)
    tt = t[:, None, None]
    with torch.no_grad():
        x_t = tt * x + (1 - tt) * eps
        flat_t = t.repeat_interleave(l)
        x_real = x_t + (1 - tt) * real_v(x_t.reshape(b * l, d), flat_t).view(b, l, d)
        x_fake = x_t + (1 - tt) * fake_v(x_t.reshape(b * l, d), flat_t).view(b, l, d)
        valid = torch.ones(b, l, dtype=F64) if mask is None else mask.reshape(b, l).to(F64)
        scale = ((x - x_real).abs().mean(-1) * valid).sum(-1) / valid.sum(-1).clamp_min(1)
        scale = scale[:, None, None]  # a sample without valid tokens (scale 0) gets g = 0
        grad = torch.where(scale > 0, (x_fake - x_real) / torch.where(scale > 0, scale, 1.0), 0.0)
    per_tok = 0.5 * ((x - (x - grad).detach()) ** 2).mean(-1)
    return (per_tok * valid).sum() / valid.sum(), grad


@pytest.mark.parametrize("shape", ["images", "tokens"])
@pytest.mark.parametrize("masked", [False, True])
def test_dmd_generator_loss_matches_plain_dmd(shape, masked):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 6, generator=g) if shape == "images" else torch.randn(7, 6, generator=g)
    x.requires_grad_()
    mask = (torch.rand(x.shape[:-1], generator=g) > 0.3) if masked else None
    if mask is not None:
        mask.view(-1)[0] = True
    real, fake = _teacher(6), LinearHead(6, 1, 5).double()
    real_v = lambda xx, tt: real(xx, tt, torch.full_like(tt, 2.0))  # noqa: E731
    fake_v = lambda xx, tt: fake(xx, tt, torch.zeros(xx.shape[0], 1, dtype=xx.dtype)).to(xx.dtype)  # noqa: E731
    cfg = DMDConfig()
    loss, _ = dmd_generator_loss(x, real_v, fake_v, torch.Generator().manual_seed(8), mask, cfg)
    loss.backward()
    xb = x.detach().to(F64).reshape(x.shape[0], -1, 6) if shape == "images" else x.detach().to(F64)[:, None]
    xb.requires_grad_()
    mb = None if mask is None else mask.reshape(xb.shape[:2])
    ref, g_dmd = ref_dmd_generator(xb, real_v, fake_v, 8, cfg, mb)
    ref.backward()
    close(loss, ref, what="L_dmd")
    close(x.grad, xb.grad.reshape(x.shape), what="dL_dmd/dx")
    # the gradient is DMD's g = (x_fake - x_real) / mean|x - x_real| over numel (valid tokens x D), 0 on masked ones
    n_valid = x.shape[:-1].numel() if mask is None else int(mask.sum())
    valid = torch.ones(xb.shape[:2]) if mb is None else mb.to(F64)
    close(x.grad, (g_dmd * valid[..., None] / (n_valid * 6)).reshape(x.shape), what="dL_dmd/dx = g / numel")
    assert all(p.grad is None for p in fake.parameters())  # both scores run under no_grad


def test_fake_score_loss_matches_plain_rectified_flow():
    N, D, C = 10, 6, 4
    g = torch.Generator().manual_seed(6)
    samples = torch.randn(N, D, generator=g).requires_grad_()
    cond = torch.randn(N, C, generator=g).requires_grad_()
    head = LinearHead(D, C, 7)
    loss, _ = dmd_fake_score_loss(head, samples, cond, torch.Generator().manual_seed(2), config=DMDConfig())
    loss.backward()
    h64 = head.f64()
    gen = torch.Generator().manual_seed(2)
    t = torch.rand(N, generator=gen).to(F64)  # DMD2's fake score: all t, U[0, 1], one draw per token
    eps = torch.randn(N, D, generator=gen).to(F64)
    x = samples.detach().to(F64)
    x_t = t[:, None] * x + (1 - t[:, None]) * eps
    ref = ((h64(x_t, t, cond.detach().to(F64), None) - (x - eps)) ** 2).mean()
    ref.backward()
    close(loss, ref, what="L_fake")
    for name, gr in grads(head).items():
        close(gr, grad_of(h64.get_parameter(name)), what=f"dL_fake/d{name}")
    assert samples.grad is None and cond.grad is None  # trains the fake score only


@pytest.mark.parametrize("masked", [False, True])
def test_head_flow_matching_matches_plain_tiled_rectified_flow(masked):
    """The head's rectified-flow loss (NextStep-1; pretraining, and the fake score's loss): batch_mul tiled copies,
    logit-normal t = sigmoid(mu + s z), target velocity x - eps."""
    N, D, C, M = 5, 6, 4, 4
    g = torch.Generator().manual_seed(8)
    tokens, cond = torch.randn(N, D, generator=g), torch.randn(N, C, generator=g).requires_grad_()
    w = torch.rand(N, generator=g) * 5
    mask = torch.tensor([True, False, True, True, False]) if masked else None
    fm = FlowMatchingConfig(batch_mul=M, logit_mean=0.3, logit_std=0.8)
    head = LinearHead(D, C, 9)
    loss, _ = head_flow_matching_loss(head, tokens, cond, torch.Generator().manual_seed(1), mask, fm, guidance=w)
    loss.backward()
    h64, c64 = head.f64(), cond.detach().to(F64).requires_grad_()
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(M * N, generator=gen)
    t = torch.sigmoid(0.3 + 0.8 * z).to(F64)
    eps = torch.randn(M * N, D, generator=gen).to(F64)
    rows = torch.arange(M * N) % N  # copy k of row i at k * N + i
    x = tokens.to(F64)[rows]
    x_t = t[:, None] * x + (1 - t[:, None]) * eps
    per = ((h64(x_t, t, c64[rows], w.to(F64)[rows]) - (x - eps)) ** 2).mean(-1)
    valid = torch.ones(M * N, dtype=F64) if mask is None else mask[rows].to(F64)
    ref = (per * valid).sum() / valid.sum()
    ref.backward()
    close(loss, ref, what="L_fm")
    for name, gr in grads(head).items():
        close(gr, grad_of(h64.get_parameter(name)), what=f"dL_fm/d{name}")
    close(cond.grad, c64.grad, what="dL_fm/dcond")


@pytest.mark.parametrize("k", [0, 1, 2])
def test_few_step_generator_matches_plain_backward_simulation(k):
    """x_hat = f(x_{t_k}, t_k), x_{t_k} reached by the student's own steps 0..k-1 without gradient (DMD2's backward
    simulation), re-noised as x <- t_{j+1} f(x, t_j) + (1 - t_{j+1}) eps_j; the gradient runs through step k only."""
    K, N, D, C = 3, 6, 5, 3
    g = torch.Generator().manual_seed(12)
    noise, cond = torch.randn(N, D, generator=g), torch.randn(N, C, generator=g).requires_grad_()
    w = torch.full((N,), 4.0)
    grid = torch.tensor([0.0, 1 / 3, 2 / 3])
    student = LinearHead(D, C, 13)
    out, k_used = few_step_generate(student, cond, noise, grid, torch.Generator().manual_seed(4), guidance=w,
                                    step_index=k)
    assert k_used == k
    (out ** 2).sum().backward()
    s64, c64 = student.f64(), cond.detach().to(F64).requires_grad_()
    gen = torch.Generator().manual_seed(4)
    x, times = noise.to(F64), [j / K for j in range(K)]
    with torch.no_grad():
        for j in range(k):
            tj = torch.full((N,), times[j], dtype=F64)
            x1 = x + (1 - tj[:, None]) * s64(x, tj, c64, w.to(F64))
            x = times[j + 1] * x1 + (1 - times[j + 1]) * torch.randn(N, D, generator=gen).to(F64)
    tk = torch.full((N,), times[k], dtype=F64)
    ref = x + (1 - tk[:, None]) * s64(x, tk, c64, w.to(F64))
    (ref ** 2).sum().backward()
    close(out, ref, what="x_hat")
    for name, gr in grads(student).items():
        close(gr, grad_of(s64.get_parameter(name)), what=f"d|x_hat|^2/d{name}")
    close(cond.grad, c64.grad, what="d|x_hat|^2/dcond")


# -- Eqs. 8, 9 ------------------------------------------------------------------------------------------------------
def test_alpha_eq8_and_total_loss_eq9():
    sched = AlphaSchedule("linear", 0.95, 0.05, 40)
    for step in (0, 1, 13, 39, 40, 80):
        assert sched(step) == pytest.approx(0.95 - 0.9 * min(step / 40, 1.0), rel=1e-12, abs=1e-15), step
    g = torch.Generator().manual_seed(0)
    l_reg, l_ent, l_dist = (torch.rand((), generator=g, dtype=F64).requires_grad_() for _ in range(3))
    for a, lam in ((0.95, 1.0), (0.3, 0.25), (0.0, 2.0), (1.0, 0.5)):
        total = total_loss(a, l_reg, l_ent, l_dist, lam)
        ga = torch.autograd.grad(total, (l_reg, l_ent, l_dist))
        r, e, d = (float(v.detach()) for v in (l_reg, l_ent, l_dist))
        assert float(total.detach()) == pytest.approx(a * (r + lam * e) + (1 - a) * d, rel=1e-12, abs=1e-15)
        assert [float(v) for v in ga] == pytest.approx([a, a * lam, 1 - a], rel=1e-12, abs=1e-15)
    assert math.isclose(sched(20), 0.5, rel_tol=1e-12)
