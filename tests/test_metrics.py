"""bd_compile.metrics (SSIM, PSNR) and benchmarks.fid against closed forms and, where installed,
torchmetrics / scipy."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from bd_compile.metrics import psnr, ssim
from benchmarks.fid import feature_statistics, fid, frechet_distance


def _images(n: int = 4, c: int = 1, h: int = 28, w: int = 28, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, c, h, w), generator=gen, dtype=torch.float64) * 2 - 1


def _with_stats(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """n samples whose sample mean and unbiased sample covariance are exactly ``mean``, ``cov``."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((n, mean.shape[0]), generator=gen, dtype=torch.float64)
    z = z - z.mean(0)
    white = torch.linalg.cholesky(z.T @ z / (n - 1))
    z = torch.linalg.solve_triangular(white, z.T, upper=False).T  # sample covariance = I
    return z @ torch.linalg.cholesky(cov).T + mean


def _random_spd(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn((d, d), generator=gen, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_identical_images_give_ssim_one_and_psnr_inf() -> None:
    x = _images()
    assert torch.allclose(ssim(x, x), torch.ones(4, dtype=torch.float64), atol=1e-12)
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()


def test_constant_offset_gives_exact_psnr() -> None:
    x = _images(n=3, c=2)
    for c in (0.01, 0.1, 0.5):
        expected = 10 * math.log10(2.0**2 / c**2)
        full = torch.full((3,), expected, dtype=torch.float64)
        torch.testing.assert_close(psnr(x, x + c), full, rtol=1e-12, atol=0)
        # data_range 1 instead of 2 lowers PSNR by exactly 10 * log10(4) dB.
        torch.testing.assert_close(psnr(x + c, x, data_range=1.0), full - 10 * math.log10(4))


def test_constant_offset_of_flat_image_gives_closed_form_ssim() -> None:
    # Flat images have zero local variance, so SSIM reduces to the luminance term everywhere.
    a, c = 0.3, 0.2
    x = torch.full((2, 1, 16, 16), a, dtype=torch.float64)
    c1 = (0.01 * 2.0) ** 2
    expected = (2 * a * (a + c) + c1) / (a**2 + (a + c) ** 2 + c1)
    assert torch.allclose(ssim(x, x + c), torch.full((2,), expected, dtype=torch.float64))


def test_ssim_is_symmetric_bounded_and_falls_with_noise() -> None:
    x = _images(n=2)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    values = [float(ssim(x, x + s * noise).mean()) for s in (0.01, 0.1, 0.5)]
    assert values[0] > values[1] > values[2]
    assert torch.allclose(ssim(x, x + 0.1 * noise), ssim(x + 0.1 * noise, x))
    assert all(-1.0 <= v <= 1.0 for v in values)


def test_ssim_accepts_float32_and_returns_float64_per_sample() -> None:
    x = _images(n=5).float()
    out = ssim(x, x.flip(-1))
    assert out.shape == (5,) and out.dtype == torch.float64


@pytest.mark.skipif(importlib.util.find_spec("torchmetrics") is None, reason="torchmetrics absent")
def test_ssim_matches_torchmetrics_with_the_same_settings() -> None:
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    x = _images(n=3, c=2, h=28, w=20)
    gen = torch.Generator().manual_seed(2)
    y = (x + 0.2 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(-1, 1)
    expected = tm_ssim(y, x, data_range=2.0, reduction="none")
    assert isinstance(expected, torch.Tensor)
    torch.testing.assert_close(ssim(y, x), expected, rtol=0, atol=1e-10)


def test_mismatched_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="same shape"):
        ssim(_images(n=2), _images(n=3))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        psnr(torch.zeros(3, 28, 28), torch.zeros(3, 28, 28))


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form() -> None:
    # Commuting (diagonal) covariances: d^2 = |mu_a - mu_b|^2 + sum (sqrt(s_a) - sqrt(s_b))^2.
    mu_a = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    mu_b = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    s_a = torch.tensor([1.0, 4.0, 0.25, 2.0], dtype=torch.float64)
    s_b = torch.tensor([9.0, 1.0, 0.25, 0.5], dtype=torch.float64)
    fa = _with_stats(200, mu_a, torch.diag(s_a), seed=0)
    fb = _with_stats(300, mu_b, torch.diag(s_b), seed=1)
    expected = float((mu_a - mu_b).pow(2).sum() + (s_a.sqrt() - s_b.sqrt()).pow(2).sum())
    assert frechet_distance(fa, fb) == pytest.approx(expected, rel=1e-9)


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="scipy absent")
def test_frechet_distance_of_full_covariances_matches_scipy_sqrtm() -> None:
    import numpy as np
    from scipy import linalg

    d = 6
    mu_a = torch.linspace(-1, 1, d, dtype=torch.float64)
    mu_b = torch.zeros(d, dtype=torch.float64)
    s_a, s_b = _random_spd(d, seed=3), _random_spd(d, seed=4)
    fa, fb = _with_stats(100, mu_a, s_a, seed=5), _with_stats(150, mu_b, s_b, seed=6)
    covmean = np.real(linalg.sqrtm(s_a.numpy() @ s_b.numpy()))
    expected = float(
        (mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * float(np.trace(covmean))
    )
    assert frechet_distance(fa, fb) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_is_symmetric_and_zero_for_identical_features() -> None:
    gen = torch.Generator().manual_seed(7)
    fa = torch.randn((64, 16), generator=gen)
    fb = torch.randn((80, 16), generator=gen) * 1.5 + 0.3
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(fa, fb) == pytest.approx(frechet_distance(fb, fa), rel=1e-9)
    assert frechet_distance(fa, fb) > 0.5


def test_frechet_distance_handles_rank_deficient_covariances() -> None:
    # Fewer samples than dimensions and a dead (constant) feature: still finite and >= 0.
    gen = torch.Generator().manual_seed(8)
    fa = torch.randn((10, 32), generator=gen)
    fb = torch.randn((12, 32), generator=gen)
    fa[:, 0] = 1.0
    value = frechet_distance(fa, fb)
    assert math.isfinite(value) and value >= 0.0


def test_feature_statistics_use_the_unbiased_covariance() -> None:
    gen = torch.Generator().manual_seed(9)
    f = torch.randn((50, 5), generator=gen, dtype=torch.float64)
    mu, cov = feature_statistics(f)
    torch.testing.assert_close(mu, f.mean(0))
    torch.testing.assert_close(cov, torch.cov(f.T))


def test_fid_equals_frechet_distance_of_the_features_whatever_the_batch_size() -> None:
    a, b = _images(n=40, h=4, w=4, seed=10), _images(n=30, h=4, w=4, seed=11) * 0.5

    def flatten(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    expected = frechet_distance(a.flatten(1), b.flatten(1))
    assert fid(a, b, flatten, batch_size=7) == pytest.approx(expected, rel=1e-10)
    assert fid(a, b, flatten, batch_size=256) == pytest.approx(expected, rel=1e-10)
