"""MAR's DiffLoss training loss (losses/diffloss.py) against the official `training_losses` / `DiffLoss.forward`
(tests/fixtures/mar/diffloss_train_official.pt, written by tests/fixtures/mar_official.py ... loss with the same
trained net as diffloss_official.pt): per-token mse / vb / loss at fixed t (t = 0's discretised NLL, t = 999's
clipped beta) and noise, the masked mean, and the gradient of every net parameter (the vb term must not train
the mean: eps is detached there)."""
from pathlib import Path

import pytest
import torch

from fastardiff_ds.losses.diffloss import diffloss_loss, diffloss_terms
from fastardiff_ds.models.flow_head import SimpleMLPAdaLN
from fastardiff_ds.sampling.diffloss import SpacedCosine

FIXTURES = Path(__file__).parents[1] / "fixtures" / "mar"


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURES / "diffloss_train_official.pt", weights_only=True)


def _net():
    base = torch.load(FIXTURES / "diffloss_official.pt", weights_only=True)
    s = base["sizes"]
    net = SimpleMLPAdaLN(s["C"], s["Z"], s["W"], s["D"], mlp_ratio=1.0, out_dim=2 * s["C"])
    net.load_state_dict({k.removeprefix("diffloss.net."): v for k, v in base["state"].items()})
    return net


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_per_token_terms_match_official(ref):
    proc = SpacedCosine.make("1000")
    with torch.no_grad():
        terms = diffloss_terms(_net(), ref["x0"], ref["z"], ref["t"], ref["noise"], proc)
    for k in ("mse", "vb", "loss"):
        assert _rel(terms[k], ref[k]) < 1e-4, k


def test_masked_loss_and_gradients_match_official(ref):
    net = _net()
    (noise,) = ref["draws"]
    loss = diffloss_loss(net, ref["x0"], ref["z"], ref["drawn_t"], noise, SpacedCosine.make("1000"), ref["mask"])
    assert _rel(loss.detach(), ref["masked_loss"]) < 1e-4
    loss.backward()
    for name, p in net.named_parameters():
        assert _rel(p.grad, ref["grads"][name]) < 1e-3, name
