"""FID math (float64 Fréchet distance), statistics caches and the FID Inception loader."""
import numpy as np
import pytest
import torch
from scipy import linalg

from eval_suites import frechet
from eval_suites.fid_inception import FIDInceptionFeatures, fid_inception_v3, load_fid_inception


def reference_fid(x: np.ndarray, y: np.ndarray) -> float:
    """Independent reference: Tr((S1 S2)^1/2) from the eigenvalues of S1 S2 (real, >= 0 for PSD S)."""
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    eig = linalg.eigvals(s1 @ s2)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum())


def test_identical_features_give_zero():
    x = np.random.default_rng(0).normal(size=(500, 16))
    st = frechet.feature_stats(x)
    assert frechet.frechet_distance(st, st) == pytest.approx(0.0, abs=1e-8)


def test_matches_scipy_reference_on_random_features():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 12))
    y = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    got = frechet.frechet_distance(frechet.feature_stats(x), frechet.feature_stats(y))
    assert got == pytest.approx(reference_fid(x, y), rel=1e-8)


def test_closed_form_for_diagonal_gaussians():
    # For diagonal covariances FID = |mu1 - mu2|^2 + sum (s1 - s2)^2 with s the standard deviations.
    a = frechet.FeatureStats(np.array([0.0, 1.0]), np.diag([4.0, 1.0]), 10)
    b = frechet.FeatureStats(np.array([3.0, 1.0]), np.diag([1.0, 9.0]), 10)
    assert frechet.frechet_distance(a, b) == pytest.approx(9.0 + (2 - 1) ** 2 + (1 - 3) ** 2)


def test_float64_even_from_float32_features():
    x = np.random.default_rng(2).normal(size=(200, 8)).astype(np.float32)
    st = frechet.feature_stats(x)
    assert st.mu.dtype == np.float64 and st.sigma.dtype == np.float64
    assert np.allclose(st.sigma, np.cov(x.astype(np.float64), rowvar=False))  # unbiased (ddof=1)


def test_singular_covariance_is_handled():
    x = np.random.default_rng(3).normal(size=(5, 20))  # N < D: rank-deficient covariances
    y = np.random.default_rng(4).normal(size=(5, 20))
    assert np.isfinite(frechet.frechet_distance(frechet.feature_stats(x), frechet.feature_stats(y)))


def test_shape_mismatch_is_a_clear_error():
    a = frechet.feature_stats(np.random.default_rng(0).normal(size=(10, 3)))
    b = frechet.feature_stats(np.random.default_rng(0).normal(size=(10, 4)))
    with pytest.raises(ValueError, match="same feature network"):
        frechet.frechet_distance(a, b)


def test_stats_npz_round_trip(tmp_path):
    st = frechet.feature_stats(np.random.default_rng(5).normal(size=(50, 6)))
    frechet.save_stats(tmp_path / "ref.npz", st, protocol="p1")
    back, meta = frechet.load_stats(tmp_path / "ref.npz")
    assert np.array_equal(back.mu, st.mu) and np.array_equal(back.sigma, st.sigma) and back.n == 50
    assert meta == {"protocol": "p1"}
    np.savez(tmp_path / "pytorch_fid.npz", mu=st.mu, sigma=st.sigma)  # pytorch-fid --save-stats layout
    assert frechet.load_stats(tmp_path / "pytorch_fid.npz")[0].n == -1


def test_inception_has_pytorch_fid_key_layout():
    sd = fid_inception_v3().state_dict()
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert not any(k.startswith("AuxLogits") for k in sd)


def test_inception_loads_local_weights_and_gives_pool3(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "pt_inception.pth"
    torch.save(fid_inception_v3().state_dict(), path)  # random weights stand in for the real file
    net = load_fid_inception(path)
    assert isinstance(net, FIDInceptionFeatures)
    with torch.no_grad():
        feats = net(torch.rand(1, 3, 64, 64))
    assert feats.shape == (1, 2048) and torch.isfinite(feats).all()
    assert (feats >= 0).all()  # average of ReLU outputs


def test_fid_blocks_pool_like_the_tf_graph():
    """Same weights as torchvision's blocks; only the pool branch differs, and only where padding matters."""
    from torchvision.models import inception as tvi
    from eval_suites.fid_inception import FIDInceptionA, FIDInceptionE
    torch.manual_seed(0)
    x = torch.randn(1, 192, 7, 7)
    fid_a, tv_a = FIDInceptionA(192, 32).eval(), tvi.InceptionA(192, 32).eval()
    tv_a.load_state_dict(fid_a.state_dict())
    with torch.no_grad():
        diff = (fid_a(x) - tv_a(x)).abs()  # (1, 256, 7, 7); the pool branch is the last 32 channels
    assert diff[:, :-32].max() < 1e-6
    assert diff[:, -32:, 1:-1, 1:-1].max() < 1e-6 and diff[:, -32:, 0, :].max() > 1e-4  # borders only
    e_avg, e_max = FIDInceptionE(64, max_pool=False).eval(), FIDInceptionE(64, max_pool=True).eval()
    e_max.load_state_dict(e_avg.state_dict())
    y = torch.randn(1, 64, 5, 5)
    with torch.no_grad():
        d = (e_avg(y) - e_max(y)).abs()  # (1, 2048, 5, 5); pool branch = last 192 channels
    assert d[:, :-192].max() < 1e-6 and d[:, -192:].max() > 1e-4


def test_missing_inception_weights_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        load_fid_inception(None)
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        load_fid_inception(tmp_path / "nope.pth")
