"""Helpers of the kernel tests: the GPU marker, float64 truths and top-2 margins (near-tie guards).

GPU tests: ``@gpu`` marks a test that needs a CUDA device *and* compiled Triton kernels. The suite
normally runs with ``TRITON_INTERPRET=1`` (tests/conftest.py), where such tests skip;
``bench/gpu_run.sh`` runs them with ``TRITON_INTERPRET=0 pytest -m gpu`` on a GPU machine. The other
kernel tests run the interpreter on CPU tensors, on any machine.

Two float32 computations that sum in different orders can disagree on a row's argmax only when its
two largest logits lie within their rounding differences: measured against float64, float32
LeNet, ResNet-8 and MLP logits are off by at most ~6e-7 of the logits' scale. The tests that demand
*equal counts* from such computations first check, in float64, that every row of their fixed test
data has a top-2 gap far above that (``MIN_GAP`` = 2e-5 of the scale, 30x the measured error);
the check is deterministic (fixed seeds), so the equality tests can neither pass by luck nor fail
by chance.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from engine import noise

__all__ = ["gpu", "MIN_GAP", "packed_noisy_rows", "float64_logits", "top2_gap", "assert_no_near_ties"]

_interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def gpu(fn):
    """Mark ``fn`` as a GPU test: runs only with CUDA and compiled Triton (TRITON_INTERPRET=0)."""
    reason = "needs a CUDA device and compiled Triton kernels (run: TRITON_INTERPRET=0 pytest -m gpu)"
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available() or _interpreting, reason=reason)(fn))

MIN_GAP = 2e-5  # relative to the logits' scale; float32 errors are <= ~6e-7 of it


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


def assert_no_near_ties(model, x, ids, streams, *, seed, sigma):
    """Fail unless every noisy row ``(image, sample)`` of ``streams`` ({stream: samples per image}) has a float64
    top-2 gap above MIN_GAP: the guard of a test that demands equal counts from float32 computations that sum in
    different orders (other code paths, batch shapes, CPU instruction sets, thread counts)."""
    for stream, num in streams.items():
        batch, _ = packed_noisy_rows(x, ids, num, seed=seed, stream=stream, sigma=sigma)
        gap = top2_gap(float64_logits(model, batch))
        assert gap > MIN_GAP, f"fixed test data has a near-tie (stream {stream}, gap {gap:.1e}): change the seed"
