"""Helpers of the kernel tests: float64 truths and top-2 margins (near-tie guards).

Two float32 computations that sum in different orders can disagree on a row's argmax only when its
two largest logits lie within their rounding differences (~1e-6 relative). The tests that demand
*equal counts* from such computations first check, in float64, that every row of their fixed test
data has a top-2 gap far above that (``MIN_GAP``); the check is deterministic (fixed seeds), so the
equality tests can neither pass by luck nor fail by chance.
"""

from __future__ import annotations

import copy

import torch

from engine import noise

__all__ = ["MIN_GAP", "packed_noisy_rows", "float64_logits", "top2_gap"]

MIN_GAP = 1e-4  # relative to the logits' scale; float32 differences are ~1e-6


def packed_noisy_rows(x, ids, num, *, seed, stream, sigma, start=0, rows=None):
    """(noisy batch, row_image) of the image-major rows ``start .. start + rows - 1`` (reference noise)."""
    total = x.shape[0] * num
    rows = total - start if rows is None else rows
    q = torch.arange(start, start + rows, dtype=torch.int64)
    row_image = q // num
    batch = noise.noisy_batch_ref(x, row_image, q - row_image * num, torch.as_tensor(ids), seed=seed, stream=stream,
                                  sigma=sigma)
    return batch, row_image


def float64_logits(model, batch):
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return m(batch.double())


def top2_gap(logits: torch.Tensor) -> float:
    """Smallest (top1 - top2) / scale over the rows."""
    top = logits.topk(2, dim=1).values
    scale = float(logits.abs().max()) + 1e-30
    return float((top[:, 0] - top[:, 1]).min()) / scale
