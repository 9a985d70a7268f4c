"""Image-quality metrics for judging a cached (BlockDance) run against the uncached one.

The paper reports SSIM against the unaccelerated model's output as its consistency metric; PSNR
is added because it is exact and cheap. (FID, which only the benchmarks use, is in
``benchmarks/fid.py``.) Everything here is plain torch (no torchmetrics or scipy at import).

Conventions: images are float tensors [N, C, H, W]; ``data_range`` is max - min of the value
range (2.0 for images in [-1, 1], the default); per-sample metrics return a float64 tensor [N].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim"]

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
