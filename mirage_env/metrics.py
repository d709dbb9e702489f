"""Measures of a generated world: revisit consistency and memory footprint."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 images (inf when identical)."""
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def masked_psnr(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
    """PSNR over the pixels where ``keep`` (HxW bool) is True (inf when they match or none are kept)."""
    keep = np.asarray(keep, dtype=bool)
    if not keep.any():
        return math.inf
    difference = np.asarray(a, dtype=np.float64)[keep] - np.asarray(b, dtype=np.float64)[keep]
    mse = np.mean(difference**2)
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7, sigma: float = 1.5) -> float:
    """Structural similarity of two HxWx3 uint8 images (Gaussian window, per channel, averaged)."""
    x = torch.as_tensor(np.asarray(a), dtype=torch.float64).permute(2, 0, 1)[None] / 255.0
    y = torch.as_tensor(np.asarray(b), dtype=torch.float64).permute(2, 0, 1)[None] / 255.0
    window = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    kernel_1d = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel_1d /= kernel_1d.sum()
    kernel = (kernel_1d[:, None] * kernel_1d[None, :]).expand(3, 1, window, window)
    blur = lambda t: F.conv2d(t, kernel, groups=3)  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(value.mean())
