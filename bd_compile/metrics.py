"""Image-quality metrics for judging a cached (BlockDance) run against the uncached one.

The paper reports SSIM against the unaccelerated model's output as its consistency metric and FID
for quality; PSNR is added because it is exact and cheap. Everything here is plain torch (no
torchmetrics or scipy at import) so the benchmarks run on machines that have only torch.

Conventions: images are float tensors [N, C, H, W]; ``data_range`` is max - min of the value
range (2.0 for images in [-1, 1], the default); per-sample metrics return a float64 tensor [N].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["feature_statistics", "fid", "frechet_distance", "psnr", "ssim"]

_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"expected images of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(a.shape)}")


def _gaussian_window(
    size: int, sigma: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 2.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity (Wang et al., 2004) of each pair of images, float64 [N].

    Local statistics use a normalised ``window_size`` x ``window_size`` Gaussian window
    (``sigma`` 1.5) applied per channel; constants C1 = (0.01 * data_range)^2 and
    C2 = (0.03 * data_range)^2. Local variances are the biased ones, E[x^2] - E[x]^2, clamped at 0.
    Borders: images are reflect-padded by ``window_size // 2`` and the SSIM map is averaged over
    all C x H x W positions. This equals torchmetrics'
    ``structural_similarity_index_measure(a, b, data_range=data_range, reduction="none")`` with
    its defaults (its 11-wide window for sigma 1.5); skimage/MATLAB instead average only the
    "valid" interior, which differs slightly near the borders.

    Computed in float64. ``SSIM(x, x) == 1``; the value is symmetric in ``a`` and ``b``.
    Requires H and W > ``window_size // 2`` (for reflect padding).
    """
    _check_pair(a, b)
    if window_size % 2 == 0 or window_size <= 0:
        raise ValueError(f"expected an odd positive window_size, got {window_size}")
    pad = window_size // 2
    if min(a.shape[-2:]) <= pad:
        raise ValueError(
            f"expected H and W > {pad} for window_size {window_size}, got {tuple(a.shape[-2:])}"
        )
    x = a.to(torch.float64)
    y = b.to(device=a.device, dtype=torch.float64)
    channels = x.shape[1]
    window = _gaussian_window(window_size, sigma, x.dtype, x.device)
    kernel = window.expand(channels, 1, window_size, window_size)
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    n = x.shape[0]
    stats = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), kernel, groups=channels)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(n)
    var_x = (e_xx - mu_x * mu_x).clamp_min(0.0)
    var_y = (e_yy - mu_y * mu_y).clamp_min(0.0)
    cov = e_xy - mu_x * mu_y
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return ssim_map.reshape(n, -1).mean(dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio of each pair of images in dB, float64 [N].

    ``PSNR = 10 * log10(data_range^2 / MSE)`` with the MSE averaged over C x H x W of each pair;
    identical images give ``+inf``. No clamping is applied to the inputs.
    """
    _check_pair(a, b)
    diff = a.to(torch.float64) - b.to(device=a.device, dtype=torch.float64)
    mse = diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] (divisor N - 1, as ``numpy.cov``) in float64."""
    if features.ndim != 2:
        raise ValueError(f"expected features [N, D], got shape {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise ValueError(f"expected at least 2 feature vectors, got {features.shape[0]}")
    f = features.to(torch.float64)
    mu = f.mean(dim=0)
    centered = f - mu
    cov = centered.T @ centered / (f.shape[0] - 1)
    return mu, cov


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root via eigen-decomposition (negative round-off eigenvalues -> 0)."""
    sym = (m + m.T) / 2
    evals, evecs = torch.linalg.eigh(sym)
    return (evecs * evals.clamp_min(0.0).sqrt()) @ evecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N_a, D] and [N_b, D].

    ``d^2 = |mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2))`` with the means and the
    unbiased covariances of :func:`feature_statistics` (this is FID's formula; no square root of
    d^2 is taken). The trace of the matrix square root is computed exactly in float64 with
    torch eigen-decompositions rather than ``scipy.linalg.sqrtm``: with ``R = S_a^(1/2)``
    (symmetric PSD square root), ``S_a S_b`` is similar to the symmetric PSD matrix ``R S_b R``,
    so ``Tr((S_a S_b)^(1/2)) = sum(sqrt(eigvalsh(R S_b R)))``. This never returns complex values
    and handles singular covariances (N <= D, dead features); tiny negative eigenvalues from
    round-off are clamped to 0. Symmetric in its arguments up to round-off; 0 for identical sets
    (clamped at 0).
    """
    mu_a, cov_a = feature_statistics(feats_a)
    mu_b, cov_b = feature_statistics(feats_b.to(feats_a.device))
    if mu_a.shape != mu_b.shape:
        raise ValueError(
            f"expected features of the same dimension, got {mu_a.shape[0]} and {mu_b.shape[0]}"
        )
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    middle = (middle + middle.T) / 2
    tr_covmean = torch.linalg.eigvalsh(middle).clamp_min(0.0).sqrt().sum()
    d2 = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_covmean
    value = float(d2)
    return max(value, 0.0) if math.isfinite(value) else value


@torch.no_grad()
def _features(
    images: torch.Tensor, feature_fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int
) -> torch.Tensor:
    chunks: list[torch.Tensor] = []
    for i in range(0, images.shape[0], batch_size):
        batch = images[i : i + batch_size]
        chunks.append(feature_fn(batch).reshape(batch.shape[0], -1).to(torch.float64).cpu())
    return torch.cat(chunks)


def fid(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 256,
) -> float:
    """Frechet distance between the ``feature_fn`` embeddings of two image sets.

    ``feature_fn`` maps a batch of at most ``batch_size`` images to features [B, D] (or anything
    that flattens to that), e.g. the reference MNIST classifier's ``features`` in eval mode; it
    is responsible for moving the batch to its device. It runs under ``torch.no_grad``. The two
    sets may differ in size; the value is only comparable between runs that use the same
    ``feature_fn`` and similar set sizes (FID is biased upward for small N).
    """
    if batch_size <= 0:
        raise ValueError(f"expected a positive batch_size, got {batch_size}")
    return frechet_distance(
        _features(images_a, feature_fn, batch_size), _features(images_b, feature_fn, batch_size)
    )
