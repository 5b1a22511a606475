"""Python-side registrations for the ``torch.ops.engine`` operators of ``engine._C``.

Fake (meta) kernels let the ops run under FakeTensor / torch.compile and be checked with
``torch.library.opcheck``. Imported by :mod:`engine._ext` once the library has loaded.
"""

from __future__ import annotations

import torch

__all__: list[str] = []


@torch.library.register_fake("engine::noisy_batch")
def _noisy_batch_fake(x, row_image, row_sample, image_ids, seed, stream, sigma, dtype):
    torch._check(row_image.dim() == 1 and row_sample.dim() == 1, lambda: "row_image and row_sample must be 1-D")
    torch._check(row_image.shape[0] == row_sample.shape[0], lambda: "row_image and row_sample differ in length")
    torch._check(image_ids.shape[0] == x.shape[0], lambda: "image_ids must have one entry per image")
    return x.new_empty((row_image.shape[0],) + tuple(x.shape[1:]), dtype=dtype)
