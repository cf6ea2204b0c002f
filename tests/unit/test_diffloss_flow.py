"""MAR's DiffLoss read as a flow head (sampling/diffloss_flow.py): for Gaussian data the exact eps-predictor of the
VP process, read through the adapter, gives the exact flow velocity E[x0 - eps | x_s]; the DDPM-time map inverts the
1000-step table."""
import math

import pytest
import torch
from torch import nn

from fastardiff_ds.sampling.diffloss import SpacedCosine
from fastardiff_ds.sampling.diffloss_flow import DDPMTime, DiffLossFlow, guided_velocity

ABAR = 1 / SpacedCosine.make("1000").sqrt_recip_abar ** 2  # float64 (1000,)
M, SIG = 0.7, 0.5  # data N(M, SIG^2) per dimension


class GaussianEps(nn.Module):
    """The exact eps-prediction of N(M, SIG^2 I) data at integer DDPM steps (out 2C like DiffLoss; v half = 0)."""

    def __init__(self, C):
        super().__init__()
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(1, 2 * C)

    def forward(self, x, tau, cond):
        ab = ABAR[tau.round().long()].to(x.dtype)[:, None]
        eps = torch.sqrt(1 - ab) * (x - torch.sqrt(ab) * M) / (ab * SIG**2 + 1 - ab)
        return torch.cat([eps, torch.zeros_like(eps)], 1)


def _flow_velocity(x, s):
    s = s[:, None]
    d = s**2 * SIG**2 + (1 - s) ** 2
    x0 = M + s * SIG**2 * (x - s * M) / d
    eps = (1 - s) * (x - s * M) / d
    return x0 - eps


def test_exact_eps_reads_as_the_exact_flow_velocity():
    taus = torch.tensor([0, 10, 250, 500, 800, 990])
    ab = ABAR[taus]
    s = (ab.sqrt() / (ab.sqrt() + (1 - ab).sqrt())).float()  # the flow times of those DDPM steps
    head = DiffLossFlow(GaussianEps(3))
    assert torch.allclose(head.time.tau(s), taus.double(), atol=1e-3)
    x = torch.randn(len(taus), 3, generator=torch.Generator().manual_seed(0))
    v = head(x, s, torch.zeros(len(taus), 1))
    ref = _flow_velocity(x.double(), s.double()).float()
    assert torch.allclose(v, ref, rtol=1e-4, atol=1e-4), (v - ref).abs().max()


def test_ddpm_time_is_monotone_and_clamped():
    t = DDPMTime()
    s = torch.linspace(0.001, 0.999, 200)
    tau = t.tau(s)
    assert (tau[1:] <= tau[:-1] + 1e-9).all()  # more data -> earlier DDPM step
    assert tau.max() <= 999 and tau.min() >= 0
    assert t.tau(torch.tensor([1.0]))[0] == 0.0 and t.tau(torch.tensor([0.0]))[0] == 999.0


def test_guidance_combines_velocities():
    head = DiffLossFlow(GaussianEps(2))
    x, s = torch.randn(4, 2), torch.full((4,), 0.5)
    c = torch.zeros(4, 1)
    same = guided_velocity(head, c, c, 3.0)(x, s)
    assert torch.allclose(same, head(x, s, c))  # equal conditions: CFG changes nothing
    assert torch.equal(guided_velocity(head, c, None, 3.0)(x, s), head(x, s, c))
