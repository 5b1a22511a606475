"""Certification metrics: average certified radius (ACR) and certified accuracy at radii."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["acr", "certified_accuracy", "summary", "DEFAULT_RADII"]

DEFAULT_RADII = tuple(0.25 * i for i in range(9))  # 0, 0.25, ..., 2.0


def _as_arrays(prediction, radius, labels):
    pred = np.asarray(torch.as_tensor(prediction).cpu().numpy() if isinstance(prediction, torch.Tensor) else prediction)
    rad = np.asarray(torch.as_tensor(radius).cpu().numpy() if isinstance(radius, torch.Tensor) else radius, dtype=np.float64)
    lab = np.asarray(torch.as_tensor(labels).cpu().numpy() if isinstance(labels, torch.Tensor) else labels)
    if pred.ndim != 1 or rad.shape != pred.shape or lab.shape != pred.shape:
        raise ValueError(f"prediction, radius and labels must be 1-D of equal length, got {pred.shape}, {rad.shape}, {lab.shape}")
    if np.any(~np.isfinite(rad)) or np.any(rad < 0):
        raise ValueError("radius must be finite and >= 0")
    return pred, rad, lab


def acr(prediction, radius, labels) -> float:
    """Average certified radius: mean over images of radius if the prediction is correct, else 0."""
    pred, rad, lab = _as_arrays(prediction, radius, labels)
    if pred.size == 0:
        raise ValueError("acr of zero images is undefined")
    return float(np.mean(np.where(pred == lab, rad, 0.0)))


def certified_accuracy(prediction, radius, labels, radii) -> torch.Tensor:
    """Fraction of images with a correct prediction and radius >= r, for each r in ``radii``.

    Returns a float64 tensor of shape (len(radii),). Abstentions (prediction -1) never count.
    """
    pred, rad, lab = _as_arrays(prediction, radius, labels)
    if pred.size == 0:
        raise ValueError("certified accuracy of zero images is undefined")
    r = np.asarray(radii, dtype=np.float64).reshape(-1)
    correct = pred == lab
    out = (correct[None, :] & (rad[None, :] >= r[:, None])).mean(axis=1)
    return torch.from_numpy(out.astype(np.float64))


def summary(prediction, radius, labels, radii=DEFAULT_RADII) -> dict:
    """ACR, clean (smoothed) accuracy, abstain rate and certified accuracy at ``radii``, as a dict."""
    pred, rad, lab = _as_arrays(prediction, radius, labels)
    cert = certified_accuracy(pred, rad, lab, radii)
    return {
        "images": int(pred.size),
        "acr": acr(pred, rad, lab),
        "clean_accuracy": float(np.mean(pred == lab)),
        "abstain_rate": float(np.mean(pred == -1)),
        "certified_accuracy": {f"{r:g}": float(v) for r, v in zip(radii, cert.tolist())},
    }
