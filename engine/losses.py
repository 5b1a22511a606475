"""Training losses of the certified-robust procedures (the PACD lower-level problems)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gaussian_augmentation"]


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor of shape (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype != torch.int64:
        raise ValueError(f"y must be an int64 tensor of shape ({x.shape[0]},), got {getattr(y, 'shape', type(y))}")


def _check_sigma(sigma, allow_zero: bool = True) -> float:
    sigma = float(sigma)
    if not (sigma >= 0.0 if allow_zero else sigma > 0.0) or sigma != sigma or sigma == float("inf"):
        raise ValueError(f"sigma must be a finite number {'>=' if allow_zero else '>'} 0, got {sigma}")
    return sigma


def gaussian_augmentation(model, x, y, *, sigma, generator=None, reduction="mean") -> torch.Tensor:
    """Cross-entropy of ``model`` on Gaussian-noised inputs (Cohen et al. 2019).

    x: (B, C, H, W) pixels in [0, 1]; y: (B,) int64 labels; sigma >= 0 (0 = standard training).
    Fresh noise e ~ N(0, sigma^2 I) is drawn from ``generator`` (on x's device) at every call.
    Returns the mean loss (scalar), or (B,) with ``reduction="none"``.
    """
    _check_xy(x, y)
    sigma = _check_sigma(sigma)
    if sigma > 0:
        x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return F.cross_entropy(model(x), y, reduction=reduction)
