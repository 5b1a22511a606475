"""Fused noisy forward batch: replicate clean images, add sigma * keyed noise, cast, one pass.

``noisy_batch(x, row_image, row_sample, image_ids, seed=, stream=, sigma=, dtype=)`` writes row r
as ``dtype(float32(x[row_image[r]] + float32(sigma * z)))`` where ``z`` is the keyed noise of
(image_ids[row_image[r]], row_sample[r]) in :mod:`engine.noise`. It gives the same bits as the
plain-PyTorch reference :func:`noisy_batch_ref` (= ``engine.noise.noisy_batch_ref``), the C++ CPU
op and the CUDA op; see :mod:`engine.kernels.philox_normal` for what makes that hold on a GPU.

One program covers a tile of BLOCK_R rows x BLOCK_G Philox blocks (4 pixels each): it evaluates
every Philox block once, turns its 4 words into 4 normals and stores the 4 pixels contiguously.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine import noise as _noise

from ._launch import as_index, gpu_sizing, next_pow2, require_runnable
from .packed_rows import rows_of
from .philox_normal import EXACT, key_words, normal_pair, round_to

__all__ = ["noisy_batch", "noisy_batch_ref", "launch_noisy_batch", "DTYPES"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
noisy_batch_ref = _noise.noisy_batch_ref


@triton.jit(do_not_specialize=["rows", "start", "num", "total", "k0", "k1", "stream"])
def _noisy_batch_kernel(
    x_ptr,
    out_ptr,
    row_image_ptr,
    row_sample_ptr,
    image_ids_ptr,
    rows,
    start,
    num,
    total,
    num_pixels,
    k0,
    k1,
    stream,
    sigma,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PACKED: tl.constexpr,
):
    r, slot, sample, r_ok = rows_of(tl.program_id(0), row_image_ptr, row_sample_ptr, start, num, total, rows, BLOCK_R,
                                    PACKED)
    sample = sample.to(tl.uint32)
    image = tl.load(image_ids_ptr + slot, mask=r_ok, other=0).to(tl.uint32)
    pid_g = tl.program_id(1)
    g = (pid_g * BLOCK_G + tl.arange(0, BLOCK_G)).to(tl.uint32)
    key0 = k0.to(tl.uint32, bitcast=True)
    key1 = k1.to(tl.uint32, bitcast=True)
    tag = stream.to(tl.uint32, bitcast=True)
    z0, z1, z2, z3 = normal_pair(g[None, :], sample[:, None], image[:, None], tag, key0, key1)
    # (R, G, 2, 2) -> (R, 4G): element [r, g, i, j] is z_{2i+j}, pixel 4g + 2i + j.
    z = tl.join(tl.join(z0, z2), tl.join(z1, z3))
    z = tl.reshape(z, (BLOCK_R, 4 * BLOCK_G))
    p = pid_g * (4 * BLOCK_G) + tl.arange(0, 4 * BLOCK_G)
    mask = r_ok[:, None] & (p < num_pixels)[None, :]
    clean = tl.load(x_ptr + slot.to(tl.int64)[:, None] * num_pixels + p[None, :], mask=mask, other=0.0)
    noisy = clean + sigma * z  # two roundings: no multiply-add (launched with enable_fp_fusion=False)
    dst = out_ptr + r.to(tl.int64)[:, None] * num_pixels + p[None, :]
    tl.store(dst, round_to(noisy, out_ptr.dtype.element_ty), mask=mask)


def _blocks(groups: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_G, num_warps): 1024 Philox blocks per GPU program, 16,384 when interpreting."""
    budget = 1024 if gpu_sizing() else 16384
    block_g = min(next_pow2(groups), 256)
    return max(1, budget // block_g), block_g, 4


def noisy_batch(x, row_image, row_sample, image_ids, *, seed, stream, sigma, dtype=torch.float32, out=None):
    """Noisy copies of clean images written straight into a forward batch (Triton).

    Args:
        x: (B, C, H, W) (any trailing shape) float clean images; used as float32.
        row_image: (R,) int64, row r copies ``x[row_image[r]]`` (values in [0, B)).
        row_sample: (R,) int64 sample index of row r, in [0, 2^32).
        image_ids: (B,) int64 global id of each image, in [0, 2^32).
        seed: key in [0, 2^64); stream: stream tag in [0, 2^32) (engine.noise.STREAM_*).
        sigma: noise standard deviation (pixel units; used as float32).
        dtype: float32, float16 or bfloat16 (round to nearest even from the float32 sum).
        out: optional preallocated (R, *x.shape[1:]) contiguous tensor of ``dtype`` on x's device
            (the static input of a CUDA graph, say); filled and returned.

    Returns:
        (R, *x.shape[1:]) tensor of ``dtype``, bit-equal to :func:`noisy_batch_ref`. Index values
        are not range-checked on the device (the engine builds them); the reference checks them.
    """
    _noise._check_rows(x, row_image, row_sample, image_ids)
    _noise._check_key(seed, stream)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype}")
    device = x.device
    require_runnable(device, "engine.kernels.noisy_batch")
    row_image = as_index("row_image", row_image, device)
    row_sample = as_index("row_sample", row_sample, device)
    image_ids = as_index("image_ids", image_ids, device)
    rows = row_image.shape[0]
    shape = (rows,) + tuple(x.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    elif out.shape != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {shape} {dtype} tensor on {device}, got {tuple(out.shape)} {out.dtype}")
    num_pixels = x[0].numel() if x.shape[0] else 0
    if rows == 0 or num_pixels == 0:
        return out
    xc = x.detach().to(torch.float32).reshape(x.shape[0], num_pixels).contiguous()
    launch_noisy_batch(xc, image_ids, out, seed=seed, stream=stream, sigma=sigma, row_image=row_image,
                       row_sample=row_sample)
    return out


def launch_noisy_batch(x_flat, image_ids, out, *, seed, stream, sigma, row_image=None, row_sample=None, packed=None):
    """Fill ``out`` (rows, pixels...) from float32 contiguous ``x_flat`` (B, pixels); no checks.

    Rows: explicit ``row_image`` / ``row_sample`` (R,) int64 tensors, or ``packed = (start, num,
    total)`` (see :mod:`engine.kernels.packed_rows`; padding rows are left untouched).
    """
    rows = out.shape[0]
    num_pixels = x_flat.shape[1] if x_flat.dim() == 2 else 0
    if rows == 0 or num_pixels == 0:
        return out
    groups = (num_pixels + 3) // 4
    block_r, block_g, warps = _blocks(groups)
    k0, k1, tag = key_words(seed, stream)
    if packed is None:
        start, num, total, is_packed = 0, 1, rows, False
    else:
        (start, num, total), is_packed = packed, True
        row_image = row_sample = image_ids  # unused pointers
    grid = (triton.cdiv(rows, block_r), triton.cdiv(groups, block_g))
    _noisy_batch_kernel[grid](
        x_flat, out, row_image, row_sample, image_ids, rows, start, num, total, num_pixels, k0, k1, tag, float(sigma),
        BLOCK_R=block_r, BLOCK_G=block_g, PACKED=is_packed, num_warps=warps, **EXACT,
    )  # fmt: skip
    return out
