"""Row layout of a forward batch, shared by the Triton kernels.

Certification lays the B * num (image, sample) rows of a call out image-major: global row ``q``
is sample ``q % num`` of image slot ``q // num`` (``engine.smoothing.sample_counts``). A forward
batch holds global rows ``start .. start + batch_rows - 1``; rows with ``q >= total`` are padding
(the last batch of a fixed-shape CUDA graph). Kernels take either this *packed* description (three
integers, nothing to build on the host) or explicit ``row_image`` / ``row_sample`` index tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rows_of", "packed_rows_ref"]


@triton.jit
def rows_of(pid, row_image_ptr, row_sample_ptr, start, num, total, batch_rows, BLOCK_R: tl.constexpr,
            PACKED: tl.constexpr):
    """(r, slot, sample, ok) of the BLOCK_R rows of program ``pid``: row index in the batch, image
    slot (int64), sample index (int64) and validity."""
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    if PACKED:
        q = start + r.to(tl.int64)
        ok = (r < batch_rows) & (q < total)
        slot = tl.where(ok, q // num, 0)
        sample = q - slot * num
    else:
        ok = r < batch_rows
        slot = tl.load(row_image_ptr + r, mask=ok, other=0)
        sample = tl.load(row_sample_ptr + r, mask=ok, other=0)
    return r, slot, sample, ok


def packed_rows_ref(start: int, rows: int, num: int, total: int, device=None):
    """(row_image, row_sample, valid) int64 / bool tensors of the packed layout (plain PyTorch)."""
    q = torch.arange(start, start + rows, dtype=torch.int64, device=device)
    valid = q < total
    slot = torch.where(valid, q // num, 0)
    return slot, torch.where(valid, q - slot * num, 0), valid
