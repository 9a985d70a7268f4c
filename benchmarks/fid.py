"""Frechet distance (FID's formula) on any feature extractor, for the quality benchmark.

Plain torch (no scipy at import); moved out of ``bd_compile.metrics``, which the library uses for
SSIM and PSNR only. Conventions as there: features are float tensors [N, D], computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["feature_statistics", "fid", "frechet_distance"]


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
